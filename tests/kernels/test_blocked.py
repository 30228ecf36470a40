"""The blocked-matmul path for prefill query blocks against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.torch_ref import paged_attention_blocked
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
    out, lse = paged_attention_blocked(query, keys, values, table, counts, last, 0.3, block_tokens=block_tokens)
    ref_out, ref_lse, _ = naive_paged_attention(query, keys, values, table, counts, last, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-4)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))
