"""Quest's page selection: an upper bound of q.k over a page from the page's key min/max."""

from __future__ import annotations

import torch

from offload.policies.base import PageSelector


def page_upper_bounds(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k for every page, maximised over query heads, query rows and KV heads.

    query:   [B, H, Q, D]
    key_min: [B, P, H_kv, D], key_max: [B, P, H_kv, D]  (element-wise min / max of the page's keys)
    Returns  [B, P] float32.
    Since max(q*lo, q*hi) = relu(q)*hi + min(q, 0)*lo per dimension, the bound is two matmuls.
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key_min.shape[2]
    q = query.float().reshape(bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim)
    hi = key_max.float().permute(0, 2, 3, 1)  # [B, Hkv, D, P]
    lo = key_min.float().permute(0, 2, 3, 1)
    bound = torch.matmul(q.clamp(min=0), hi) + torch.matmul(q.clamp(max=0), lo)  # [B, Hkv, G*Q, P]
    return bound.amax(dim=(1, 2))


class QuestSelector(PageSelector):
    name = "quest"

    def score(self, query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
        return page_upper_bounds(query, key_min, key_max)
