"""`DiskTier`: one layer's pages in a page file, below the host (FlexGen's and LMCache's disk tier).

Slot s of the file holds one page, keys then values, at offset s * slot_bytes; slot_bytes is the
page's bytes rounded up to the OS page size, so slots are page-aligned. Reads are `pread`s of
runs of consecutive slots into buffers this tier returns (a failed or short read raises
`PagesLost`, it never yields garbage); `readahead` asks the kernel to start reading slots a layer
or a step before they are attended (`posix_fadvise(WILLNEED)`), so the read is asynchronous and
the later `pread` finds them in the page cache. Attending disk pages reads them in bounded chunks
(`READ_CHUNK_PAGES`) and merges the partials by log-sum-exp, so memory for disk reads stays
bounded whatever the context.

The file is this process's scratch space: created empty, deleted on close. (Prefix pages kept
across processes are a different file format, with a header and checksums.)
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from offload.store.layout import KVLayout
from offload.store.tiers import Partial, PagesLost, TierFull, attend_loaded, empty_partial, merge_into

READ_CHUNK_PAGES = 256  # most pages one disk read brings into memory at once when attending
MAX_RUN = 256  # slots per preadv (3 buffers each, under the kernel's IOV_MAX of 1024)


@dataclass(slots=True)
class DiskCounters:
    read_bytes: int = 0
    write_bytes: int = 0
    read_pages: int = 0
    written_pages: int = 0
    failed_reads: int = 0


class DiskTier:
    name = "disk"
    # Test hook (on the class or an instance): called with the slots of each read; raising fails it.
    fault_hook: Callable[[list[int]], None] | None = None

    def __init__(self, layout: KVLayout, directory: str, capacity: int, layer: int, counters: DiskCounters,
                 kernel: str = "auto", threads: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a disk tier needs room for at least one page per layer; got {capacity}")
        self.layout = layout
        self._capacity = capacity
        self.counters = counters
        self.kernel, self.threads = kernel, threads
        half = layout.page_bytes // 2
        self.half_bytes = half
        self.slot_bytes = -(-layout.page_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        os.makedirs(directory, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=f"offload-layer{layer:03d}-", suffix=".kv", dir=directory)
        self.fd = fd
        self._lock = threading.Lock()  # slot bookkeeping (the copy worker reads beside the caller)
        self._free = list(range(capacity - 1, -1, -1))
        self._used = 0
        self.closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_used(self) -> int:
        return self._used

    # ------------------------------------------------------------------ pages in and out
    def store(self, keys: torch.Tensor, values: torch.Tensor) -> list[int]:
        n = keys.shape[0]
        with self._lock:
            if len(self._free) < n:
                raise TierFull(f"disk tier is full: {self._capacity} pages per layer")
            slots = [self._free.pop() for _ in range(n)]
            self._used += n
        k_bytes = _as_bytes(keys).reshape(n, -1)
        v_bytes = _as_bytes(values).reshape(n, -1)
        try:
            for i, slot in enumerate(slots):
                offset = slot * self.slot_bytes
                written = os.pwritev(self.fd, [k_bytes[i], v_bytes[i]], offset)
                if written != 2 * self.half_bytes:
                    raise OSError(f"short write of disk slot {slot}: {written} of {2 * self.half_bytes} bytes")
        except BaseException:
            self.release(slots)
            raise
        self.counters.write_bytes += n * self.layout.page_bytes
        self.counters.written_pages += n
        return slots

    def load(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(slots)
        shape = (n, *self.layout.page_shape)
        keys = torch.empty(shape, dtype=self.layout.dtype)
        values = torch.empty(shape, dtype=self.layout.dtype)
        # Each slot is read straight into its rows of keys and values (the slot's padding into a
        # scratch buffer): one preadv per run of consecutive slots, no copy after it.
        k_rows, v_rows = _as_bytes(keys), _as_bytes(values)
        pad = np.empty(self.slot_bytes - self.layout.page_bytes, dtype=np.uint8)
        try:
            if self.fault_hook is not None:
                self.fault_hook(list(slots))
            order = sorted(range(n), key=lambda i: slots[i])
            start = 0
            while start < n:  # coalesced reads
                end = start + 1
                while end < n and end - start < MAX_RUN and slots[order[end]] == slots[order[end - 1]] + 1:
                    end += 1
                buffers = []
                for i in order[start:end]:
                    buffers += [k_rows[i], v_rows[i]] + ([pad] if pad.size else [])
                wanted = (end - start) * self.slot_bytes - pad.size  # (the last slot's padding may be past the end)
                got = os.preadv(self.fd, buffers, slots[order[start]] * self.slot_bytes)
                if got < wanted:
                    raise OSError(f"short read of disk slots {slots[order[start]]}..: {got} of {wanted} bytes")
                start = end
        except Exception as exc:
            self.counters.failed_reads += 1
            raise PagesLost(self.name, list(slots), exc) from exc
        self.counters.read_bytes += n * self.layout.page_bytes
        self.counters.read_pages += n
        return keys, values

    def release(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)
            self._used -= len(slots)

    def attend(self, query: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, scale: float, observe: int,
               softcap: float | None) -> Partial:
        bsz, num_heads, q_len, head_dim = query.shape
        total = empty_partial(bsz, num_heads, q_len, head_dim, observe, table.shape[1])
        for first in range(0, table.shape[1], READ_CHUNK_PAGES):
            chunk = table[:, first : first + READ_CHUNK_PAGES]
            chunk_counts = (counts - first).clamp(min=0, max=chunk.shape[1])
            if not int(chunk_counts.sum()):
                continue
            part = attend_loaded(self.load, query, chunk, chunk_counts, scale, observe, softcap, self.kernel,
                                 self.threads)
            columns = torch.arange(first, first + chunk.shape[1]).expand(bsz, -1).clone()
            columns[torch.arange(chunk.shape[1])[None, :] >= chunk_counts[:, None]] = -1
            merge_into(total, part, columns)
        return total

    def readahead(self, slots: list[int]) -> None:
        if not hasattr(os, "posix_fadvise") or not slots:
            return
        ordered = sorted(slots)
        try:
            start = 0
            for i in range(1, len(ordered) + 1):  # one hint per run of consecutive slots
                if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
                    length = (ordered[i - 1] - ordered[start] + 1) * self.slot_bytes
                    os.posix_fadvise(self.fd, ordered[start] * self.slot_bytes, length, os.POSIX_FADV_WILLNEED)
                    start = i
        except OSError:
            pass  # a hint only

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _as_bytes(pages: torch.Tensor) -> np.ndarray:
    """[n, ...] CPU tensor -> its bytes as a uint8 array [n, page_bytes / 2] (no copy when contiguous)."""
    pages = pages.detach().to("cpu").contiguous()
    return pages.view(torch.uint8).reshape(pages.shape[0], -1).numpy()
