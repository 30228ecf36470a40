"""`KVLayout`: the shape facts every store part needs, and the byte sizes derived from them.

Pages are head-major, `[H_kv, page_size, D]`: token t of a page is `page[:, t]`, and
`page_tokens` turns pages back into tokens in order."""

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
        return self.dtype.itemsize

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """One page of keys (or values): [H_kv, page_size, D], head-major: each KV head's tokens
        are one contiguous block, so a kernel reads every block front to back."""
        return (self.num_kv_heads, self.page_size, self.head_dim)

    def to_pages(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [n * page_size, H_kv, D] -> n whole pages [n, H_kv, page_size, D] (a copy)."""
        pages = tokens.reshape(-1, self.page_size, self.num_kv_heads, self.head_dim)
        return pages.transpose(1, 2).contiguous()

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


def page_tokens(pages: torch.Tensor) -> torch.Tensor:
    """Pages [..., n, H_kv, page_size, D] -> their tokens in order [..., n * page_size, H_kv, D]."""
    *lead, n, num_kv_heads, page_size, head_dim = pages.shape
    return pages.transpose(-2, -3).reshape(*lead, n * page_size, num_kv_heads, head_dim)
