"""Exact merge of partial attention results by log-sum-exp.

Each part attended a disjoint set of keys and returned `out` (softmax-weighted values over its
keys) and `lse` (log of the sum of exp(scores) over its keys, -inf for no keys). The merge is
    lse = logaddexp(lse_a, lse_b);   out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
which equals attention over the union of the keys. Rows where both parts are empty give out = 0
and lse = -inf, never NaN.
"""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results. out_*: [..., D] float32, lse_*: [...] float32."""
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) is NaN: rows empty in both parts get weight 0 instead.
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    out = w_a.unsqueeze(-1) * out_a + w_b.unsqueeze(-1) * out_b
    return out, lse
