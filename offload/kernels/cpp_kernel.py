"""The C++ paged host-part kernel (csrc/), loaded with ctypes.

setup.py builds csrc/ into `offload/kernels/_cpu_attention*.so` when a C++ compiler
is there; importing this module raises ImportError otherwise and `offload.kernels` records why.
A plain C ABI through ctypes keeps the build free of Python and torch headers, and ctypes
releases the GIL for the call, so the kernel runs while the main thread drives the accelerator.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import torch

from offload.kernels.cpu_plan import DTYPE_CODES, check_cpu_buffers, default_threads, index_arrays, plan_split

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512bf16"}
_ERRORS = {1: "a page index is out of range", 2: "out of memory for the split partials", 3: "that ISA is not supported by this CPU"}


def _load() -> ctypes.CDLL:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_cpu_attention{suffix}"
        if path.exists():
            return ctypes.CDLL(str(path))
    raise ImportError(
        "the C++ extension offload/kernels/_cpu_attention is not built (reinstall with a C++ compiler: "
        "pip install -e . or python setup.py build_ext --inplace)"
    )


_lib = _load()
_lib.offload_cpu_best_isa.restype = ctypes.c_int
_lib.offload_cpu_best_isa.argtypes = []
_lib.offload_cpu_openmp_built.restype = ctypes.c_int
_lib.offload_cpu_openmp_built.argtypes = []
_lib.offload_cpu_use_openmp.restype = ctypes.c_int
_lib.offload_cpu_use_openmp.argtypes = [ctypes.c_int]
_lib.offload_paged_attention.restype = ctypes.c_int
_lib.offload_paged_attention.argtypes = (
    [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8 + [ctypes.c_int]
    + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float] * 2
)

BEST_ISA = int(_lib.offload_cpu_best_isa())
_lib.offload_cpu_openmp_stats.restype = None
_lib.offload_cpu_openmp_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 2
_lib.offload_cpu_openmp_library.restype = ctypes.c_char_p
_lib.offload_cpu_openmp_library.argtypes = []
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def openmp_runtimes() -> set[str]:
    """Real paths of the OpenMP runtimes mapped into this process (Linux; empty where unknown)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return set()
    return {os.path.realpath(p) for p in paths if Path(p).name.startswith(OPENMP_RUNTIMES)}


def torch_openmp_runtime() -> str | None:
    """The OpenMP runtime torch runs its CPU ops on: the one inside torch's install if there is
    one, else the only one in the process; None when torch does not use OpenMP or it is unclear."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = openmp_runtimes()
    package = Path(os.path.realpath(Path(torch.__file__).parent))
    bundled = (package, package.with_name("torch.libs"))  # torch/lib, or auditwheel's torch.libs
    own = {p for p in runtimes if any(Path(p).is_relative_to(d) for d in bundled)}
    if len(own) == 1:
        return own.pop()
    return runtimes.pop() if len(runtimes) == 1 else None


def use_openmp(on: bool = True) -> bool:
    """Take the kernel's helper threads from OpenMP (on) or from threads of its own (off); returns
    what is in force. OpenMP is only used where the extension was built with it and its OpenMP
    calls reach the runtime torch uses: then torch's workers, still spinning after the model's last
    matmul, pick up the kernel's work at once, where a thread of our own would wait for the core
    that worker holds. A second runtime's threads would fight torch's for the cores instead."""
    ours = openmp_library()
    torch_rt = torch_openmp_runtime() if on and ours else None
    return bool(_lib.offload_cpu_use_openmp(int(torch_rt is not None and ours == torch_rt)))


def openmp_built() -> bool:
    """Whether the extension was built with OpenMP (it can take helpers from a team)."""
    return bool(_lib.offload_cpu_openmp_built())


def openmp_library() -> str | None:
    """Real path of the OpenMP runtime the extension's OpenMP calls reach; None without OpenMP."""
    path = _lib.offload_cpu_openmp_library().decode()
    return os.path.realpath(path) if path else None


def helpers() -> str:
    """Where the kernel's helper threads come from now: "openmp" or "own"."""
    return "openmp" if _lib.offload_cpu_use_openmp(-1) else "own"


def openmp_stats() -> tuple[int, int]:
    """(calls run on the OpenMP team, calls of those that waited for a late team thread); after a
    late one the next calls use the kernel's own threads for a while (csrc/paged_attention.cpp)."""
    calls, late = ctypes.c_int64(), ctypes.c_int64()
    _lib.offload_cpu_openmp_stats(ctypes.byref(calls), ctypes.byref(late))
    return calls.value, late.value


use_openmp(True)  # the default


def paged_attention_cpp(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    last_page_len: torch.Tensor,
    scale: float,
    causal: bool = False,
    page_lse_out: torch.Tensor | None = None,
    threads: int | None = None,
    isa: int = -1,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ paged kernel; contract in `offload.kernels.paged_attention`. threads: None = every core
    this process may use. isa: -1 the best this CPU has, or force 0 scalar / 1 AVX2 / 2 AVX-512 /
    3 AVX-512 with BF16 (bf16 pages and a bf16 query: q.k by bf16 dot-product instructions)."""
    check_cpu_buffers(query, key_pages, value_pages, page_lse_out, page_table.shape[1])
    bsz, num_heads, q_len, head_dim = query.shape
    num_pages_total, num_kv_heads, page_size, _ = key_pages.shape
    table, counts, last = index_arrays(page_table, num_pages, last_page_len)
    threads = threads or default_threads()
    split = plan_split(
        bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim, int(counts.max(initial=0)), threads,
        page_size=key_pages.shape[2],
    )
    q = query.detach().to(torch.float32).contiguous()  # scaled in the kernel: a bf16 query stays exact
    out = torch.empty(bsz, num_heads, q_len, head_dim, dtype=torch.float32)
    lse = torch.empty(bsz, num_heads, q_len, dtype=torch.float32)
    status = _lib.offload_paged_attention(
        q.data_ptr(), key_pages.data_ptr(), value_pages.data_ptr(), DTYPE_CODES[key_pages.dtype],
        table.ctypes.data, counts.ctypes.data, last.ctypes.data,
        bsz, num_heads, q_len, head_dim, num_kv_heads, page_size, table.shape[1], num_pages_total, int(bool(causal)),
        page_lse_out.data_ptr() if page_lse_out is not None else None, out.data_ptr(), lse.data_ptr(),
        split.heads_per_item, split.num_head_groups, split.num_splits, int(threads), int(isa), float(scale), float(softcap or 0.0),
    )
    if status:
        raise ValueError(f"C++ paged attention failed: {_ERRORS.get(status, f'status {status}')}")
    return out, lse


_lib.offload_page_exp_sums.restype = ctypes.c_int
_lib.offload_page_exp_sums.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] + [ctypes.c_int] * 2


def page_exp_sums_cpp(query: torch.Tensor, keys: torch.Tensor, shift: torch.Tensor, page_size: int,
                      threads: int | None = None, isa: int = -1) -> torch.Tensor:
    """C++ `page_exp_sums` (contract in `offload.kernels.torch_ref.page_exp_sums_torch`): one fused
    pass, the scores never written to memory. isa as in `paged_attention_cpp`."""
    num_kv_heads, rows, head_dim = query.shape
    tokens = keys.shape[1]
    q, k, s = (t.detach().to(torch.float32).contiguous() for t in (query, keys, shift))
    out = torch.empty(num_kv_heads, rows, -(-tokens // page_size), dtype=torch.float32)
    status = _lib.offload_page_exp_sums(q.data_ptr(), k.data_ptr(), s.data_ptr(), num_kv_heads, rows, tokens, head_dim,
                                        page_size, out.data_ptr(), int(threads or default_threads()), int(isa))
    if status:
        raise ValueError(f"C++ page sums failed: {_ERRORS.get(status, f'status {status}')}")
    return out
