"""`XKVCache`: a transformers `Cache` that keeps the prompt's KV as one low-rank factorisation per
group of layers (xKV, Chang et al., "xKV: Cross-Layer SVD for KV-Cache Compression", arXiv 2503.18893).

xKV's observation: the dominant singular vectors of adjacent layers' KV are well aligned even where
their tokens are not similar (MiniCache's assumption), so a group of layers can share one basis.
Consecutive layers from `start_layer` on form groups of `group_size` (the last one may be
shorter). For keys and values separately, the prompt's vectors of every layer in a group are
concatenated along the feature axis,

    X = [X_1 | X_2 | ... | X_g]          X_l: [tokens, kv_heads * head_dim] of layer l

and truncated to rank r by SVD, X ~ U_r S_r V_r^T. The cache stores the token-side factor
A = U_r S_r ([tokens, r]: shared by the group) and each layer's slice of V_r^T ([r, kv_heads *
head_dim]); layer l's KV is restored as A V_l^T. Keys are factorised before RoPE (the paper's
choice: rotary phases raise the rank): the cache receives rotated keys, undoes the rotation at
the positions of its slots (RoPE is orthogonal, so exactly), and rotates the restored keys again.

Ranks are given per layer (`key_rank`, `value_rank`); a group of g layers gets g times that, so
every group size stores the same number of token-side values per layer and `group_size=1` is the
paper's "single SVD" baseline at the same budget. A rank never exceeds min(tokens, g * kv_heads *
head_dim); at that rank the factorisation is exact.

As in xKV's code, only the prompt is compressed: the first forward pass's tokens, once the
group's last layer has run (within that pass every layer attends its own prompt exactly, as
xKV's prefill does). Later tokens (decode steps) are kept whole. `kv_bytes()` counts every
tensor held: factors, bases and the later tokens.

Rotary positions are the cache slots 0, 1, ...; for a left-padded batch the unrotation then uses
a shifted position for padded rows, which is still undone exactly, only the factorisation sees
keys rotated by the row's padding. Runs on the plain model
(`model(..., past_key_values=XKVCache.for_model(model, ...))`), like `MiniCache`, not in offload's
paged store (a page holds one layer's K and V per token).
"""

from __future__ import annotations

import sys

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from offload.crosslayer.cache_layer import CountedLayer, full_attention_config, layer_bytes

DEFAULT_GROUP_SIZE = 2


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE as transformers' Llama does (features p and p + D/2 paired): x [B, H, N, D], cos/sin
    [B, N, D] (as the model's rotary embedding returns them)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `rotate`: the transpose of the rotation, divided by cos^2 + sin^2 (the rotary embedding's
    attention scaling squared, 1 for plain RoPE)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


class LowRank:
    """One group's factorised prompt KV (keys or values): `factor` [B, N, r] = U_r S_r and the
    per-layer bases [B, r, kv_heads * head_dim] (slices of V_r^T)."""

    def __init__(self, members: list[torch.Tensor], rank: int) -> None:
        # members: each layer's [B, H, N, D] -> X = [B, N, g * H * D]
        batch, heads, tokens, dim = members[0].shape
        self.heads, self.dim = heads, dim
        x = torch.cat([m.transpose(1, 2).reshape(batch, tokens, heads * dim) for m in members], dim=-1)
        rank = min(rank, tokens, x.shape[-1])
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)  # float64: small, and stable at the cut
        self.factor = (u[..., :rank] * s[:, None, :rank]).to(members[0].dtype)
        width = heads * dim
        self.bases = [vh[:, :rank, i * width:(i + 1) * width].to(members[0].dtype).contiguous()
                      for i in range(len(members))]
        self.rank = rank

    def restore(self, member: int) -> torch.Tensor:
        batch, tokens, _ = self.factor.shape
        x = torch.matmul(self.factor, self.bases[member])
        return x.view(batch, tokens, self.heads, self.dim).transpose(1, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.factor, *self.bases))


class LayerGroup:
    """Consecutive layers sharing one factorisation of their prompt's keys and one of its values."""

    def __init__(self, layers: tuple[int, ...], key_rank: int, value_rank: int, rotary) -> None:
        self.layers = layers
        self.key_rank, self.value_rank = key_rank * len(layers), value_rank * len(layers)
        self.rotary = rotary  # the model's rotary embedding, or None to factorise rotated keys
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keys: LowRank | None = None
        self.values: LowRank | None = None
        self.prompt_tokens = 0

    def rope(self, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(tokens, device=like.device).unsqueeze(0).expand(like.shape[0], -1)
        return self.rotary(like, positions)

    def add_prompt(self, member: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.pending[member] = (keys, values)
        if len(self.pending) < len(self.layers):
            return
        members = [self.pending.pop(m) for m in range(len(self.layers))]
        keys_all = [k for k, _ in members]
        self.prompt_tokens = keys_all[0].shape[-2]
        if self.rotary is not None:
            cos, sin = self.rope(keys_all[0], self.prompt_tokens)
            keys_all = [unrotate(k.float(), cos.float(), sin.float()).to(k.dtype) for k in keys_all]
        self.keys = LowRank(keys_all, self.key_rank)
        self.values = LowRank([v for _, v in members], self.value_rank)

    def restored(self, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys.restore(member)
        if self.rotary is not None:
            cos, sin = self.rope(keys, self.prompt_tokens)
            keys = rotate(keys.float(), cos.float(), sin.float()).to(keys.dtype)
        return keys, self.values.restore(member)

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes() + self.values.nbytes()


class GroupLayer(CountedLayer):
    """One layer of a group, as transformers sees it: the group's restored prompt, then this
    layer's later tokens kept whole."""

    owner = "XKVCache"

    def __init__(self, group: LayerGroup, member: int) -> None:
        super().__init__()
        self.group, self.member = group, member
        self.tail = DynamicLayer()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seen == 0:  # the prompt: attended whole in this pass, factorised when the group is complete
            self.seen = key_states.shape[-2]
            self.group.add_prompt(self.member, key_states, value_states)
            return key_states, value_states
        if self.group.keys is None:
            raise RuntimeError(f"XKVCache: layer group {self.group.layers} has not factorised its prompt; every "
                               "layer of a group must run in the prompt's forward pass")
        self.seen += key_states.shape[-2]
        old_keys, old_values = self.group.restored(self.member)
        tail_keys, tail_values = self.tail.update(key_states, value_states)
        return torch.cat([old_keys, tail_keys], dim=-2), torch.cat([old_values, tail_values], dim=-2)

    def nbytes(self) -> int:
        return layer_bytes(self.tail)


class XKVCache(Cache):
    def __init__(self, num_layers: int, key_rank: int, value_rank: int, group_size: int = DEFAULT_GROUP_SIZE,
                 start_layer: int = 0, rotary=None) -> None:
        for name, value, low in (("key_rank", key_rank, 1), ("value_rank", value_rank, 1),
                                 ("group_size", group_size, 1), ("start_layer", start_layer, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if start_layer >= num_layers:
            raise ValueError(f"start_layer={start_layer} must be below the model's {num_layers} layers")
        self.key_rank, self.value_rank = key_rank, value_rank
        self.group_size, self.start_layer = group_size, start_layer
        layers: list[CacheLayerMixin] = [DynamicLayer() for _ in range(num_layers)]
        self.groups: list[LayerGroup] = []
        for first in range(start_layer, num_layers, group_size):
            members = tuple(range(first, min(first + group_size, num_layers)))
            group = LayerGroup(members, key_rank, value_rank, rotary)
            self.groups.append(group)
            for i, layer in enumerate(members):
                layers[layer] = GroupLayer(group, i)
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model, key_rank: int, value_rank: int, group_size: int = DEFAULT_GROUP_SIZE,
                  start_layer: int = 0, pre_rope: bool = True) -> "XKVCache":
        """The cache for `model`; `pre_rope=True` factorises keys before RoPE (needs a rotary embedding
        with transformers' Llama pairing over the whole head, checked on the model's own code)."""
        config = full_attention_config(model, "XKVCache")
        rotary = _llama_rotary(model, config) if pre_rope else None
        return cls(config.num_hidden_layers, key_rank, value_rank, group_size, start_layer, rotary)

    def kv_bytes(self) -> int:
        """Bytes of every tensor held: uncompressed layers' KV, factors and bases, later tokens."""
        return sum(g.nbytes() for g in self.groups) + sum(
            layer.nbytes() if isinstance(layer, GroupLayer) else layer_bytes(layer) for layer in self.layers)

    def ranks(self) -> list[tuple[int, int]]:
        """(key rank, value rank) each group used (after capping at its tokens and width)."""
        return [(g.keys.rank, g.values.rank) for g in self.groups if g.keys is not None]


def _llama_rotary(model, config):
    """The model's rotary embedding, after checking that its attention rotates keys the way
    `rotate` does (features p and p + D/2 paired, over the whole head)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)
    layers = getattr(decoder, "layers", None)
    if rotary is None or not layers:
        raise ValueError(f"{type(model).__name__}: pre_rope=True needs a decoder with `rotary_emb` and `layers`; "
                         "pass pre_rope=False to factorise rotated keys")
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ValueError(f"{type(model).__name__}: partial rotary embeddings are not undone here; pass pre_rope=False")
    attention = getattr(layers[0], "self_attn", None)
    apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    head_dim = getattr(attention, "head_dim", None)
    if apply is None or not head_dim:
        raise ValueError(f"{type(model).__name__}: its attention's RoPE function was not found; pass pre_rope=False")
    generator = torch.Generator().manual_seed(0)
    param = next(model.parameters())
    x = torch.randn(1, 1, 5, head_dim, generator=generator).to(param.device, param.dtype)
    cos, sin = rotary(x, torch.arange(5, device=param.device)[None])
    _, theirs = apply(x, x, cos, sin)
    if not torch.allclose(theirs.float(), rotate(x, cos, sin).float(), atol=1e-3, rtol=1e-3):
        raise ValueError(f"{type(model).__name__}: its RoPE pairs features differently from transformers' Llama "
                         "convention; pass pre_rope=False")
    return rotary
