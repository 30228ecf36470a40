"""Slow, obvious reference for the paged kernels: gather each row's pages into contiguous K/V,
then softmax in float64. Shapes as in `offload.kernels.paged_attention`."""

from __future__ import annotations

import math

import torch


def naive_paged_attention(query, key_pages, value_pages, page_table, num_pages, last_page_len, scale, causal=False,
                          softcap=None):
    """Returns out [B, H, Q, D], lse [B, H, Q], page_lse [B, H, Q, max_pages] (NaN past
    num_pages), all float64. softcap: scores become softcap * tanh(score / softcap)."""
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads, page_size = key_pages.shape[1], key_pages.shape[2]
    group = num_heads // num_kv_heads
    max_pages = page_table.shape[1]
    out = torch.zeros(bsz, num_heads, q_len, head_dim, dtype=torch.float64)
    lse = torch.full((bsz, num_heads, q_len), -math.inf, dtype=torch.float64)
    page_lse = torch.full((bsz, num_heads, q_len, max_pages), math.nan, dtype=torch.float64)
    for b in range(bsz):
        n = int(num_pages[b])
        if n == 0:
            continue
        kv_len = (n - 1) * page_size + int(last_page_len[b])
        # pages are [H_kv, S, D]: token t of a page is page[:, t]
        keys = torch.cat([key_pages[int(p)].transpose(0, 1) for p in page_table[b, :n]]).double()[:kv_len]  # [T, H_kv, D]
        values = torch.cat([value_pages[int(p)].transpose(0, 1) for p in page_table[b, :n]]).double()[:kv_len]
        for h in range(num_heads):
            k, v = keys[:, h // group], values[:, h // group]
            for i in range(q_len):
                visible = kv_len - q_len + i + 1 if causal else kv_len
                scores = (k @ query[b, h, i].double()) * scale
                if softcap:
                    scores = softcap * torch.tanh(scores / softcap)
                for p in range(n):
                    lo, hi = p * page_size, min((p + 1) * page_size, kv_len, max(visible, 0))
                    page_lse[b, h, i, p] = torch.logsumexp(scores[lo:hi], 0) if hi > lo else -math.inf
                if visible <= 0:
                    continue
                s = scores[:visible]
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[:visible]
    return out, lse, page_lse


PREFILL_CASES = [(0, 2), (0, 37), (5, 16), (33, 40)]  # (earlier keys, chunk length)
PREFILL_SEEN = ["all", "some", "none"]


def prefill_case(prefix: int, q_len: int, seen: str, batch: int, rows: int = 5):
    """A prefill chunk for `prefill_attention_scores`: query, keys, values, which earlier keys every
    row sees (`seen`: all, some or none of them), and the masked computation's (out, lse, scores of
    the last `rows` rows) as the reference."""
    from offload.kernels.torch_ref import dense_attention_scores

    gen = torch.Generator().manual_seed(prefix + q_len)
    h, hkv, d = 8, 2, 16
    kv_len = prefix + q_len
    query = torch.randn(batch, h, q_len, d, generator=gen)
    keys = torch.randn(batch, hkv, kv_len, d, generator=gen)
    values = torch.randn(batch, hkv, kv_len, d, generator=gen)
    earlier = {"all": torch.ones(batch, prefix, dtype=torch.bool), "none": torch.zeros(batch, prefix, dtype=torch.bool),
               "some": torch.rand(batch, prefix, generator=gen) < 0.5}[seen]
    own = torch.ones(q_len, q_len, dtype=torch.bool).tril().expand(batch, -1, -1)
    visible = torch.cat([earlier[:, None, :].expand(-1, q_len, -1), own], dim=2)
    reference = dense_attention_scores(query, keys, values, visible, 0.3, score_rows=rows)
    return query, keys, values, earlier, reference
