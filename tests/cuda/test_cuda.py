"""The CUDA paths on a real GPU: pinned host pools, copies on side streams timed by CUDA events,
asynchronous home copies, the host part on a worker thread, prefetch, exactness against the
unwrapped model on the same device. Skipped where no CUDA device exists (CI, these machines);
run on a GPU machine with `pytest tests/cuda`."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from tests.conftest import FAMILIES, make_batch, tiny_model
from tests.kernels.naive import PREFILL_CASES, PREFILL_SEEN, prefill_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
NEW = 8


def _model(family: str = "llama-gqa", dtype: torch.dtype = torch.float32):
    return tiny_model(family, dtype).to(CUDA)


def _batch(batch_size: int, length: int, seed: int = 0):
    ids, mask = make_batch(batch_size, length, seed)
    return ids.to(CUDA), mask.to(CUDA)


def _wrap(model, batch_size: int, max_tokens: int, factor: int = 1, **kw) -> OffloadedModel:
    kw.setdefault("page_size", 16)
    kw.setdefault("sink_tokens", 4)
    kw.setdefault("recent_tokens", 32)
    om = OffloadedModel(model, prefill_chunk=128, **kw)
    om.config.device_budget = factor * om.minimum_device_budget(batch_size, max_tokens)
    return om


def _greedy(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _check_budget(om: OffloadedModel) -> None:
    stats = om.stats
    assert 0 < stats.device_peak_bytes <= stats.device_budget_bytes
    assert stats.device_reserved_bytes <= stats.device_budget_bytes


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("length", [1, 17, 300])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_forward_logits_match_on_cuda(family, length, batch_size):
    model = _model(family)
    ids, mask = _batch(batch_size, length)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    with _wrap(model, batch_size, length) as om:
        out = om(ids, attention_mask=mask).logits
        _check_budget(om)
        if length >= 300:
            assert om.stats.pages_resident < om.stats.pages_total, "the host part must be exercised"
    assert out.device == ids.device
    real = mask.bool()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=2e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_tokens_match_on_cuda(family, batch_size):
    model = _model(family)
    ids, mask = _batch(batch_size, 300, seed=1)
    ref = _greedy(model, ids, mask)
    with _wrap(model, batch_size, 300 + NEW) as om:
        out = _greedy(om, ids, mask)
        _check_budget(om)
        stats = om.stats
    assert torch.equal(out, ref)
    # Pages crossed the link both ways, on the copy streams, timed by CUDA events.
    assert stats.d2h_bytes > 0 and stats.d2h_link_s > 0 and stats.d2h_gbps > 0
    assert stats.failed_copies == 0 and stats.failed_home_copies == 0 and stats.failed_kernels == 0


def test_host_pools_are_pinned_and_device_pools_on_cuda():
    model = _model()
    ids, mask = _batch(2, 200)
    om = _wrap(model, 2, 200 + NEW)
    try:
        cache = om.new_cache(2, 200 + NEW)
        with torch.no_grad():
            om(ids, attention_mask=mask, past_key_values=cache)
        store = om._store()
        for home in store.homes:
            assert home.host.keys.is_pinned() and home.host.values.is_pinned()
        table = cache.request.tables[0]
        assert table.device_pool.keys.device.type == "cuda"
    finally:
        om.unwrap()


@pytest.mark.parametrize("mode", ["exact", "sparse"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_prefetch_on_cuda(mode, prefetch):
    """Exact mode gives the unwrapped model's tokens with and without speculation; sparse mode
    runs within its budget; promotions travel as coalesced host->device copies."""
    model = _model()
    ids, mask = _batch(2, 400, seed=11)
    ref = _greedy(model, ids, mask)
    kw = dict(page_size=8, sink_tokens=8, recent_tokens=16, token_budget=64, sticky_margin=0.0)
    with _wrap(model, 2, 400 + NEW, factor=3, mode=mode, prefetch=prefetch, **kw) as om:
        out = _greedy(om, ids, mask)
        _check_budget(om)
        stats = om.stats
    if mode == "exact":
        assert torch.equal(out, ref)
    assert out.shape == ref.shape
    if prefetch:
        assert stats.prefetch_issued_pages > 0
    if stats.h2d_bytes:
        assert stats.h2d_transfers > 0 and stats.h2d_link_s > 0 and stats.h2d_gbps > 0
    assert stats.failed_copies == 0 and stats.failed_kernels == 0


def test_bf16_on_cuda_agrees():
    model = _model("llama-gqa", torch.bfloat16)
    ids, mask = _batch(3, 300, seed=5)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.argmax(-1)
    with _wrap(model, 3, 300) as om:
        out = om(ids, attention_mask=mask).logits.argmax(-1)
        _check_budget(om)
    real = mask.bool()
    assert (out[real] == ref[real]).float().mean().item() >= 0.99


@pytest.mark.parametrize("kernel", ["torch", "numba", "cpp"])
def test_host_kernels_on_cuda(kernel):
    """Each CPU kernel runs the host part of a CUDA model (queries copied to the host, partial
    results back), with identical tokens."""
    from offload.kernels import available_kernels

    if kernel not in available_kernels():
        pytest.skip(f"the {kernel} kernel is not available here")
    model = _model()
    ids, mask = _batch(2, 300, seed=3)
    ref = _greedy(model, ids, mask)
    with _wrap(model, 2, 300 + NEW, cpu_kernel=kernel) as om:
        out = _greedy(om, ids, mask)
        assert om.stats.host_attn_s > 0
    assert torch.equal(out, ref)


def test_prefix_reuse_on_cuda():
    """A second prompt sharing a prefix reuses its pages (host copies pinned) and stays exact."""
    model = _model()
    ids, mask = _batch(1, 256, seed=4)
    longer = torch.cat([ids, ids[:, :40]], dim=1)
    ref = _greedy(model, longer, torch.ones_like(longer))
    with _wrap(model, 1, 300 + NEW, prefix_cache=True) as om:
        _greedy(om, ids, mask)
        out = _greedy(om, longer, torch.ones_like(longer))
    assert torch.equal(out, ref)


def test_memory_returns_after_close():
    model = _model()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ids, mask = _batch(2, 300)
    om = _wrap(model, 2, 300 + NEW)
    _greedy(om, ids, mask)
    om.unwrap()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 1024 * 1024


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_prefill_block_over_host_pages_computed_on_the_gpu(softcap, num_kv_heads):
    """A prefill block's host part computed on the GPU (pages gathered on the host, copied block
    by block) equals the CPU's: out, lse and the observed rows' per-page log-sum-exp."""
    from offload.kernels import torch_ref
    from offload.store.tiers import attend_pages

    gen = torch.Generator().manual_seed(0)
    page_size, head_dim, heads, q_len, observe = 16, 32, 4, 37, 5
    keys = torch.randn(40, num_kv_heads, page_size, head_dim, generator=gen).pin_memory()
    values = torch.randn(40, num_kv_heads, page_size, head_dim, generator=gen).pin_memory()
    query = torch.randn(2, heads, q_len, head_dim, generator=gen)
    table = torch.tensor([[3, 7, 1, 30, 12, 5, 9, -1], [0, 2, 4, 6, 8, 10, 39, 38]])
    counts = torch.tensor([7, 8])
    ref = attend_pages(query, keys, values, table, counts, 0.2, observe, softcap, kernel="torch")
    old = torch_ref.BLOCK_BYTES
    torch_ref.BLOCK_BYTES = 3 * page_size * 2 * num_kv_heads * head_dim * 4  # three pages a block
    try:
        got = attend_pages(query.to(CUDA), keys, values, table, counts, 0.2, observe, softcap, kernel="torch",
                           device=CUDA)
    finally:
        torch_ref.BLOCK_BYTES = old
    assert got.out.device.type == "cuda"
    torch.testing.assert_close(got.out.cpu(), ref.out, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.lse.cpu(), ref.lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.page_lse, ref.page_lse, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prefix,q_len", PREFILL_CASES)
@pytest.mark.parametrize("seen", PREFILL_SEEN)
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_attention_on_the_gpu_matches_the_masked_path(prefix, q_len, seen, batch):
    """A prefill chunk's device part on the GPU (causal fused kernel for its own keys, earlier keys
    merged by log-sum-exp) equals the masked computation on the CPU."""
    from offload.kernels.torch_ref import prefill_attention_scores

    query, keys, values, earlier, reference = prefill_case(prefix, q_len, seen, batch)
    got = prefill_attention_scores(query.to(CUDA), keys.to(CUDA), values.to(CUDA), earlier.to(CUDA), 0.3, 5)
    for value, ref in zip(got, reference):  # out, lse, scores
        torch.testing.assert_close(value.cpu(), ref, atol=2e-5, rtol=2e-4)


def test_a_refused_fused_kernel_falls_back_to_matmuls(monkeypatch):
    """Where the GPU's memory-efficient kernel refuses a block (a head size it lacks), the prefill
    paths compute it with matmuls: the same result as the CPU."""
    from offload.kernels import torch_ref

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for this shape")

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    ref = torch_ref._fused_rows(q, k, v, True, 0.25)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", refuse)
    out, lse = torch_ref._fused_rows(q.to(CUDA), k.to(CUDA), v.to(CUDA), True, 0.25)
    torch.testing.assert_close(out.cpu(), ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref[1], rtol=0, atol=1e-5)
