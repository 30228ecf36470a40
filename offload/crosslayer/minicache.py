"""`MiniCache`: a transformers `Cache` keeping the deeper layers' KV merged in adjacent pairs.

From `start_layer` (default: the middle layer, num_layers // 2) up, layers (s, s+1), (s+2, s+3), ...
form pairs; a last layer without a partner and the layers below `start_layer` keep their KV as
`DynamicCache` does. A pair stores its tokens once, merged (`slerp_merge.MergedStates`: one unit
direction per token and KV head, each layer's magnitude, retained outliers whole), separately for
keys and values.

Within one forward pass each layer attends its own new tokens exactly; older tokens come back from
the merged representation (restored per step). The new tokens of a pair are merged once its second
layer has run, at the end of that layer's update, so what the cache holds between forward passes
is only the merged representation. `kv_bytes()` counts the bytes of every tensor held.

This runs on the plain model (`model(..., past_key_values=MiniCache.for_model(model))` or
`model.generate(..., past_key_values=...)`), not inside offload's paged store: pages hold one layer's
K and V per token, and a merged representation (directions shared by two layers, per-layer
magnitudes, a variable set of retained vectors) is another layout. Its bytes are those this class
holds, counted the same way for every method of `offload bench crosslayer`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from offload.crosslayer.cache_layer import CountedLayer, full_attention_config, layer_bytes
from offload.crosslayer.slerp_merge import MergedStates

DEFAULT_T = 0.6
DEFAULT_GAMMA = 1.0


class MergedPair:
    """The shared store of two adjacent layers: merged keys and values, and the first layer's new
    tokens of the current forward pass until the second layer's arrive."""

    def __init__(self, t: float, gamma: float) -> None:
        self.t, self.gamma = t, gamma
        self.keys: MergedStates | None = None
        self.values: MergedStates | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # layer a's new K, V this step

    def restored(self, member: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            empty = like.new_empty(like.shape[0], like.shape[1], 0, like.shape[3])
            return empty, empty
        return self.keys.restore(member).to(like.dtype), self.values.restore(member).to(like.dtype)

    def merge(self, keys_b: torch.Tensor, values_b: torch.Tensor) -> None:
        if self.pending is None:
            raise RuntimeError("MiniCache: the second layer of a pair ran before the first in this forward pass")
        keys_a, values_a = self.pending
        self.pending = None
        if self.keys is None:
            batch, heads, _, dim = keys_a.shape
            self.keys = MergedStates.empty(batch, heads, dim, keys_a.dtype, keys_a.device)
            self.values = MergedStates.empty(batch, heads, values_a.shape[-1], values_a.dtype, values_a.device)
        self.keys.append(keys_a, keys_b, self.t, self.gamma)
        self.values.append(values_a, values_b, self.t, self.gamma)

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes() + self.values.nbytes()


class PairLayer(CountedLayer):
    """One layer of a merged pair, as transformers sees it (member 0 is the lower layer)."""

    owner = "MiniCache"

    def __init__(self, pair: MergedPair, member: int) -> None:
        super().__init__()
        self.pair, self.member = pair, member

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_keys, old_values = self.pair.restored(self.member, key_states)
        keys = torch.cat([old_keys, key_states], dim=-2)
        values = torch.cat([old_values, value_states], dim=-2)
        if self.member == 0:
            self.pair.pending = (key_states, value_states)
        else:
            self.pair.merge(key_states, value_states)
        self.seen += key_states.shape[-2]
        return keys, values


class MiniCache(Cache):
    def __init__(self, num_layers: int, start_layer: int | None = None, t: float = DEFAULT_T,
                 gamma: float = DEFAULT_GAMMA) -> None:
        start = num_layers // 2 if start_layer is None else start_layer
        if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < num_layers:
            raise ValueError(f"start_layer={start_layer!r} must be an integer in [1, {num_layers - 1}] (layer 0 "
                             "keeps its own KV: transformers reads sequence lengths from it)")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t={t!r} (SLERP weight of the deeper layer) must be in [0, 1]")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma!r} (retention threshold) must be in [0, 1]; 1 retains nothing")
        self.start_layer, self.t, self.gamma = start, t, gamma
        self.pairs: list[tuple[int, int]] = [(a, a + 1) for a in range(start, num_layers - 1, 2)]
        layers: list[CacheLayerMixin] = [DynamicLayer() for _ in range(num_layers)]
        self.merged: list[MergedPair] = []
        for a, b in self.pairs:
            pair = MergedPair(t, gamma)
            self.merged.append(pair)
            layers[a], layers[b] = PairLayer(pair, 0), PairLayer(pair, 1)
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model, **kwargs) -> "MiniCache":
        return cls(full_attention_config(model, "MiniCache").num_hidden_layers, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes of every tensor the cache holds: unmerged layers' keys and values, merged pairs'
        directions, magnitudes, retained vectors and their indices."""
        total = sum(p.nbytes() for p in self.merged)
        return total + sum(layer_bytes(layer) for layer in self.layers if isinstance(layer, DynamicLayer))

    def retained_share(self) -> float:
        """Share of merged vectors (keys and values, all pairs) kept unmerged."""
        merged = [s for p in self.merged if p.keys is not None for s in (p.keys, p.values)]
        total = sum(s.num_tokens * s.direction.shape[0] * s.direction.shape[1] for s in merged)
        return sum(s.num_retained for s in merged) / total if total else 0.0
