"""Host memory for page pools: zeroed, and backed by transparent huge pages where the OS has them.

A decode step's host part reads pages scattered over the whole pool. With 4 KiB pages every
page of KV is a TLB miss, and in a virtual machine a miss walks two page tables; with 2 MiB
pages the pool's translations stay cached (the C++ kernel reads 32k tokens of bf16 KV about
1.2x faster in `offload bench kernels`). Linux gives an anonymous mapping huge pages when it is
advised to (`MADV_HUGEPAGE`, honoured with transparent_hugepage set to `madvise` or `always`);
elsewhere, or when the advice is refused, this is plain `torch.zeros`. Pinned memory (for CUDA
copies) comes from the CUDA allocator instead and is not affected.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size


def huge_pages_supported() -> bool:
    """Whether this OS can be advised to back anonymous memory with transparent huge pages."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor of `shape`; at least HUGE_PAGE_BYTES large ones sit on huge-page-aligned
    anonymous memory advised to use transparent huge pages (Linux), smaller ones are torch.zeros."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE_BYTES or not huge_pages_supported():
        return torch.zeros(shape, dtype=dtype)
    try:
        # Anonymous private memory reads as zeros; one huge page of slack to align the start.
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.zeros(shape, dtype=dtype)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # advice refused (THP disabled): still correct, ordinary pages
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive as long as any view of it
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    return raw[start : start + nbytes].view(dtype).view(shape)
