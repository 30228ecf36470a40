"""The blocked-matmul path for prefill query blocks against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.torch_ref import dense_attention_scores, paged_attention_blocked, prefill_attention_scores
from tests.kernels.naive import naive_paged_attention


@pytest.mark.parametrize("page_size,block_tokens", [(1, 7), (16, 32), (16, 2048), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_matches_reference(page_size, block_tokens, dtype):
    gen = torch.Generator().manual_seed(page_size + block_tokens)
    num_pages, h, hkv, d, q_len = 12, 8, 2, 16, 40
    keys = torch.randn(num_pages, hkv, page_size, d, generator=gen).to(dtype)
    values = torch.randn(num_pages, hkv, page_size, d, generator=gen).to(dtype)
    query = torch.randn(3, h, q_len, d, generator=gen)
    table = torch.stack([torch.randperm(num_pages, generator=gen)[:7] for _ in range(3)])
    counts = torch.tensor([7, 3, 0])
    last = torch.tensor([page_size, max(1, page_size // 2), page_size])
    rows = 5  # the observed rows: the last 5 queries' per-page log-sum-exp
    page_lse = torch.full((3, h, rows, table.shape[1]), float("-inf"))
    out, lse = paged_attention_blocked(query, keys, values, table, counts, last, 0.3, block_tokens=block_tokens,
                                       page_lse_out=page_lse)
    ref_out, ref_lse, ref_page = naive_paged_attention(query, keys, values, table, counts, last, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-4)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))
    for b, n in enumerate(counts.tolist()):
        torch.testing.assert_close(page_lse[b, :, :, :n].double(), ref_page[b, :, q_len - rows :, :n], atol=2e-5, rtol=2e-4)
        assert torch.all(torch.isneginf(page_lse[b, :, :, n:]))  # past the sequence's pages: untouched


def test_blocked_page_lse_stays_exact_for_pages_far_below_the_best():
    """A page ~400 nats below a row's best key underflows a shift by the row's maximum; its
    page_lse still comes out finite and exact (the block is redone shifted per page)."""
    gen = torch.Generator().manual_seed(3)
    page_size, h, hkv, d = 4, 2, 1, 8
    keys = torch.randn(3, hkv, page_size, d, generator=gen)
    values = torch.randn(3, hkv, page_size, d, generator=gen)
    query = torch.randn(1, h, 2, d, generator=gen)
    direction = query[0, 0, -1] / query[0, 0, -1].norm()
    keys[0] += 40.0 * direction  # page 0 far above, page 2 far below for the observed row
    keys[2] -= 40.0 * direction
    table, counts, last = torch.tensor([[0, 1, 2]]), torch.tensor([3]), torch.tensor([page_size])
    page_lse = torch.full((1, h, 1, 3), float("-inf"))
    paged_attention_blocked(query, keys, values, table, counts, last, 1.0, page_lse_out=page_lse)
    _, _, ref_page = naive_paged_attention(query, keys, values, table, counts, last, 1.0)
    assert float(ref_page[0, 0, -1, 0] - ref_page[0, 0, -1, 2]) > 200  # the case is what it claims
    assert bool(torch.isfinite(page_lse).all())
    torch.testing.assert_close(page_lse.double()[0, :, 0], ref_page[0, :, -1], atol=1e-3, rtol=2e-5)


@pytest.mark.parametrize("prefix,q_len", [(0, 2), (0, 37), (5, 16), (33, 40)])
@pytest.mark.parametrize("seen", ["all", "some", "none"])
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_attention_matches_the_masked_path(prefix, q_len, seen, batch):
    """A chunk's own keys causal (flash in causal mode) and earlier keys seen by every row or by
    none: the same out, lse and observed-row scores as the masked computation."""
    gen = torch.Generator().manual_seed(prefix + q_len)
    h, hkv, d, rows = 8, 2, 16, 5
    kv_len = prefix + q_len
    query = torch.randn(batch, h, q_len, d, generator=gen)
    keys = torch.randn(batch, hkv, kv_len, d, generator=gen)
    values = torch.randn(batch, hkv, kv_len, d, generator=gen)
    earlier = {"all": torch.ones(batch, prefix, dtype=torch.bool), "none": torch.zeros(batch, prefix, dtype=torch.bool),
               "some": torch.rand(batch, prefix, generator=gen) < 0.5}[seen]
    own = torch.ones(q_len, q_len, dtype=torch.bool).tril().expand(batch, -1, -1)
    visible = torch.cat([earlier[:, None, :].expand(-1, q_len, -1), own], dim=2)
    out, lse, scores = prefill_attention_scores(query, keys, values, earlier, 0.3, rows)
    ref_out, ref_lse, ref_scores = dense_attention_scores(query, keys, values, visible, 0.3, score_rows=rows)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=2e-4)
