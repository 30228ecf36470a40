"""Exact merge of partial attention results by log-sum-exp.

Each part attended a disjoint set of keys and returned `out` (softmax-weighted values over its
keys) and `lse` (log of the sum of exp(scores) over its keys, -inf for no keys). The merge is
    lse = logsumexp_i(lse_i);   out = sum_i exp(lse_i - lse) * out_i
which equals attention over the union of the keys. Rows empty in every part give out = 0 and
lse = -inf, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge any number of partial results (out [..., D] float32, lse [...] float32) in one pass.
    Returns (out, lse, weights): weights [len(parts), ...] is each part's share of each row
    (exp(lse_i - lse); 0 in rows empty in every part)."""
    if not parts:
        raise ValueError("merge_parts needs at least one partial result")
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    # exp(-inf - -inf) is NaN: rows empty in every part get weight 0 instead.
    weights = torch.exp(lses - lse).nan_to_num_(0.0)
    out = (weights.unsqueeze(-1) * torch.stack([out for out, _ in parts])).sum(dim=0)
    return out, lse, weights


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results. out_*: [..., D] float32, lse_*: [...] float32."""
    out, lse, _ = merge_parts(((out_a, lse_a), (out_b, lse_b)))
    return out, lse
