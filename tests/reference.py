"""Slow, obvious references the fast paths are compared with."""

from __future__ import annotations

import torch


def naive_attention(query, keys, values, visible, scale):
    """fp64 softmax attention. query [B, H, Q, D]; keys/values [B, H_kv, T, D]; visible [B, Q, T].

    Rows with no visible key give zeros."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhtd->bhqt", query.double(), k) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqt,bhtd->bhqd", probs, v)
