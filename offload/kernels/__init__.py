"""Host-part attention kernels behind one entry point.

`paged_attention` attends queries to KV stored in pages and returns `(out, lse)` so the result
merges exactly with other parts (`merge_partials`). Implementations: "torch" (always there),
"numba" (`numba_kernel`) and "cpp" (`cpp_kernel`, the optional C++ extension from csrc/), each
registered in `_KERNELS` when it imports, with the reason recorded in `_UNAVAILABLE` when not. The choice is made once
(`resolve_kernel`), from `OffloadConfig.cpu_kernel` / `OFFLOAD_CPU_KERNEL`; asking for one that
is unavailable is an error, never a silent fallback.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from offload.kernels.merge import merge_partials
from offload.kernels.torch_ref import dense_attention, page_exp_sums_torch, paged_attention_torch

PagedKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# name -> kernel; the compiled kernels are added below when they import.
_KERNELS: dict[str, PagedKernel] = {"torch": paged_attention_torch}
_UNAVAILABLE: dict[str, str] = {}  # name -> why it could not be loaded

try:
    from offload.kernels.numba_kernel import paged_attention_numba

    _KERNELS["numba"] = paged_attention_numba
except Exception as exc:  # numba missing or broken for this numpy: record it, keep torch
    _UNAVAILABLE["numba"] = f"{type(exc).__name__}: {exc}"

try:
    from offload.kernels.cpp_kernel import page_exp_sums_cpp, paged_attention_cpp

    _KERNELS["cpp"] = paged_attention_cpp
except Exception as exc:  # not built (no compiler at install time) or cannot be loaded
    _UNAVAILABLE["cpp"] = f"{type(exc).__name__}: {exc}"
_PREFERENCE = ("cpp", "numba", "torch")
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available_kernels() -> list[str]:
    return [name for name in _PREFERENCE if name in _KERNELS]


def resolve_kernel(name: str = "auto") -> str:
    """'auto' -> the fastest available kernel; a named kernel must be available."""
    if name == "auto":
        return available_kernels()[0]
    if name in _KERNELS:
        return name
    if name in _PREFERENCE:
        why = _UNAVAILABLE.get(name, "it is not built or not installed")
        raise ValueError(
            f"cpu_kernel (OFFLOAD_CPU_KERNEL)={name!r} is unavailable: {why}; available: {', '.join(available_kernels())}"
        )
    raise ValueError(f"cpu_kernel (OFFLOAD_CPU_KERNEL)={name!r} is not a kernel; expected one of auto, {', '.join(_PREFERENCE)}")


def check_paged_inputs(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    last_page_len: torch.Tensor,
) -> None:
    """Validate the paged-kernel contract; raise ValueError saying what is wrong."""
    if query.dim() != 4:
        raise ValueError(f"query must be [B, H, Q, D]; got shape {tuple(query.shape)}")
    if key_pages.dim() != 4 or key_pages.shape != value_pages.shape:
        raise ValueError(
            "key_pages and value_pages must both be [num_pages, H_kv, page_size, D]; "
            f"got {tuple(key_pages.shape)} and {tuple(value_pages.shape)}"
        )
    bsz, num_heads, _, head_dim = query.shape
    _, num_kv_heads, page_size, kv_dim = key_pages.shape
    if kv_dim != head_dim:
        raise ValueError(f"head_dim of query ({head_dim}) and key_pages ({kv_dim}) differ")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if key_pages.dtype not in KV_DTYPES or value_pages.dtype != key_pages.dtype:
        raise ValueError(f"KV pages must be float32, float16 or bfloat16 (both the same); got {key_pages.dtype}, {value_pages.dtype}")
    if not query.is_floating_point():
        raise ValueError(f"query must be floating point; got {query.dtype}")
    if page_table.dim() != 2 or page_table.shape[0] != bsz:
        raise ValueError(f"page_table must be [B={bsz}, max_pages]; got {tuple(page_table.shape)}")
    if num_pages.shape != (bsz,) or last_page_len.shape != (bsz,):
        raise ValueError(f"num_pages and last_page_len must be [B={bsz}]; got {tuple(num_pages.shape)}, {tuple(last_page_len.shape)}")
    # The index checks on host copies with numpy: a few microseconds, where the same checks as
    # torch ops on these tiny tensors cost more than a short context's whole attention.
    counts = _host_ints(num_pages)
    lens = _host_ints(last_page_len)
    max_pages = page_table.shape[1]
    if (counts < 0).any() or (counts > max_pages).any():
        raise ValueError(f"num_pages must be in [0, {max_pages}]; got {counts.tolist()}")
    if ((lens < 1) | (lens > page_size))[counts > 0].any():
        raise ValueError(
            f"last_page_len must be in [1, page_size={page_size}] for non-empty rows; got {lens.tolist()} "
            "(pages are [num_pages, H_kv, page_size, D], head-major: page_size is dimension 2)"
        )
    ids = _host_ints(page_table)[np.arange(max_pages)[None, :] < counts[:, None]]
    if ids.size and (ids.min() < 0 or ids.max() >= key_pages.shape[0]):
        raise ValueError(f"page indices must be in [0, {key_pages.shape[0]}); got min {ids.min()}, max {ids.max()}")


def _host_ints(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.int64).numpy()


def paged_attention(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    last_page_len: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    page_lse_out: torch.Tensor | None = None,
    kernel: str = "auto",
    validate: bool = True,
    threads: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend queries to paged KV; return (out [B, H, Q, D] float32, lse [B, H, Q] float32).

    query:         [B, H, Q, D], any float dtype (computed in float32)
    key_pages:     [num_pages_total, H_kv, page_size, D] float32 | float16 | bfloat16; H % H_kv == 0.
                   Head-major pages: each KV head's tokens of a page are one contiguous block,
                   so the kernels read every block front to back (docs/kernels.md, "Page layout")
    value_pages:   same shape and dtype as key_pages
    page_table:    [B, max_pages] integer; row b lists, in key order, the pages sequence b attends
    num_pages:     [B] integer, how many entries of each row are used (0: the row attends nothing)
    last_page_len: [B] integer in [1, page_size], valid tokens in the row's last listed page
    scale:         multiplier of q.k (usually head_dim ** -0.5)
    causal:        if True, the query block is the last Q tokens of the listed keys: query i sees
                   keys [0, L - Q + i], L the row's key count. If False every listed key is visible.
    page_lse_out:  optional float32 [B, H, Q, max_pages]; filled with each listed page's
                   log-sum-exp of scores (criticality); entries past num_pages are left alone.
    kernel:        "auto" (cpp > numba > torch, whichever is available) or a kernel name
    validate:      check the inputs first; False trusts them (the compiled kernels still refuse
                   out-of-range page indices: C++ raises, Numba does not check)
    threads:       CPU threads for the compiled kernels (OffloadConfig.cpu_threads); None = every
                   core this process may run on. The torch kernel uses torch's own thread pool.
    softcap:       attention logit soft-capping (Gemma 2): scaled scores become
                   softcap * tanh(score / softcap) before the softmax; None or 0 = none.
                   out, lse and page_lse are then those of the capped scores.
    Rows with no visible key give out = 0 and lse = -inf.
    """
    if validate:
        check_paged_inputs(query, key_pages, value_pages, page_table, num_pages, last_page_len)
        if softcap is not None and not (softcap >= 0 and softcap == softcap and softcap != float("inf")):
            raise ValueError(f"softcap must be a finite number >= 0 (or None); got {softcap!r}")
    fn = _KERNELS[resolve_kernel(kernel)]
    return fn(
        query, key_pages, value_pages, page_table, num_pages, last_page_len, scale,
        causal=causal, page_lse_out=page_lse_out, threads=threads, softcap=softcap,
    )


def page_exp_sums_kernel(kernel: str = "auto", threads: int | None = None) -> Callable[..., torch.Tensor]:
    """`page_sums(query, keys, shift, page_size)` for `paged_attention_blocked` from `kernel`'s
    family (contract: `torch_ref.page_exp_sums_torch`): the C++ one runs fused on `threads` (None:
    every core), the others fall back to torch's."""
    name = resolve_kernel(kernel)
    if name == "cpp":
        return lambda query, keys, shift, page_size: page_exp_sums_cpp(query, keys, shift, page_size, threads)
    return page_exp_sums_torch


__all__ = [
    "paged_attention",
    "page_exp_sums_kernel",
    "dense_attention",
    "merge_partials",
    "available_kernels",
    "resolve_kernel",
    "check_paged_inputs",
]
