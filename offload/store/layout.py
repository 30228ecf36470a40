"""`KVLayout`: the shape facts every store part needs, and the byte sizes derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """One page of keys (or values): [page_size, H_kv, D]."""
        return (self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Keys + values of one page."""
        return 2 * self.page_size * self.num_kv_heads * self.head_dim * self.elem_bytes

    @property
    def summary_bytes(self) -> int:
        """Key min + key max of one page (Quest summary), all KV heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.elem_bytes

    def num_pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
