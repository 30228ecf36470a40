"""What MiniCache and xKV share as transformers caches: `CountedLayer` (the cache-layer
boilerplate), `full_attention_config` (the model check) and `layer_bytes`.

A layer of a cache that stores KV in another form than one tensor per layer (merged pairs,
factorised groups): it counts the tokens it has seen for transformers' masks and sequence
lengths, and refuses what a transformed representation cannot do (beam reordering, cropping,
resetting). Subclasses implement `update`.
"""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin

from offload.hf.layers import text_config


def full_attention_config(model, cache_name: str):
    """The model's decoder config, after checking that every layer is a full-attention layer."""
    config = text_config(model.config)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"{cache_name} handles full-attention layers only; this model has layer types {sorted(kinds)}")
    return config


def layer_bytes(layer: CacheLayerMixin) -> int:
    """Bytes of a transformers `DynamicLayer`'s keys and values (0 before its first update)."""
    if not layer.is_initialized:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


class CountedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = False
    owner = "this cache"  # named in the refusals

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(f"{self.owner} does not reorder its transformed KV (beam search)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(f"{self.owner} cannot crop its transformed KV")

    def reset(self) -> None:
        raise NotImplementedError(f"{self.owner} cannot be reset; create a new one")
