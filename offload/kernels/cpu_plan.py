"""What the compiled CPU kernels (Numba, C++) share: argument checks and conversion to plain
buffers, and the work split.

Work split. One work item is (sequence b, a group of KV heads, a range of that sequence's pages).
Within an item the pages are walked in order and, for each page, every KV head of the group:
so a page's rows for those heads are read as one contiguous block, and each KV head's G query
heads x Q rows form the tile that reuses every key and value row once it is loaded. The head
group is as wide as the accumulators allow (`ACC_BYTES`, so they stay in L2 even for chunked
prefill with Q = 512), and page ranges are split (flash-decoding, split-K) until there are
`ITEMS_PER_THREAD` items per thread, so one long sequence keeps every core busy (one thread
never splits: there is nothing to balance, and the merge would be pure cost). Each item
writes an unnormalised partial (running max m, sum l, accumulator); a second pass merges the
splits by log-sum-exp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

ACC_BYTES = 256 * 1024  # accumulators of one item (heads x Q x D float32): well inside L2
ITEMS_PER_THREAD = 4  # enough items that unequal rows still balance over the threads
MIN_PAGES_PER_SPLIT = 4  # below this the merge costs more than the split gains
SPLIT_TOKENS_PER_ROW = 4  # and a split reads at least this many tokens per query row (see plan_split)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Split:
    heads_per_item: int  # KV heads per work item
    num_head_groups: int  # ceil(H_kv / heads_per_item)
    num_splits: int  # page ranges per (sequence, head group)


def plan_split(bsz: int, num_kv_heads: int, group_rows: int, head_dim: int, max_used_pages: int, threads: int,
               page_size: int) -> Split:
    """Choose the work split; group_rows = G * Q query rows per KV head. A split reads at least
    MIN_PAGES_PER_SPLIT pages and at least SPLIT_TOKENS_PER_ROW tokens per query row: its partial
    accumulators (group_rows x D floats per KV head, zeroed, written, merged) must stay small next
    to the KV it reads, which many query rows (Q = 16) over a short context would not."""
    per_head_bytes = group_rows * head_dim * 4
    heads = max(1, min(num_kv_heads, ACC_BYTES // max(per_head_bytes, 1)))
    groups = -(-num_kv_heads // heads)
    items = bsz * groups
    want = threads * ITEMS_PER_THREAD
    min_pages = max(MIN_PAGES_PER_SPLIT, -(-SPLIT_TOKENS_PER_ROW * group_rows // page_size))
    splits = 1
    if threads > 1 and items < want and max_used_pages > min_pages:
        splits = min(-(-want // items), max(1, max_used_pages // min_pages))
    return Split(heads, groups, splits)


def as_kv_array(pages: torch.Tensor) -> np.ndarray:
    """KV pages as a numpy view, no copy: float32 stays float32, fp16/bf16 become their uint16 bits."""
    if pages.dtype == torch.float32:
        return pages.numpy()
    return pages.view(torch.int16).numpy().view(np.uint16)


def check_cpu_buffers(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_lse_out: torch.Tensor | None,
    max_pages: int,
) -> None:
    """What the compiled kernels need beyond the shared contract: CPU memory, contiguous pages
    (copying a whole KV cache to make it contiguous would cost more than the attention)."""
    for name, t in (("query", query), ("key_pages", key_pages), ("value_pages", value_pages)):
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be in CPU memory for the CPU kernels; got device {t.device}")
    for name, t in (("key_pages", key_pages), ("value_pages", value_pages)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [num_pages, H_kv, page_size, D]; got strides {t.stride()}")
    if page_lse_out is not None:
        bsz, num_heads, q_len, _ = query.shape
        want = (bsz, num_heads, q_len, max_pages)
        if tuple(page_lse_out.shape) != want or page_lse_out.dtype != torch.float32:
            raise ValueError(
                f"page_lse_out must be float32 {list(want)}; got {page_lse_out.dtype} {list(page_lse_out.shape)}"
            )
        if not page_lse_out.is_contiguous() or page_lse_out.device.type != "cpu":
            raise ValueError("page_lse_out must be a contiguous CPU tensor")


def index_arrays(page_table: torch.Tensor, num_pages: torch.Tensor, last_page_len: torch.Tensor):
    """Page table and lengths as contiguous int64 numpy arrays (small: copied if needed)."""
    return _int64_array(page_table), _int64_array(num_pages), _int64_array(last_page_len)


def _int64_array(t: torch.Tensor) -> np.ndarray:
    """t as a contiguous int64 numpy array, without a copy when it is one already (the common case:
    these are asked for in every decode step's kernel calls)."""
    if t.dtype != torch.int64 or t.device.type != "cpu" or t.requires_grad or not t.is_contiguous():
        t = t.detach().to(device="cpu", dtype=torch.int64).contiguous()
    return t.numpy()
