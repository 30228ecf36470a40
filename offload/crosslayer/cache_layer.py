"""`CountedLayer`: the transformers cache-layer boilerplate MiniCache and xKV share.

A layer of a cache that stores KV in another form than one tensor per layer (merged pairs,
factorised groups): it counts the tokens it has seen for transformers' masks and sequence
lengths, and refuses what a transformed representation cannot do (beam reordering, cropping,
resetting). Subclasses implement `update`.
"""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin


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
