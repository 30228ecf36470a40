"""Page copies between the page homes (host and lower tiers) and the device tier, with byte,
transfer and link-time accounting.

Host-to-device copies are asynchronous and two-phase (as vLLM's offloading manager does):
the caller *prepares* a copy by allocating and thereby pinning the destination slots (reference
count 1, so nothing can evict or reuse them), `submit_h2d` queues it, and the caller *completes*
it with `wait`, after which it may flip the pages resident. A page is never read before its copy
completed.

Device-to-host copies (`to_host`: the home copies of pages just completed) are asynchronous too:
the pages are *landing* in their home until the copy is settled, and every reader of a host copy
(the host kernels, a spill to a lower tier, a copy to the device, a prefix file) settles the
copies of the pages it reads first (`PageHome.settle`). A landing page's host slot is never
freed or reused, and its source stays held, until then.

Both directions coalesce: a batch goes as one transfer per run of consecutive destination slots
(`copy_runs.py`), keys and values one each (they are separate pools).

- CUDA: copies run on two copy streams (one per direction: the link is full duplex); host->device
  batches are gathered into a bounded pool of pinned staging buffers allocated once, home copies
  go straight into the pinned host pool. Completion is a CUDA event: the compute stream waits on
  it (`wait_event`) for host->device copies, a reader synchronises on it for home copies. Link
  time comes from timing events.
- CPU (no accelerator): one worker thread per direction performs the copies;
  `emulate_link_gbps` makes each batch take `transfers * latency + bytes / bandwidth` seconds,
  so overlap, stalls and the gain of coalescing are real and measurable.

A copy that raises in the background does not raise there: a host->device batch is marked failed
with its cause and `wait` reports it, so the caller falls back to a correct path (the pages stay on
the host); a failed home copy is rewritten synchronously from its held source when it is settled,
and if that fails too the reader gets the error (the page stays landing, its source held).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from offload.store.copy_runs import copy_runs
from offload.store.home import PageHome
from offload.store.pools import PagePool

logger = logging.getLogger("offload")


@dataclass(slots=True)
class TransferCounters:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_pages: int = 0
    d2h_pages: int = 0
    h2d_transfers: int = 0  # contiguous copies issued (coalesced runs of pages; keys and values one each)
    d2h_transfers: int = 0
    h2d_link_s: float = 0.0  # time the link was busy with host -> device copies (emulated, or CUDA events)
    d2h_link_s: float = 0.0  # ... with device -> host copies
    link_s: float = 0.0  # both directions
    d2h_wait_s: float = 0.0  # time readers of host copies waited for home copies still landing
    failed_batches: int = 0  # host -> device batches that failed (their pages stayed on the host)
    failed_home_copies: int = 0  # home copies whose background copy failed (rewritten synchronously)


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


@dataclass(eq=False)
class HomeCopy:
    """One submitted group of device->host home copies: `pages` of `home` into their host slots."""

    engine: "TransferEngine"
    home: PageHome
    pages: list[int]
    slots: list[int]  # the pages' host slots (held: a landing page's slot is never freed)
    keys: torch.Tensor | None  # source [n, H_kv, page_size, D] on the device, held until settled
    values: torch.Tensor | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    event: object | None = None  # torch.cuda.Event on CUDA
    settled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self) -> None:
        self.engine.settle(self)


class _Worker:
    """A thread that runs queued jobs in order (one per copy direction: the link is full duplex)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread: threading.Thread | None = None

    def put(self, job: Callable[[], None]) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self.thread.start()
        self.queue.put(job)

    def _loop(self) -> None:
        # inference_mode is per thread: pools made under it can only be written under it.
        with torch.inference_mode():
            while True:
                job = self.queue.get()
                try:
                    if job is None:
                        return
                    job()  # (jobs catch their own errors)
                finally:
                    self.queue.task_done()

    def drain(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.queue.join()

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.thread = None


class TransferEngine:
    # Test hooks (set on the class or an instance): called with each host->device batch (`fault_hook`)
    # or home copy (`home_fault_hook`) right before its copy; blocking delays it, raising fails it.
    fault_hook: Callable[[CopyBatch], None] | None = None
    home_fault_hook: Callable[[HomeCopy], None] | None = None

    def __init__(self, emulate_link_gbps: float = 0.0, asynchronous: bool = True,
                 emulate_link_latency_us: float = 0.0) -> None:
        self.emulate_link_gbps = emulate_link_gbps
        self.emulate_link_latency_us = emulate_link_latency_us
        self.asynchronous = asynchronous
        self.counters = TransferCounters()
        self._h2d_worker = _Worker("offload-copy")
        self._d2h_worker = _Worker("offload-copy-d2h")
        self._lock = threading.Lock()
        self._streams: dict[str, object] = {}  # direction -> torch.cuda.Stream
        self._timed: list[tuple[str, object, object]] = []  # CUDA: (direction, start, end) events not yet counted
        self._staging: list[torch.Tensor] = []
        self._staging_free: list[int] = []
        self._staging_in_use: list[int] = []  # oldest first
        self._staging_events: list[object] = []
        self._warned_home_copy = False

    # ---------------------------------------------------------------- link time
    def link_seconds(self, num_bytes: int, num_transfers: int) -> float:
        """What the emulated link takes for `num_transfers` transfers of `num_bytes` in all: a fixed
        cost per transfer (DMA setup, PCIe round trip) plus bytes / bandwidth; 0 without emulation."""
        if self.emulate_link_gbps <= 0 or num_bytes <= 0:
            return 0.0
        return num_transfers * self.emulate_link_latency_us * 1e-6 + num_bytes / (self.emulate_link_gbps * 1e9)

    def _link_wait(self, num_bytes: int, num_transfers: int = 1, direction: str = "h2d") -> None:
        """Emulated link: take `link_seconds` and count them as link time of `direction`."""
        seconds = self.link_seconds(num_bytes, num_transfers)
        if seconds > 0:
            start = time.perf_counter()
            # sleep for the bulk (releases the GIL), spin for the remainder: sleep alone overshoots.
            if seconds > 2e-3:
                time.sleep(seconds - 1e-3)
            while time.perf_counter() - start < seconds:
                pass
            self._add_link_time(direction, time.perf_counter() - start)

    def _add_link_time(self, direction: str, seconds: float) -> None:
        with self._lock:
            if direction == "h2d":
                self.counters.h2d_link_s += seconds
            else:
                self.counters.d2h_link_s += seconds
            self.counters.link_s += seconds

    def _harvest(self, block: bool = False) -> None:
        """CUDA: count the link time of finished copies (all of them with `block`)."""
        with self._lock:
            timed, self._timed = self._timed, []
        pending = []
        for direction, start, end in timed:
            if block:
                end.synchronize()
            elif not end.query():
                pending.append((direction, start, end))
                continue
            self._add_link_time(direction, start.elapsed_time(end) / 1e3)
        with self._lock:
            self._timed = pending + self._timed

    def flush(self) -> None:
        """Wait until every submitted copy has run and its link time is counted (for exact stats)."""
        self._h2d_worker.drain()
        self._d2h_worker.drain()
        self._harvest(block=True)

    def _stream(self, direction: str, device: torch.device):
        if direction not in self._streams:
            self._streams[direction] = torch.cuda.Stream(device)
        return self._streams[direction]

    def _count(self, direction: str, num_pages: int, num_bytes: int, num_transfers: int) -> None:
        with self._lock:
            if direction == "h2d":
                self.counters.h2d_pages += num_pages
                self.counters.h2d_bytes += num_bytes
                self.counters.h2d_transfers += num_transfers
            else:
                self.counters.d2h_pages += num_pages
                self.counters.d2h_bytes += num_bytes
                self.counters.d2h_transfers += num_transfers

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
            self._h2d_worker.put(lambda: self._run(batch))
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

    def _run(self, batch: CopyBatch) -> None:
        """CPU: one copy per run of consecutive destination slots, straight from the host pool where
        the sources are consecutive host slots, gathered otherwise (and from lower tiers)."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            home, pool = batch.home, batch.device
            home.settle(batch.page_ids)  # their home copies have landed
            host = home.host
            runs = copy_runs(home.host_slots(batch.page_ids), batch.slots)  # (pinned: their host slots stay)
            for run in runs:
                part = run.src_slice
                if part is not None:
                    keys, values = host.keys[part], host.values[part]
                else:
                    keys, values = home.read([batch.page_ids[i] for i in run.index])
                pool.keys[run.dst_slice].copy_(keys)
                pool.values[run.dst_slice].copy_(values)
            num_bytes = len(batch.page_ids) * home.layout.page_bytes
            self._link_wait(num_bytes, 2 * len(runs), "h2d")
            self._count("h2d", len(batch.page_ids), num_bytes, 2 * len(runs))
        except BaseException as exc:  # surfaced through batch.error, never lost in the thread
            batch.error = exc
            with self._lock:
                self.counters.failed_batches += 1
        finally:
            batch.done.set()

    # ---------------------------------------------------------------- CUDA path
    def _copy_cuda(self, batch: CopyBatch) -> None:
        """Gather into a pinned staging buffer (in destination order), then one copy per run of
        consecutive destination slots on the copy stream, and record an event."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            self._harvest()
            device = batch.device.device
            stream = self._stream("h2d", device)
            n = len(batch.page_ids)
            runs = copy_runs(batch.home.host_slots(batch.page_ids), batch.slots)
            index = self._acquire_staging(batch.home.layout, n)
            staging = self._staging[index]
            order = [batch.page_ids[i] for run in runs for i in run.index]
            batch.home.read(order, out=(staging[0], staging[1]))
            # The copy stream must not overwrite slots the compute stream may still read.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                offset = 0
                for run in runs:
                    for which, dst_pool in enumerate((batch.device.keys, batch.device.values)):
                        dst_pool[run.dst_slice].copy_(staging[which, offset : offset + run.length], non_blocking=True)
                    offset += run.length
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
            batch.event, batch.staging = event, index
            self._staging_events[index] = event
            with self._lock:
                self._timed.append(("h2d", start, event))
            self._count("h2d", n, n * batch.home.layout.page_bytes, 2 * len(runs))
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

    # ---------------------------------------------------------------- device -> host (home copies)
    def to_host(self, home: PageHome, pages: list[int], keys: torch.Tensor, values: torch.Tensor) -> HomeCopy:
        """Write the home copies of `pages` (new pages of `home`, with host slots) from keys/values
        [n, H_kv, page_size, D] on the device, asynchronously: the pages are landing in `home`
        until the copy is settled. The caller must not write keys/values afterwards (they are held
        as the copy's source)."""
        copy = HomeCopy(self, home, list(pages), home.host_slots(pages), keys, values)
        if not copy.pages:
            copy.done.set()
            copy.settled = True
            return copy
        num_runs = len(copy_runs(range(len(copy.pages)), copy.slots))
        self._count("d2h", len(copy.pages), len(copy.pages) * home.layout.page_bytes, 2 * num_runs)
        home.land(copy)  # (before the copy can run: a reader from now on waits for it)
        if keys.device.type == "cuda":
            self._to_host_cuda(copy)
        elif self.asynchronous:
            self._d2h_worker.put(lambda: self._to_host_run(copy))
        else:
            self._to_host_run(copy)
        return copy

    def _write_home(self, copy: HomeCopy, non_blocking: bool = False) -> int:
        """Copy the source into the host slots, one copy per run of consecutive slots; returns the runs."""
        host = copy.home.host
        runs = copy_runs(range(len(copy.pages)), copy.slots)
        for run in runs:
            rows = run.src_slice
            if rows is None:
                rows = torch.tensor(run.src, dtype=torch.long, device=copy.keys.device)
            host.keys[run.dst_slice].copy_(copy.keys[rows], non_blocking=non_blocking)
            host.values[run.dst_slice].copy_(copy.values[rows], non_blocking=non_blocking)
        return len(runs)

    def _to_host_run(self, copy: HomeCopy) -> None:
        try:
            if self.home_fault_hook is not None:
                self.home_fault_hook(copy)
            runs = self._write_home(copy)
            self._link_wait(len(copy.pages) * copy.home.layout.page_bytes, 2 * runs, "d2h")
        except BaseException as exc:  # surfaced when the copy is settled, never lost in the thread
            self._home_copy_failed(copy, exc)
        finally:
            copy.done.set()

    def _to_host_cuda(self, copy: HomeCopy) -> None:
        """On the device-to-host copy stream, into the pinned host pool, after what the compute
        stream queued so far (which wrote the sources); an event marks completion."""
        try:
            if self.home_fault_hook is not None:
                self.home_fault_hook(copy)
            self._harvest()
            stream = self._stream("d2h", copy.keys.device)
            stream.wait_stream(torch.cuda.current_stream(copy.keys.device))
            with torch.cuda.stream(stream):
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                self._write_home(copy, non_blocking=True)
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
            copy.event = event
            with self._lock:
                self._timed.append(("d2h", start, event))
        except BaseException as exc:
            self._home_copy_failed(copy, exc)
        finally:
            copy.done.set()

    def _home_copy_failed(self, copy: HomeCopy, exc: BaseException) -> None:
        copy.error = exc
        with self._lock:
            self.counters.failed_home_copies += 1

    def settle(self, copy: HomeCopy) -> None:
        """Block until `copy` has landed. A copy that failed in the background is rewritten here,
        synchronously, from its held source; if that fails too, raise (the copy stays unsettled and
        its source held, so the page is not lost and a later reader tries again)."""
        if copy.settled:
            return
        if not copy.done.is_set() or (copy.event is not None and not copy.event.query()):
            start = time.perf_counter()  # (a reader waits: counted)
            copy.done.wait()
            if copy.event is not None:
                copy.event.synchronize()
            with self._lock:
                self.counters.d2h_wait_s += time.perf_counter() - start
        with copy.lock:
            if copy.settled:
                return
            if copy.error is not None:
                if not self._warned_home_copy:
                    self._warned_home_copy = True
                    logger.warning("a device-to-host home copy failed in the background (%s: %s); rewriting it "
                                   "synchronously", type(copy.error).__name__, copy.error)
                try:
                    self._write_home(copy)
                except BaseException as exc:
                    raise RuntimeError(f"{copy.home.name}: the home copy of {len(copy.pages)} page(s) failed in the "
                                       f"background and again synchronously") from exc
                copy.error = None
            copy.keys = copy.values = None  # (the source is free now)
            copy.settled = True

    def close(self) -> None:
        self._h2d_worker.close()
        self._d2h_worker.close()
