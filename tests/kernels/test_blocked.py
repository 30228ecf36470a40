"""The blocked-matmul path for prefill query blocks against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.torch_ref import (
    page_exp_sums_torch,
    paged_attention_blocked,
    prefill_attention_scores,
)
from tests.kernels.naive import PREFILL_CASES, PREFILL_SEEN, naive_paged_attention, prefill_case

# Every page-sums kernel: torch (the reference) and the C++ one at each instruction set this CPU
# runs, with one and two threads.
PAGE_SUMS = {"torch": page_exp_sums_torch}
try:
    from offload.kernels.cpp_kernel import BEST_ISA, ISA_NAMES, page_exp_sums_cpp

    for _isa in range(BEST_ISA + 1):
        for _threads in (1, 2):
            PAGE_SUMS[f"cpp-{ISA_NAMES[_isa]}-{_threads}t"] = (
                lambda q, k, s, size, isa=_isa, threads=_threads: page_exp_sums_cpp(q, k, s, size, threads, isa))
except ImportError:  # no C++ extension: the torch reference alone
    pass


@pytest.mark.parametrize("sums", ["torch", "cpp"])
@pytest.mark.parametrize("page_size,block_tokens", [(1, 7), (16, 32), (16, 2048), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_matches_reference(page_size, block_tokens, dtype, sums):
    if sums == "cpp" and len(PAGE_SUMS) == 1:
        pytest.skip("the C++ extension is not built")
    page_sums = PAGE_SUMS["torch"] if sums == "torch" else PAGE_SUMS[f"cpp-{ISA_NAMES[BEST_ISA]}-2t"]
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
                                       page_lse_out=page_lse, page_sums=page_sums)
    ref_out, ref_lse, ref_page = naive_paged_attention(query, keys, values, table, counts, last, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-4)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))
    for b, n in enumerate(counts.tolist()):
        torch.testing.assert_close(page_lse[b, :, :, :n].double(), ref_page[b, :, q_len - rows :, :n], atol=2e-5, rtol=2e-4)
        assert torch.all(torch.isneginf(page_lse[b, :, :, n:]))  # past the sequence's pages: untouched


@pytest.mark.parametrize("sums", sorted(PAGE_SUMS))
def test_blocked_page_lse_stays_exact_for_pages_far_below_the_best(sums):
    """A page ~400 nats below a row's best key underflows a shift by the row's log-sum-exp (the
    compiled exp clamps near exp(-87) instead); its page_lse still comes out finite and exact (the
    block is redone shifted per page)."""
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
    paged_attention_blocked(query, keys, values, table, counts, last, 1.0, page_lse_out=page_lse,
                            page_sums=PAGE_SUMS[sums])
    _, _, ref_page = naive_paged_attention(query, keys, values, table, counts, last, 1.0)
    assert float(ref_page[0, 0, -1, 0] - ref_page[0, 0, -1, 2]) > 200  # the case is what it claims
    assert bool(torch.isfinite(page_lse).all())
    torch.testing.assert_close(page_lse.double()[0, :, 0], ref_page[0, :, -1], atol=1e-3, rtol=2e-5)


@pytest.mark.parametrize("prefix,q_len", PREFILL_CASES)
@pytest.mark.parametrize("seen", PREFILL_SEEN)
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_attention_matches_the_masked_path(prefix, q_len, seen, batch):
    """A chunk's own keys causal (flash in causal mode) and earlier keys seen by every row or by
    none: the same out, lse and observed-row scores as the masked computation."""
    query, keys, values, earlier, reference = prefill_case(prefix, q_len, seen, batch)
    got = prefill_attention_scores(query, keys, values, earlier, 0.3, 5)
    for value, ref in zip(got, reference):  # out, lse, scores
        torch.testing.assert_close(value, ref, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("sums", sorted(PAGE_SUMS))
@pytest.mark.parametrize("heads,rows,tokens,head_dim,page_size", [
    (1, 1, 1, 16, 16),      # one row, one key
    (2, 5, 37, 24, 16),     # rows not a multiple of 4, a partial last page, D not a multiple of 16
    (2, 128, 1000, 16, 16), # the embedded model's observed rows over many tiles
    (1, 3, 33, 3, 5),       # odd everything
    (2, 9, 300, 128, 32),
    (1, 4, 64, 8, 1),       # pages of one token
])
def test_page_exp_sums_match_the_fp64_reference(sums, heads, rows, tokens, head_dim, page_size):
    gen = torch.Generator().manual_seed(tokens + rows)
    query = torch.randn(heads, rows, head_dim, generator=gen) * head_dim ** -0.5
    keys = torch.randn(heads, tokens, head_dim, generator=gen) * 2
    scores = query.double() @ keys.double().transpose(-1, -2)
    shift = torch.logsumexp(scores, dim=-1)
    pages = -(-tokens // page_size)
    padded = torch.nn.functional.pad(scores, (0, pages * page_size - tokens), value=float("-inf"))
    ref = (padded - shift[..., None]).exp().view(heads, rows, pages, page_size).sum(-1)
    out = PAGE_SUMS[sums](query, keys, shift.float(), page_size)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-12, rtol=2e-5)


def test_page_exp_sums_kernel_follows_the_cpu_kernel_setting():
    from offload.kernels import available_kernels, page_exp_sums_kernel

    assert page_exp_sums_kernel("torch") is page_exp_sums_torch
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 50, 16, generator=gen)
    shift = torch.logsumexp(query @ keys.transpose(-1, -2), dim=-1)
    ref = page_exp_sums_torch(query, keys, shift, 16)
    for name in available_kernels():  # numba has none of its own: torch's
        torch.testing.assert_close(page_exp_sums_kernel(name, threads=1)(query, keys, shift, 16), ref, atol=1e-7, rtol=2e-5)
    with pytest.raises(ValueError, match="OFFLOAD_CPU_KERNEL"):
        page_exp_sums_kernel("fortran")


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_underflowed_pages_are_redone_exactly_in_chunks(softcap):
    """Half the pages 300 nats below the rest: each of them is recomputed over its own keys (in
    chunks smaller than their number), matching torch.logsumexp per page."""
    from offload.kernels.torch_ref import _page_lse_at, _per_page, soft_cap

    gen = torch.Generator().manual_seed(5)
    query = torch.randn(2, 6, 8, generator=gen)
    keys = torch.randn(2, 45, 8, generator=gen)  # 3 pages of 16, the last partial
    keys[:, 16:32] -= 300.0 * query.mean(dim=1, keepdim=True) / query.mean(dim=1, keepdim=True).norm(dim=-1, keepdim=True)
    scores = soft_cap(query @ keys.transpose(-1, -2), softcap)
    ref = torch.logsumexp(_per_page(scores.double(), 16, float("-inf")), dim=-1)
    where = torch.ones_like(ref, dtype=torch.bool).nonzero(as_tuple=True)
    out = _page_lse_at(query, keys, where, 16, softcap, chunk=5)
    torch.testing.assert_close(out.double(), ref[where], atol=1e-4, rtol=1e-6)
