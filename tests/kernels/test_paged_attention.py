"""Every paged kernel (torch, Numba, C++ in each ISA this CPU runs) against the float64 gather
reference in naive.py, on awkward sizes. Shapes are few on purpose: each new dtype/layout is a
Numba compile (cached on disk after the first run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.naive import naive_paged_attention
from offload.kernels import available_kernels, merge_partials, paged_attention, resolve_kernel
from offload.kernels.merge import merge_parts
from offload.kernels.cpu_plan import plan_split

# The kernels read 16-bit pages exactly and accumulate in float32; the reference is float64 over
# the same rounded values, so only float32 rounding remains (softmax-weighted sums of N(0,1)).
ATOL, RTOL = 2e-5, 2e-4

VARIANTS = [k for k in available_kernels()]
if "cpp" in VARIANTS:
    from offload.kernels.cpp_kernel import BEST_ISA, ISA_NAMES, paged_attention_cpp

    VARIANTS += [f"cpp-{ISA_NAMES[i]}" for i in range(BEST_ISA)]  # the lower ISAs, forced


def run(variant, *args, **kwargs):
    if variant.startswith("cpp-"):
        isa = {v: k for k, v in ISA_NAMES.items()}[variant[4:]]
        return paged_attention_cpp(*args, isa=isa, **kwargs)
    return paged_attention(*args, kernel=variant, **kwargs)


def make_case(page_size, num_heads, num_kv_heads, q_len, head_dim, lengths, dtype, seed=0):
    """Pages of every row scattered (shuffled) in one pool, plus a spare unused page."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // page_size) for n in lengths]
    total = sum(counts) + 1
    shape = (total, num_kv_heads, page_size, head_dim)
    key_pages = torch.randn(shape, generator=gen).to(dtype)
    value_pages = torch.randn(shape, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen)
    max_pages = max(max(counts), 1) + 1  # one unused column: must be ignored
    page_table = torch.full((len(lengths), max_pages), 10**6, dtype=torch.int32)
    start = 0
    for b, c in enumerate(counts):
        page_table[b, :c] = perm[start : start + c]
        start += c
    num_pages = torch.tensor(counts)
    last = torch.tensor([n - (c - 1) * page_size if c else 0 for n, c in zip(lengths, counts)])
    query = torch.randn(len(lengths), num_heads, q_len, head_dim, generator=gen)
    return query, key_pages, value_pages, page_table, num_pages, last


CASES = {  # name: (page_size, H, H_kv, Q, D, lengths, dtype, causal)
    "page1-mha-fp32": (1, 4, 4, 1, 16, [5, 1], torch.float32, False),
    "page16-gqa4-bf16-causal": (16, 8, 2, 4, 32, [37, 16, 1, 20], torch.bfloat16, True),
    "page64-mqa8-fp16-causal-q16": (64, 8, 1, 16, 64, [200, 64, 9], torch.float16, True),
    "page16-gqa8-empty-row-fp32": (16, 16, 2, 1, 32, [0, 50], torch.float32, False),
    "page16-odd-dim-bf16": (16, 4, 1, 3, 24, [33], torch.bfloat16, False),
    "page16-long-split-fp16": (16, 4, 1, 2, 32, [1000, 17], torch.float16, True),
    "page16-long-split-q16-bf16": (16, 8, 2, 16, 32, [1500, 40], torch.bfloat16, True),
}


def check(variant, case, with_page_lse=True, threads=None):
    page_size, heads, kv_heads, q_len, head_dim, lengths, dtype, causal = CASES[case]
    args = make_case(page_size, heads, kv_heads, q_len, head_dim, lengths, dtype)
    scale = head_dim**-0.5
    ref_out, ref_lse, ref_page_lse = naive_paged_attention(*args, scale, causal=causal)
    page_lse = torch.full((len(lengths), heads, q_len, args[3].shape[1]), 7.0) if with_page_lse else None
    out, lse = run(variant, *args, scale, causal=causal, page_lse_out=page_lse, threads=threads)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)  # -inf where empty
    if with_page_lse:
        listed = ~ref_page_lse.isnan()
        torch.testing.assert_close(page_lse.double()[listed], ref_page_lse[listed], atol=ATOL, rtol=RTOL)
        assert bool((page_lse[~listed] == 7.0).all()), "entries past num_pages must be left alone"
    return out, lse


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, case):
    check(variant, case)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_dtype(variant, dtype):
    args = make_case(16, 8, 2, 4, 32, [37, 16, 1, 20], dtype, seed=1)
    ref_out, ref_lse, _ = naive_paged_attention(*args, 0.2, causal=True)
    out, lse = run(variant, *args, 0.2, causal=True)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "page_size,heads,kv_heads,q_len,head_dim,lengths,causal",
    [
        (16, 8, 2, 1, 64, [37, 1, 16], False),  # head_dim % 32 == 0: bf16 dot products on AVX512-BF16
        (16, 32, 8, 16, 128, [300, 5], True),  # Llama layout, a query block, odd key counts
        (16, 4, 1, 3, 48, [33], True),  # head_dim % 32 != 0: the float32 path
    ],
)
def test_bf16_query_and_pages(variant, page_size, heads, kv_heads, q_len, head_dim, lengths, causal):
    """A bf16 model's query is exactly bf16: the C++ kernel then multiplies bf16 pairs with
    vdpbf16ps (exact products, float32 sums), so the float32 tolerances still hold."""
    args = list(make_case(page_size, heads, kv_heads, q_len, head_dim, lengths, torch.bfloat16, seed=3))
    args[0] = args[0].to(torch.bfloat16)
    scale = head_dim**-0.5
    ref_out, ref_lse, ref_page_lse = naive_paged_attention(*args, scale, causal=causal)
    page_lse = torch.full((len(lengths), heads, q_len, args[3].shape[1]), 7.0)
    out, lse = run(variant, *args, scale, causal=causal, page_lse_out=page_lse, threads=2, softcap=None)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)
    listed = ~ref_page_lse.isnan()
    torch.testing.assert_close(page_lse.double()[listed], ref_page_lse[listed], atol=ATOL, rtol=RTOL)
    capped, _ = run(variant, *args, scale, causal=causal, threads=1, softcap=2.0)
    ref_capped, _, _ = naive_paged_attention(*args, scale, causal=causal, softcap=2.0)
    torch.testing.assert_close(capped.double(), ref_capped, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "torch"])
@pytest.mark.parametrize("case", ["page16-long-split-fp16", "page16-long-split-q16-bf16"])
def test_thread_counts_and_splits_agree(variant, case):
    """One long sequence is split over page ranges (split-K); results do not depend on it."""
    page_size, heads, kv_heads, q_len, _, lengths, _, _ = CASES[case]
    assert plan_split(1, kv_heads, heads // kv_heads * q_len, 32, -(-lengths[0] // page_size), threads=2,
                      page_size=page_size).num_splits > 1
    a = check(variant, case, threads=1)
    b = check(variant, case, threads=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_split_plan():
    """One thread never splits; a split reads at least 4 pages and 4 tokens per query row."""
    assert plan_split(1, 8, 4, 128, 2048, threads=1, page_size=16).num_splits == 1
    assert plan_split(1, 8, 4, 128, 2048, threads=2, page_size=16).num_splits == 8  # 4 items per thread
    assert plan_split(1, 8, 64, 128, 64, threads=2, page_size=16).num_splits == 4  # 16 pages = 4 x 64 rows
    assert plan_split(1, 8, 4, 128, 6, threads=2, page_size=16).num_splits == 1  # too short to split
    assert plan_split(8, 8, 4, 128, 2048, threads=2, page_size=16).num_splits == 1  # 8 items already


def test_page_lse_is_optional():
    for variant in VARIANTS:
        check(variant, "page16-gqa4-bf16-causal", with_page_lse=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parts_merge_to_the_whole(variant):
    """Attending pages [0, k) and [k, n) separately and merging equals attending all n; an empty
    part (lse = -inf) merges as the identity."""
    query, kp, vp, table, counts, last = make_case(16, 8, 2, 1, 32, [70], torch.bfloat16)
    full = run(variant, query, kp, vp, table, counts, last, 0.3)
    split_at = 2
    head = run(variant, query, kp, vp, table[:, :split_at], torch.tensor([split_at]), torch.tensor([16]), 0.3)
    tail = run(variant, query, kp, vp, table[:, split_at:], counts - split_at, last, 0.3)
    merged = merge_partials(*head, *tail)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    empty = run(variant, query, kp, vp, table, torch.tensor([0]), torch.tensor([0]), 0.3)
    assert bool((empty[0] == 0).all()) and bool(torch.isneginf(empty[1]).all())
    merged = merge_partials(*full, *empty)
    torch.testing.assert_close(merged, full)
    both_empty = merge_partials(*empty, *empty)
    assert not bool(both_empty[0].isnan().any())


def test_three_parts_merge_at_once():
    """merge_parts over pages [0, 1), [1, 3), an empty part and [3, n) equals attending all n
    pages; each part's weight is its share of the row (summing to 1, 0 for the empty part)."""
    query, kp, vp, table, counts, last = make_case(16, 8, 2, 1, 32, [70, 40], torch.float32)  # 5 and 3 pages
    full = run("torch", query, kp, vp, table, counts, last, 0.3)
    zero = torch.zeros_like(counts)

    def part(lo, hi):
        num = (counts.clamp(max=hi) - lo).clamp(min=0)
        tail = torch.where(counts <= hi, last, torch.full_like(last, 16))
        return run("torch", query, kp, vp, table[:, lo:], num, torch.where(num > 0, tail, zero), 0.3)

    parts = [part(0, 1), part(1, 3), run("torch", query, kp, vp, table, zero, zero, 0.3), part(3, 5)]
    out, lse, weights = merge_parts(parts)
    torch.testing.assert_close((out, lse), full, atol=1e-5, rtol=1e-5)
    assert weights.shape == (4, *lse.shape)
    torch.testing.assert_close(weights.sum(dim=0), torch.ones_like(lse))
    assert bool((weights[2] == 0).all()) and bool((weights[3][1] == 0).all())  # (row 1 has no page 3)
    torch.testing.assert_close(weights[0], torch.exp(parts[0][1] - lse))
    alone = merge_parts(parts[2:3])  # one empty part: zeros and -inf, no NaN
    assert bool((alone[0] == 0).all()) and bool(torch.isneginf(alone[1]).all()) and bool((alone[2] == 0).all())
    with pytest.raises(ValueError, match="at least one"):
        merge_parts([])


def test_auto_prefers_compiled_kernels():
    assert resolve_kernel("auto") == available_kernels()[0]
    assert available_kernels()[-1] == "torch"


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_errors(variant):
    query, kp, vp, table, counts, last = make_case(16, 8, 2, 1, 32, [37, 5], torch.float32)

    def call(**change):
        a = dict(query=query, key_pages=kp, value_pages=vp, page_table=table, num_pages=counts, last_page_len=last)
        a.update(change)
        if variant.startswith("cpp-"):
            from offload.kernels import check_paged_inputs

            check_paged_inputs(**a)
        return run(variant, *a.values(), 0.1)

    with pytest.raises(ValueError, match="query must be"):
        call(query=query[0])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(query=query[:, :3])
    with pytest.raises(ValueError, match="head_dim"):
        call(query=query[..., :16])
    with pytest.raises(ValueError, match="KV pages must be"):
        call(key_pages=kp.double(), value_pages=vp.double())
    with pytest.raises(ValueError, match="page indices"):
        bad = table.clone()
        bad[0, 0] = kp.shape[0]
        call(page_table=bad)
    with pytest.raises(ValueError, match="last_page_len"):
        call(last_page_len=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="num_pages"):
        call(num_pages=torch.tensor([9, 1]))
    if variant != "torch":
        with pytest.raises(ValueError, match="contiguous"):
            call(key_pages=kp.transpose(1, 2).contiguous().transpose(1, 2))
        with pytest.raises(ValueError, match="page_lse_out"):
            run(variant, query, kp, vp, table, counts, last, 0.1, page_lse_out=torch.zeros(2, 8, 1, 1))


def test_cpp_refuses_bad_page_index_without_validation():
    if "cpp" not in available_kernels():
        pytest.skip("C++ extension not built")
    query, kp, vp, table, counts, last = make_case(16, 8, 2, 1, 32, [37], torch.float32)
    table[0, 1] = -3
    with pytest.raises(ValueError, match="out of range"):
        paged_attention(query, kp, vp, table, counts, last, 0.1, kernel="cpp", validate=False)


def test_unavailable_kernel_is_an_error(monkeypatch):
    import offload.kernels as kernels

    monkeypatch.delitem(kernels._KERNELS, "cpp", raising=False)
    monkeypatch.setitem(kernels._UNAVAILABLE, "cpp", "not built in this test")
    with pytest.raises(ValueError, match="not built in this test"):
        resolve_kernel("cpp")
    with pytest.raises(ValueError, match="not a kernel"):
        resolve_kernel("fortran")


_NO_JIT_SCRIPT = """
import torch
from tests.kernels.naive import naive_paged_attention
from tests.kernels.test_paged_attention import make_case
from offload.kernels.numba_kernel import paged_attention_numba
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    args = make_case(4, 4, 2, 3, 8, [9, 0, 3], dtype)
    page_lse = torch.zeros(3, 4, 3, args[3].shape[1])
    out, lse = paged_attention_numba(*args, 0.5, causal=True, page_lse_out=page_lse, threads=2)
    ref_out, ref_lse, ref_page_lse = naive_paged_attention(*args, 0.5, causal=True)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-4)
    listed = ~ref_page_lse.isnan()
    torch.testing.assert_close(page_lse.double()[listed], ref_page_lse[listed], atol=2e-5, rtol=2e-4)
print("ok")
"""


def test_numba_kernel_python_without_jit():
    """NUMBA_DISABLE_JIT=1 runs the kernel's Python as written (covers what JIT hides)."""
    pytest.importorskip("numba")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=str(here.parents[1]))
    proc = subprocess.run([sys.executable, "-c", _NO_JIT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


SOFTCAP_CASES = {  # name: (page_size, H, H_kv, Q, D, lengths, dtype, causal, softcap)
    "page1-mha-fp32-cap1": (1, 4, 4, 1, 16, [5, 1], torch.float32, False, 1.0),
    "page16-gqa4-bf16-causal-cap5": (16, 8, 2, 4, 32, [37, 16, 1, 20], torch.bfloat16, True, 5.0),
    "page5-gqa2-fp16-cap0.5-empty-row": (5, 4, 2, 3, 8, [12, 0, 5], torch.float16, False, 0.5),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
def test_softcap_matches_the_naive_reference(variant, case):
    """Attention logit soft-capping (Gemma 2) in every kernel: out, lse and per-page lse of the capped scores."""
    page_size, heads, kv_heads, q_len, dim, lengths, dtype, causal, cap = SOFTCAP_CASES[case]
    args = make_case(page_size, heads, kv_heads, q_len, dim, lengths, dtype, seed=7)
    query = args[0] * 4.0  # scores well past the cap, so it matters
    scale = dim**-0.5
    page_lse = torch.full((len(lengths), heads, q_len, args[3].shape[1]), float("nan"))
    out, lse = run(variant, query, *args[1:], scale, causal=causal, page_lse_out=page_lse, softcap=cap)
    ref_out, ref_lse, ref_page = naive_paged_attention(query, *args[1:], scale, causal=causal, softcap=cap)
    plain, _, _ = naive_paged_attention(query, *args[1:], scale, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)
    listed = ~torch.isnan(ref_page)
    torch.testing.assert_close(page_lse.double()[listed], ref_page[listed], atol=ATOL, rtol=RTOL)
    assert (ref_out - plain).abs().max() > 1e-2  # the cap changed the result


def test_blocked_prefill_kernel_applies_softcap():
    from offload.kernels.torch_ref import paged_attention_blocked

    args = make_case(4, 4, 2, 9, 16, [30, 7], torch.float32, seed=8)
    query = args[0] * 4.0
    rows = 3
    page_lse = torch.full((*query.shape[:2], rows, args[3].shape[1]), float("-inf"))
    out, lse = paged_attention_blocked(query, *args[1:], 0.25, block_tokens=8, softcap=2.0, page_lse_out=page_lse)
    ref_out, ref_lse, ref_page = naive_paged_attention(query, *args[1:], 0.25, softcap=2.0)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)
    listed = ~torch.isnan(ref_page[:, :, -rows:])
    torch.testing.assert_close(page_lse.double()[listed], ref_page[:, :, -rows:][listed], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_softcap_is_refused(bad):
    args = make_case(4, 2, 1, 1, 8, [5], torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        paged_attention(*args, 0.3, softcap=bad)


def helper_sources() -> list[str]:
    if "cpp" not in VARIANTS:
        return []
    from offload.kernels import cpp_kernel

    return ["own"] + (["openmp"] if cpp_kernel.openmp_built() else [])


@pytest.fixture(params=helper_sources())
def helpers(request):
    """The C++ kernel with its helper threads from each source this build has (restored after)."""
    from offload.kernels import cpp_kernel

    before = cpp_kernel.helpers()
    cpp_kernel.use_openmp(request.param == "openmp")
    try:
        yield request.param
    finally:
        cpp_kernel.use_openmp(before == "openmp")


def test_cpp_helper_sources(helpers):
    """Both helper sources give the kernel's answer, over several calls back to back."""
    from offload.kernels import cpp_kernel

    if helpers == "openmp":
        assert cpp_kernel.helpers() == "openmp", "the extension's OpenMP runtime should be torch's"
        assert cpp_kernel.openmp_library() == cpp_kernel.torch_openmp_runtime()  # not a second runtime
    args = make_case(16, 8, 2, 4, 64, [700, 333, 1], torch.bfloat16, seed=6)
    ref_out, ref_lse, _ = naive_paged_attention(*args, 0.125)
    calls_before, _ = cpp_kernel.openmp_stats()
    for _ in range(3):
        out, lse = paged_attention(*args, 0.125, kernel="cpp", threads=2)
        torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)
    calls, late = cpp_kernel.openmp_stats()
    # the first call after use_openmp tries the team (later ones may not, if it was late)
    assert (calls > calls_before) == (helpers == "openmp") and 0 <= late <= calls


def test_cpp_concurrent_callers_and_fork(helpers):
    """The C++ helper pool serves one call at a time: a concurrent caller runs alone and still
    gets the right answer; a forked child gets a fresh pool of its own threads (helper threads,
    ours or OpenMP's, do not survive fork)."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    args = make_case(16, 8, 2, 4, 64, [700, 333], torch.bfloat16, seed=5)
    ref_out, ref_lse, _ = naive_paged_attention(*args, 0.125, causal=True)
    call = lambda _: paged_attention(*args, 0.125, causal=True, kernel="cpp", threads=2)
    call(0)  # the pool's helpers exist from here on
    with ThreadPoolExecutor(4) as ex:
        for out, lse in ex.map(call, range(16)):
            torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        out = pool.apply_async(_cpp_call_in_child, (args,)).get(timeout=120)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)


def _cpp_call_in_child(args):  # only the kernel: torch's own thread pool is not fork-safe
    return paged_attention(*args, 0.125, causal=True, kernel="cpp", threads=2)[0]
