"""Page copies between the page homes (host and lower tiers) and the device tier, with byte accounting.

Host-to-device copies are asynchronous and two-phase (as vLLM's offloading manager does):
the caller *prepares* a copy by allocating and thereby pinning the destination slots (reference
count 1, so nothing can evict or reuse them), `submit_h2d` queues it, and the caller *completes*
it with `wait`, after which it may flip the pages resident. A page is never read before its copy
completed.

- CUDA: copies run on a dedicated copy stream, out of a bounded pool of pinned staging buffers
  allocated once; completion is a CUDA event the compute stream waits on (`wait_event`), never a
  device-wide synchronisation.
- CPU (no accelerator): a worker thread performs the copies; `emulate_link_gbps` makes each
  copy take bytes / bandwidth seconds, so overlap and stalls are real and measurable.

A copy that raises in the worker does not raise there: the batch is marked failed with its cause,
and `wait` reports it, so the caller can fall back to a correct path (the pages stay on the host).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from offload.store.home import PageHome
from offload.store.pools import PagePool


@dataclass(slots=True)
class TransferCounters:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_pages: int = 0
    d2h_pages: int = 0
    link_s: float = 0.0  # time the (emulated) link was busy
    failed_batches: int = 0


@dataclass(eq=False)
class CopyBatch:
    """One submitted group of host->device page copies."""

    home: PageHome  # the pages' layer (they may be on the host or in a lower tier)
    page_ids: list[int]
    device: PagePool
    slots: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    event: object | None = None  # torch.cuda.Event on CUDA
    staging: int = -1  # index of the pinned staging buffer in use (CUDA)
    pinned: bool = True  # the pages are pinned in their home until `wait`


class TransferEngine:
    # Test hook (set on the class or an instance): called with each batch right before its copy;
    # blocking delays the copy, raising simulates a failed copy.
    fault_hook: Callable[[CopyBatch], None] | None = None

    def __init__(self, emulate_link_gbps: float = 0.0, asynchronous: bool = True) -> None:
        self.emulate_link_gbps = emulate_link_gbps
        self.asynchronous = asynchronous
        self.counters = TransferCounters()
        self._queue: queue.Queue[CopyBatch | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cuda_stream = None
        self._staging: list[torch.Tensor] = []
        self._staging_free: list[int] = []
        self._staging_in_use: list[int] = []  # oldest first
        self._staging_events: list[object] = []

    # ---------------------------------------------------------------- link emulation
    def _link_wait(self, num_bytes: int) -> None:
        if self.emulate_link_gbps > 0 and num_bytes > 0:
            seconds = num_bytes / (self.emulate_link_gbps * 1e9)
            start = time.perf_counter()
            # sleep for the bulk (releases the GIL), spin for the remainder: sleep alone overshoots.
            if seconds > 2e-3:
                time.sleep(seconds - 1e-3)
            while time.perf_counter() - start < seconds:
                pass
            with self._lock:
                self.counters.link_s += time.perf_counter() - start

    # ---------------------------------------------------------------- host -> device
    def submit_h2d(self, home: PageHome, page_ids: list[int], device: PagePool, slots: list[int]) -> CopyBatch:
        """Queue copies of pages into prepared (allocated) device slots; returns the batch to `wait` on.
        The pages are pinned in their home (they do not spill) until `wait` returns."""
        batch = CopyBatch(home, list(page_ids), device, list(slots))
        home.pin(batch.page_ids)
        if not page_ids:
            batch.done.set()
            return batch
        if device.device.type == "cuda":
            self._copy_cuda(batch)
        elif self.asynchronous:
            self._ensure_worker()
            self._queue.put(batch)
        else:
            self._run(batch)
        return batch

    def wait(self, batch: CopyBatch) -> float:
        """Complete a batch: block until its copy is done; returns seconds waited. Check `batch.error`."""
        start = time.perf_counter()
        if batch.event is not None:
            torch.cuda.current_stream(batch.device.device).wait_event(batch.event)
            self._release_staging(batch)
        else:
            batch.done.wait()
        if batch.pinned:
            batch.home.unpin(batch.page_ids)
            batch.pinned = False
        return time.perf_counter() - start

    def host_to_device(self, home: PageHome, page_ids: list[int], device: PagePool, slots: list[int]) -> None:
        """Synchronous copy (submit + wait); raises if the copy failed."""
        batch = self.submit_h2d(home, page_ids, device, slots)
        self.wait(batch)
        if batch.error is not None:
            raise RuntimeError("host-to-device page copy failed") from batch.error

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="offload-copy", daemon=True)
            self._worker.start()

    def _loop(self) -> None:
        # inference_mode is per thread: pools made under it can only be written under it.
        with torch.inference_mode():
            while True:
                batch = self._queue.get()
                if batch is None:
                    return
                self._run(batch)

    def _run(self, batch: CopyBatch) -> None:
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            dst = torch.tensor(batch.slots, dtype=torch.long, device=batch.device.device)
            keys, values = batch.home.read(batch.page_ids)
            batch.device.keys.index_copy_(0, dst, keys.to(batch.device.device))
            batch.device.values.index_copy_(0, dst, values.to(batch.device.device))
            num_bytes = len(batch.page_ids) * batch.home.layout.page_bytes
            self._link_wait(num_bytes)
            with self._lock:
                self.counters.h2d_bytes += num_bytes
                self.counters.h2d_pages += len(batch.page_ids)
        except BaseException as exc:  # surfaced through batch.error, never lost in the thread
            batch.error = exc
            with self._lock:
                self.counters.failed_batches += 1
        finally:
            batch.done.set()

    # ---------------------------------------------------------------- CUDA path
    def _copy_cuda(self, batch: CopyBatch) -> None:
        """Gather into a pinned staging buffer, copy on the copy stream, record an event."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            device = batch.device.device
            if self._cuda_stream is None:
                self._cuda_stream = torch.cuda.Stream(device)
            n = len(batch.page_ids)
            index = self._acquire_staging(batch.home.layout, n)
            staging = self._staging[index]
            batch.home.read(batch.page_ids, out=(staging[0], staging[1]))
            dst = torch.tensor(batch.slots, dtype=torch.long).to(device, non_blocking=True)
            # The copy stream must not overwrite slots the compute stream may still read.
            self._cuda_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self._cuda_stream):
                for which, dst_pool in enumerate((batch.device.keys, batch.device.values)):
                    dst_pool.index_copy_(0, dst, staging[which, :n].to(device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self._cuda_stream)
            batch.event, batch.staging = event, index
            self._staging_events[index] = event
            with self._lock:
                self.counters.h2d_bytes += n * batch.home.layout.page_bytes
                self.counters.h2d_pages += n
        except BaseException as exc:
            batch.error = exc
            with self._lock:
                self.counters.failed_batches += 1
        finally:
            batch.done.set()

    STAGING_BUFFERS = 4
    STAGING_PAGES = 64

    def _acquire_staging(self, layout, num_pages: int) -> int:
        if num_pages > self.STAGING_PAGES:
            raise ValueError(f"at most {self.STAGING_PAGES} pages per copy batch on CUDA; got {num_pages}")
        if not self._staging:
            shape = (2, self.STAGING_PAGES, *layout.page_shape)
            self._staging = [torch.empty(shape, dtype=layout.dtype).pin_memory() for _ in range(self.STAGING_BUFFERS)]
            self._staging_free = list(range(self.STAGING_BUFFERS))
            self._staging_events = [None] * self.STAGING_BUFFERS
        if not self._staging_free:
            # Bounded pool: reuse the oldest buffer in use once its copy has finished.
            oldest = self._staging_in_use.pop(0)
            self._staging_events[oldest].synchronize()
            self._staging_free.append(oldest)
        index = self._staging_free.pop()
        if self._staging_events[index] is not None:
            # The CPU gather below writes the buffer outside stream order: its last DMA must be done.
            self._staging_events[index].synchronize()
        self._staging_in_use.append(index)
        return index

    def _release_staging(self, batch: CopyBatch) -> None:
        if batch.staging in self._staging_in_use:
            self._staging_in_use.remove(batch.staging)
            self._staging_free.append(batch.staging)
        batch.staging = -1

    # ---------------------------------------------------------------- device -> host
    def to_host(self, keys: torch.Tensor, values: torch.Tensor, host: PagePool, slots: list[int]) -> None:
        """Write whole pages (keys/values: [n, page_size, H_kv, D], on the device) to host slots."""
        if not slots:
            return
        dst = torch.tensor(slots, dtype=torch.long)
        host.keys.index_copy_(0, dst, keys.to(host.device))
        host.values.index_copy_(0, dst, values.to(host.device))
        num_bytes = len(slots) * host.layout.page_bytes
        self._link_wait(num_bytes)
        with self._lock:
            self.counters.d2h_bytes += num_bytes
            self.counters.d2h_pages += len(slots)

    def close(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        self._worker = None
