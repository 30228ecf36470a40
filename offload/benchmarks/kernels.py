"""Benchmark: paged host-part attention on the CPU against the machine's read bandwidth and
against plain torch on the same inputs.

For each point (thread count, context length, KV dtype, Q, batch) with a Llama-3-8B-like layout
(32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens):
  - our kernels (cpp, numba): median time, KV bytes read per second, share of the read
    bandwidth measured with the same thread count, and Numba's speed relative to C++;
  - torch SDPA on contiguous K/V with enable_gqa=True, and the best plain-torch formulation
    (queries grouped per KV head: matmul + softmax + matmul), same inputs; speedups over both.

The protocol is a decode step's worst case, not a warm loop: the pages are scattered at random
over a pool twice the size the sequence needs, and the caches are flushed (a read of a buffer
far larger than the last-level cache, not timed) before every timed call, so every byte comes
from DRAM. The read bandwidth is a torch.sum over such a buffer in the same run. Attention is
non-causal (the runtime's host part). `--competing-load` runs CPU-bound busy loops beside the
measurement (a shared machine: a small call must stay small).

    offload bench kernels                     # full sweep (1k..128k, 3 dtypes, Q 1/4/16, B 1/4)
    offload bench kernels --quick             # 1k and 32k, bf16 and fp32, Q 1 and 16, 1 and N threads
    offload bench kernels --quick --competing-load 1 --out bench/results/cpu_attention_loaded
Writes bench/results/cpu_attention.json and bench/results/cpu_attention.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from offload.config import OffloadConfig
from offload.kernels import available_kernels, paged_attention
from offload.store.host_memory import host_zeros, huge_pages_supported

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path("bench/results")  # relative to where it runs: the package may be installed anywhere
MAX_PAGED_BYTES = 2 << 30  # skip points whose paged KV is larger (shared 2-core boxes)
MAX_BASELINE_BYTES = 1 << 30  # torch baselines need a contiguous copy (and SDPA more): cap them
FLUSH_BYTES = 256 << 20  # read before each timed call: far larger than any last-level cache here


class CacheFlush:
    """Evicts the caches by reading a large buffer; `median_time_s` calls it untimed before each
    timed call."""

    def __init__(self, nbytes: int = FLUSH_BYTES) -> None:
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def median_time_s(fn, min_reps: int = 5, budget_s: float = 1.0, before=None) -> float:
    """Median wall time of fn() over at least min_reps calls (more while within budget_s, up to
    50), after one untimed warm-up; `before()` runs untimed before every call."""
    fn()  # warm-up (JIT, page faults, thread pools)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth_gbps(threads: int, buffer_bytes: int = 1 << 30) -> float:
    """Sum over a buffer ~30x the last-level cache with `threads` threads: the memory read limit."""
    buf = torch.ones(buffer_bytes // 4, dtype=torch.float32)
    torch.set_num_threads(threads)
    t = median_time_s(lambda: buf.sum(), min_reps=7)
    return buffer_bytes / t / 1e9


class CompetingLoad:
    """`count` CPU-bound busy-loop processes for the duration of a `with` block: the shared
    machine of the issue (another process on the cores), made reproducible."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "CompetingLoad":
        code = "while True:\n    pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def make_inputs(ctx: int, dtype: torch.dtype, q_len: int, bsz: int, gen: torch.Generator, huge_pages: bool = True):
    """Head-major pages scattered at random over a pool twice the size the batch needs; the pool
    memory as the store allocates it (`host_zeros`: transparent huge pages where the OS has them)
    or, with huge_pages=False, plain torch memory."""
    pages_per_seq = ctx // PAGE_SIZE
    total = bsz * pages_per_seq
    shape = (2 * total, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM)
    alloc = host_zeros if huge_pages else lambda shape, dtype: torch.zeros(shape, dtype=dtype)
    key_pages, value_pages = alloc(shape, dtype), alloc(shape, dtype)
    key_pages.copy_(torch.randn(shape, generator=gen))
    value_pages.copy_(torch.randn(shape, generator=gen))
    page_table = torch.randperm(2 * total, generator=gen)[:total].view(bsz, pages_per_seq)
    num_pages = torch.full((bsz,), pages_per_seq)
    last = torch.full((bsz,), PAGE_SIZE)
    query = torch.randn(bsz, NUM_HEADS, q_len, HEAD_DIM, generator=gen).to(dtype)  # a model of that dtype makes it
    return query, key_pages, value_pages, page_table, num_pages, last


def contiguous_kv(pages: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, T, D] copy of the paged KV, the layout the torch baselines need."""
    bsz, n = page_table.shape
    return pages[page_table.reshape(-1)].view(bsz, n, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM).transpose(1, 2).reshape(
        bsz, NUM_KV_HEADS, n * PAGE_SIZE, HEAD_DIM)


def grouped_matmul(query, keys, values, scale):
    """Best plain-torch formulation: queries grouped per KV head, K/V read once per group."""
    bsz, num_heads, q_len, head_dim = query.shape
    q = query.reshape(bsz, NUM_KV_HEADS, (num_heads // NUM_KV_HEADS) * q_len, head_dim).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(bsz, num_heads, q_len, head_dim)


def bench_point(ctx, dtype_name, q_len, bsz, threads, bandwidth, kernels, gen, flush, huge_pages=True):
    dtype = DTYPES[dtype_name]
    kv_bytes = 2 * bsz * ctx * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize  # K and V, read once
    row = {"threads": threads, "ctx": ctx, "dtype": dtype_name, "q": q_len, "batch": bsz, "kv_mib": kv_bytes / 2**20}
    if kv_bytes > MAX_PAGED_BYTES:
        row["skipped"] = f"paged KV {kv_bytes / 2**30:.1f} GiB > {MAX_PAGED_BYTES / 2**30:.0f} GiB cap"
        return row
    torch.set_num_threads(threads)
    query, kp, vp, table, counts, last = make_inputs(ctx, dtype, q_len, bsz, gen, huge_pages)
    scale = HEAD_DIM**-0.5
    for name in kernels:
        t = median_time_s(lambda: paged_attention(query, kp, vp, table, counts, last, scale, kernel=name, threads=threads),
                          before=flush)
        row[f"{name}_ms"] = t * 1e3
        row[f"{name}_gbps"] = kv_bytes / t / 1e9
        row[f"{name}_bw_frac"] = kv_bytes / t / 1e9 / bandwidth
    if "cpp" in kernels and "numba" in kernels:
        row["numba_vs_cpp"] = row["cpp_ms"] / row["numba_ms"]
    if kv_bytes <= MAX_BASELINE_BYTES:
        keys, values = contiguous_kv(kp, table), contiguous_kv(vp, table)
        del kp, vp
        q = query.to(dtype)
        t_sdpa = median_time_s(lambda: F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True),
                               before=flush)
        t_mm = median_time_s(lambda: grouped_matmul(query, keys, values, scale), before=flush)
        row.update(sdpa_ms=t_sdpa * 1e3, sdpa_gbps=kv_bytes / t_sdpa / 1e9,
                   matmul_ms=t_mm * 1e3, matmul_gbps=kv_bytes / t_mm / 1e9)
        best = kernels[0]
        row["speedup_vs_sdpa"] = t_sdpa / (row[f"{best}_ms"] / 1e3)
        row["speedup_vs_matmul"] = t_mm / (row[f"{best}_ms"] / 1e3)
    else:
        row["baselines_skipped"] = f"contiguous copy {kv_bytes / 2**30:.1f} GiB > {MAX_BASELINE_BYTES / 2**30:.0f} GiB cap"
    return row


def cpp_helpers() -> str | None:
    """Where the C++ kernel's helper threads come from ("openmp" or "own", with how many calls
    ran on the OpenMP team and how many of those waited for a late team thread), None without it."""
    try:
        from offload.kernels.cpp_kernel import helpers, openmp_stats
    except ImportError:
        return None
    calls, late = openmp_stats()
    return helpers() + (f" ({calls} calls on the team, {late} waited for a late thread)" if calls else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v, spec):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(meta, rows, kernels) -> str:
    best = kernels[0]
    bandwidths = ", ".join(f"{t} thread{'s' * (t > 1)} **{bw:.1f} GB/s**" for t, bw in meta["read_bandwidth_gbps"].items())
    load = (f"{meta['competing_load']} CPU-bound busy loop(s) ran beside every timing. " if meta["competing_load"]
            else "")
    ratio = "cpp" in kernels and "numba" in kernels
    lines = [
        "# CPU paged attention",
        "",
        f"Machine: {meta['machine']}; measured read bandwidth {bandwidths} (torch.sum over 1 GiB). Layout: "
        f"{NUM_HEADS} query heads, {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, pages of {PAGE_SIZE} tokens "
        f"scattered at random over a pool twice the needed size, caches flushed before every timed call, "
        f"non-causal. Pool memory: {meta.get('pool_memory', 'plain torch')}; C++ helper threads: "
        f"{meta.get('cpp_helpers')}. {load}Load average at the start {meta['load_average_1m_at_start']:.1f}, at the end "
        f"{meta['load_average_1m_at_end']:.1f}. Command: `{meta['command']}`. Medians; GB/s = K+V bytes read / "
        f"time; % of BW against the bandwidth with the same thread count; speedups are {best} over torch.",
        "",
        "| threads | ctx | dtype | Q | B | KV MiB | " + " | ".join(f"{k} ms | {k} GB/s" for k in kernels)
        + f" | {best} % of BW |" + (" numba / cpp |" if ratio else "")
        + " SDPA ms (GB/s) | grouped matmul ms (GB/s) | x SDPA | x matmul |",
        "|" + "---|" * (6 + 2 * len(kernels) + 5 + ratio),
    ]
    for r in rows:
        head = [str(r["threads"]), str(r["ctx"]), r["dtype"], str(r["q"]), str(r["batch"]), f"{r['kv_mib']:.0f}"]
        if "skipped" in r:
            lines.append("| " + " | ".join(head) + f" | skipped: {r['skipped']} |")
            continue
        cells = head
        for k in kernels:
            cells += [fmt(r.get(f"{k}_ms"), ".2f"), fmt(r.get(f"{k}_gbps"), ".1f")]
        cells.append(fmt(100 * r[f"{best}_bw_frac"], ".0f") + "%")
        if ratio:
            cells.append(fmt(r["numba_vs_cpp"], ".2f"))
        if "sdpa_ms" in r:
            cells += [f"{r['sdpa_ms']:.2f} ({r['sdpa_gbps']:.1f})", f"{r['matmul_ms']:.2f} ({r['matmul_gbps']:.1f})",
                      f"{r['speedup_vs_sdpa']:.1f}x", f"{r['speedup_vs_matmul']:.1f}x"]
        else:
            cells += ["skipped (memory)"] * 2 + ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def positive_ints(what: str):
    """An argparse type: a comma-separated list of positive integers (`what` names them in the error)."""
    def parse(text: str) -> list[int]:
        values = [int(x) for x in text.split(",") if x.strip()]
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"takes positive {what}, e.g. 1,2; got {text!r}")
        return values
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offload bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short sweep: 1k/32k, bf16/fp32, Q 1 and 16, B 1, with 1 thread and with --threads")
    parser.add_argument("--threads", type=positive_ints("thread counts"), default=None,
                        help="comma-separated thread counts; default: 1 and OffloadConfig().cpu_threads "
                             "(OFFLOAD_CPU_THREADS) for --quick, that alone otherwise")
    parser.add_argument("--contexts", type=positive_ints("context lengths"), default=None,
                        help="comma-separated context lengths instead of the sweep's (Q 1, B 1, bf16 and fp32)")
    parser.add_argument("--competing-load", type=int, default=0, metavar="N",
                        help="run N CPU-bound busy loops beside the measurement (default 0)")
    parser.add_argument("--plain-memory", action="store_true",
                        help="pages in plain torch memory instead of the store's (huge pages where the OS has them)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_attention")
    args = parser.parse_args(argv)
    if args.competing_load < 0:
        parser.error(f"--competing-load takes a count >= 0; got {args.competing_load}")
    configured = OffloadConfig().cpu_threads
    threads = args.threads or (sorted({1, configured}) if args.quick else [configured])
    if args.contexts is not None:
        points = [(c, d, 1, 1) for c in args.contexts for d in ("bf16", "fp32")]
    elif args.quick:
        points = [(c, d, q, 1) for c in (1024, 32768) for d in ("bf16", "fp32") for q in (1, 16)]
    else:
        points = [(c, d, q, b) for c in (1024, 4096, 32768, 131072) for d in DTYPES for q in (1, 4, 16) for b in (1, 4)]
    kernels = [k for k in available_kernels() if k != "torch"] or ["torch"]
    load_at_start = os.getloadavg()[0]
    flush = CacheFlush()
    rows, bandwidths = [], {}
    with CompetingLoad(args.competing_load):
        for count in threads:
            bandwidths[count] = read_bandwidth_gbps(count)
            print(f"read bandwidth: {bandwidths[count]:.1f} GB/s with {count} threads; kernels: {', '.join(kernels)}",
                  flush=True)
            gen = torch.Generator().manual_seed(0)
            for ctx, dtype_name, q_len, bsz in points:
                row = bench_point(ctx, dtype_name, q_len, bsz, count, bandwidths[count], kernels, gen, flush,
                                  not args.plain_memory)
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    meta = {
        "machine": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores",
        "load_average_1m_at_start": load_at_start,  # other work on the box skews multithreaded timings
        "load_average_1m_at_end": os.getloadavg()[0],
        "competing_load": args.competing_load,
        "read_bandwidth_gbps": bandwidths,
        "torch": torch.__version__,
        "kernels": kernels,
        "pool_memory": "plain torch" if args.plain_memory else "as the store allocates it (huge pages: "
                       f"{'advised' if huge_pages_supported() else 'not available'})",
        "cpp_helpers": cpp_helpers(),
        "command": "offload bench kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows, kernels)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
