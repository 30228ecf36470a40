"""MiniCache's merge of two adjacent layers' KV vectors (Liu et al., arXiv 2405.14366), as tensors.

Each token's key (or value) in one KV head of layer a and of layer b = a + 1 is split into a
magnitude and a direction. The two directions are interpolated on the sphere (SLERP), so one unit
vector is stored for both layers, plus each layer's own magnitude:

    cos(omega) = <x_a, x_b> / (|x_a| |x_b|)
    e          = sin((1 - t) omega) / sin(omega) * x_a / |x_a|  +  sin(t omega) / sin(omega) * x_b / |x_b|
    restored   x_a ~ |x_a| e,   x_b ~ |x_b| e

`t` weighs the deeper layer's direction. Vectors whose directions disagree most are kept unmerged
(retention): with the angular distance d = omega / pi, a vector is retained when
d > d_min + gamma * (d_max - d_min), d_min and d_max taken over every vector this pair has merged so
far (`AngleRange`, so one decode token is judged against the prompt's spread, not only itself).
gamma = 1 retains nothing; lower gamma retains more. Retained vectors are stored whole for both
layers and replace the merged ones on restoration.

Directions and magnitudes are per token and KV head; retention likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-12


@dataclass
class AngleRange:
    """Smallest and largest angular distance a pair has merged so far (one for keys, one for values)."""

    low: float = float("inf")
    high: float = float("-inf")

    def update(self, distances: torch.Tensor) -> None:
        if distances.numel():
            self.low = min(self.low, float(distances.min()))
            self.high = max(self.high, float(distances.max()))


@dataclass
class MergedStates:
    """One pair's merged keys or values for m tokens, batch B, H KV heads, head size D.

    direction [B, H, m, D] unit vectors; magnitude_a, magnitude_b [B, H, m];
    retained_index [n] int32, position-major flat index (pos * B + b) * H + h (appending positions
    keeps earlier indices valid); retained_a, retained_b [n, D] the original vectors."""

    direction: torch.Tensor
    magnitude_a: torch.Tensor
    magnitude_b: torch.Tensor
    retained_index: torch.Tensor
    retained_a: torch.Tensor
    retained_b: torch.Tensor
    angles: AngleRange = field(default_factory=AngleRange)

    @classmethod
    def empty(cls, batch: int, heads: int, dim: int, dtype: torch.dtype, device) -> "MergedStates":
        z = dict(dtype=dtype, device=device)
        return cls(torch.empty(batch, heads, 0, dim, **z), torch.empty(batch, heads, 0, **z),
                   torch.empty(batch, heads, 0, **z), torch.empty(0, dtype=torch.int32, device=device),
                   torch.empty(0, dim, **z), torch.empty(0, dim, **z))

    @property
    def num_tokens(self) -> int:
        return self.direction.shape[2]

    @property
    def num_retained(self) -> int:
        return self.retained_index.numel()

    def nbytes(self) -> int:
        """Bytes of every tensor this representation holds."""
        return sum(t.numel() * t.element_size() for t in (self.direction, self.magnitude_a, self.magnitude_b,
                                                         self.retained_index, self.retained_a, self.retained_b))

    def append(self, x_a: torch.Tensor, x_b: torch.Tensor, t: float, gamma: float) -> None:
        """Merge the next tokens' vectors x_a, x_b [B, H, n, D] of the two layers and keep them."""
        batch, heads, n, _ = x_a.shape
        direction, mag_a, mag_b, distance = slerp(x_a, x_b, t)
        self.angles.update(distance)
        keep = retained(distance, self.angles, gamma)  # [B, H, n]
        pos, b, h = keep.permute(2, 0, 1).nonzero(as_tuple=True)  # position-major order
        index = ((pos + self.num_tokens) * batch + b) * heads + h
        self.retained_index = torch.cat([self.retained_index, index.to(torch.int32)])
        self.retained_a = torch.cat([self.retained_a, x_a[b, h, pos]])
        self.retained_b = torch.cat([self.retained_b, x_b[b, h, pos]])
        self.direction = torch.cat([self.direction, direction.to(self.direction.dtype)], dim=2)
        self.magnitude_a = torch.cat([self.magnitude_a, mag_a.to(self.magnitude_a.dtype)], dim=2)
        self.magnitude_b = torch.cat([self.magnitude_b, mag_b.to(self.magnitude_b.dtype)], dim=2)

    def restore(self, member: int) -> torch.Tensor:
        """[B, H, m, D]: layer a's (member 0) or layer b's (member 1) vectors as stored: magnitude times
        the shared direction, retained vectors exactly."""
        magnitude = self.magnitude_a if member == 0 else self.magnitude_b
        states = self.direction * magnitude[..., None]
        if self.num_retained:
            batch, heads = states.shape[0], states.shape[1]
            index = self.retained_index.long()
            h, rest = index % heads, index // heads
            b, pos = rest % batch, rest // batch
            states[b, h, pos] = self.retained_a if member == 0 else self.retained_b
        return states


def slerp(x_a: torch.Tensor, x_b: torch.Tensor, t: float):
    """x_a, x_b [..., D] -> (direction [..., D] unit, |x_a| [...], |x_b| [...], angular distance [...] in [0, 1]).

    Nearly parallel directions (sin(omega) ~ 0) fall back to the normalized linear interpolation,
    the same limit."""
    a, b = x_a.double(), x_b.double()
    mag_a, mag_b = a.norm(dim=-1), b.norm(dim=-1)
    unit_a, unit_b = a / mag_a.clamp_min(EPS)[..., None], b / mag_b.clamp_min(EPS)[..., None]
    cos = (unit_a * unit_b).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    w_a = torch.where(small, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    w_b = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    direction = w_a[..., None] * unit_a + w_b[..., None] * unit_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return direction, mag_a, mag_b, omega / torch.pi


def retained(distance: torch.Tensor, angles: AngleRange, gamma: float) -> torch.Tensor:
    """Which vectors stay unmerged: angular distance above d_min + gamma (d_max - d_min)."""
    if angles.high <= angles.low:  # every distance so far equal: nothing stands out
        return torch.zeros_like(distance, dtype=torch.bool)
    return distance > angles.low + gamma * (angles.high - angles.low)
