"""The remote tier: pages lent by other processes or machines, on Ray (DistKV-LLM, Infinite-LLM).

A *lender* (`LenderActor`, DistKV-LLM's rManager on the lending side) is a Ray actor that holds
pages in its own memory: per layer a pool of slots under a hard budget. A *placement* actor
(`PlacementActor`, the gManager) learns every lender's free pages from heartbeats and, asked
where a batch of pages should go, names the live lender with the most room. `RemoteCluster`
starts them; `RemoteTier` (one per layer) is the `Tier` the store sees: its slots are its own
ints that map to (lender, lender's slot), the borrower-side half of the rManager.

Reading remote pages has two shapes, and the store's planner picks one per step by bytes moved:
- *pull* (`load`): the pages cross the wire, `page_bytes` each;
- *remote attention* (`attend`, Infinite-LLM's DistAttention): the query goes to each lender
  holding pages, the lender runs `attend_pages` over its own pool and sends back only
  `(out, lse, page_lse)`; the partials merge exactly by log-sum-exp. For a decode query that is
  a few hundred bytes per lender plus 4 * (1 + heads) bytes per page, instead of the pages.

A lender that dies (its process or its machine) takes its pages with it: a call that finds it
dead marks it dead for every layer, and reads of its pages raise `PagesLost` naming them, so
the store recomputes them from their token ids. Nothing is retried on a dead lender.

Tensors travel as numpy arrays (Ray ships their buffers as they are, out of band); bfloat16,
which numpy lacks, travels as its int16 bits, so every page comes back bit-identical.

Ray is imported only when a cluster is built: importing `offload` never needs it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from offload.store.layout import KVLayout
from offload.store.tiers import Partial, PagesLost, TierFull, attend_pages, empty_partial, merge_into

# Pages a tier places on one lender before asking the placement actor again: one round trip
# per lease instead of one per page (decode completes one page per layer every page_size steps).
LEASE_PAGES = 16
# A lender whose last heartbeat is older than this many intervals is not chosen for new pages.
HEARTBEAT_MISSES = 10
_WIRE_VIEW = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: its bits travel as int16


# ---------------------------------------------------------------------- transport
def to_wire(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array with the same bytes (no copy when contiguous)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor.view(_WIRE_VIEW.get(tensor.dtype, tensor.dtype)).numpy()


def from_wire(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of `dtype` holding `array`'s bytes (a copy: arrays from Ray are read-only)."""
    out = torch.empty(array.shape, dtype=dtype)
    write_wire(out, slice(None), array)
    return out


def write_wire(dst: torch.Tensor, index: Any, array: np.ndarray) -> None:
    """dst[index] = array's bytes, in one copy (numpy indexing on the same memory)."""
    view = dst.view(_WIRE_VIEW.get(dst.dtype, dst.dtype)).numpy()
    if array.dtype != view.dtype:
        raise ValueError(f"wire array has dtype {array.dtype}; expected {view.dtype} for {dst.dtype}")
    view[index] = array


# ---------------------------------------------------------------------- the lending side
class LenderActor:
    """Pages lent by one process: per layer `capacity` slots of `[H_kv, page_size, D]` keys and
    values in the layout's dtype. Pools grow by doubling up to `capacity`, never past it.

    Run as a Ray actor (`RemoteCluster` wraps it); a plain instance (placement None, no
    heartbeats) is the same code, for tests.
    """

    def __init__(self, name: str, layout: KVLayout, capacity: int, placement: Any = None, heartbeat_s: float = 0.5,
                 kernel: str = "auto", threads: int | None = None) -> None:
        self.name = name
        self.layout = layout
        self.capacity = capacity
        self.kernel, self.threads = kernel, threads
        self.placement = placement
        self.heartbeat_s = heartbeat_s
        self._wire_dtype = to_wire(torch.empty(0, dtype=layout.dtype)).dtype
        layers = range(layout.num_layers)
        self._keys: dict[int, torch.Tensor] = {}  # layer -> [allocated, H_kv, page_size, D], made on first put
        self._values: dict[int, torch.Tensor] = {}
        self._free: dict[int, list[int]] = {layer: [] for layer in layers}  # heap of free slots below the allocation
        self._held: dict[int, set[int]] = {layer: set() for layer in layers}  # slots holding a page
        # Guards the counts the heartbeat thread reads; `_seq` grows on every change so the
        # placement actor can drop reports that arrive out of order.
        self._lock = threading.Lock()
        self._seq = 0
        if placement is not None:
            threading.Thread(target=self._beat, name=f"{name}-heartbeat", daemon=True).start()

    def ready(self) -> str:
        """Resolve the kernel here (this machine's build), report once; return the kernel name."""
        from offload.kernels import resolve_kernel

        self.kernel = resolve_kernel(self.kernel)
        if self.placement is not None:
            import ray

            ray.get(self._report(changed=True))
        return self.kernel

    # pages in and out -------------------------------------------------------
    def put(self, layer: int, keys: np.ndarray, values: np.ndarray) -> list[int]:
        """Store pages [n, H_kv, page_size, D] (wire arrays); return their slots. `TierFull` if
        this layer has fewer than n free slots (nothing is stored then)."""
        shape = (keys.shape[0], *self.layout.page_shape)
        if keys.shape != shape or values.shape != shape:
            raise ValueError(f"pages must be {list(shape)}; got {list(keys.shape)} and {list(values.shape)}")
        if keys.dtype != self._wire_dtype or values.dtype != self._wire_dtype:
            raise ValueError(f"pages must be {self.layout.dtype} as {self._wire_dtype}; "
                             f"got {keys.dtype} and {values.dtype}")
        n = shape[0]
        held = self._layer_held(layer)
        try:
            if len(held) + n > self.capacity:
                raise TierFull(f"lender {self.name}: layer {layer} has {self.capacity - len(held)} free slot(s) of "
                               f"{self.capacity}; {n} asked")
            self._grow(layer, len(held) + n)
            free = self._free[layer]
            slots = [heapq.heappop(free) for _ in range(n)]
            write_wire(self._keys[layer], slots, keys)
            write_wire(self._values[layer], slots, values)
            with self._lock:
                held.update(slots)
            return slots
        finally:
            self._report(changed=True)  # a refusal is news too: it corrects the placement's estimate

    def get(self, layer: int, slots: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the pages in `slots` (wire arrays [n, H_kv, page_size, D])."""
        self._check_held(layer, slots)
        if not slots:
            empty = np.empty((0, *self.layout.page_shape), dtype=self._wire_dtype)
            return empty, empty
        return (to_wire(self._keys[layer]).take(slots, axis=0), to_wire(self._values[layer]).take(slots, axis=0))

    def free(self, layer: int, slots: list[int]) -> None:
        self._check_held(layer, slots)
        with self._lock:
            self._held[layer].difference_update(slots)
        for slot in slots:
            heapq.heappush(self._free[layer], slot)
        self._report(changed=True)

    def attend(self, layer: int, query: np.ndarray, table: np.ndarray, counts: np.ndarray, scale: float,
               observe: int, softcap: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`attend_pages` of `query` [B, H, Q, D] float32 over this lender's pages `table` [B, n]
        (its own slots, -1 padded; counts[b] used). Returns (out, lse, page_lse) as float32 arrays."""
        table_t = torch.from_numpy(np.asarray(table, dtype=np.int64))
        counts_t = torch.from_numpy(np.asarray(counts, dtype=np.int64))
        listed = [s for row, c in zip(table_t.tolist(), counts_t.tolist()) for s in row[:c]]
        self._check_held(layer, listed)  # the compiled kernels trust the table
        if not listed:
            bsz, heads, q_len, head_dim = query.shape
            part = empty_partial(bsz, heads, q_len, head_dim, observe, table.shape[1])
        else:
            part = attend_pages(from_wire(query, torch.float32), self._keys[layer], self._values[layer], table_t,
                                counts_t, scale, observe, softcap, self.kernel, self.threads)
        return part.out.numpy(), part.lse.numpy(), part.page_lse.numpy()

    # accounting -------------------------------------------------------------
    def free_pages(self) -> int:
        """Free slots over all layers (what the heartbeat reports)."""
        with self._lock:
            return self._free_pages()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            used = [len(self._held[layer]) for layer in range(self.layout.num_layers)]
        allocated = [len(self._keys[layer]) if layer in self._keys else 0 for layer in range(self.layout.num_layers)]
        return {"name": self.name, "slots_per_layer": self.capacity, "used": used, "allocated": allocated,
                "free_pages": self.capacity * self.layout.num_layers - sum(used), "kernel": self.kernel}

    def ping(self) -> bool:
        return True

    # internals --------------------------------------------------------------
    def _grow(self, layer: int, needed: int) -> None:
        """Make the layer's pool at least `needed` slots (doubling, at most `capacity`)."""
        old = self._keys[layer].shape[0] if layer in self._keys else 0
        if needed <= old:
            return
        size = min(self.capacity, max(needed, 2 * old))
        for pools in (self._keys, self._values):
            # Zeroed, not empty: a kernel reading a padded slot must never meet NaN garbage.
            grown = torch.zeros(size, *self.layout.page_shape, dtype=self.layout.dtype)
            if old:
                grown[:old] = pools[layer]
            pools[layer] = grown
        for slot in range(old, size):
            heapq.heappush(self._free[layer], slot)

    def _layer_held(self, layer: int) -> set[int]:
        if layer not in self._held:
            raise ValueError(f"lender {self.name}: layer {layer} is not in [0, {self.layout.num_layers})")
        return self._held[layer]

    def _check_held(self, layer: int, slots: list[int]) -> None:
        held = self._layer_held(layer)
        bad = [s for s in slots if s not in held]
        if bad:
            raise ValueError(f"lender {self.name}: layer {layer} holds no page in slot(s) {bad[:8]}")

    def _report(self, changed: bool) -> Any:
        if self.placement is None:
            return None
        with self._lock:
            self._seq += changed
            free, seq = self._free_pages(), self._seq
        return self.placement.report.remote(self.name, free, seq)

    def _free_pages(self) -> int:
        return self.capacity * self.layout.num_layers - sum(len(h) for h in self._held.values())

    def _beat(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            try:
                self._report(changed=False)
            except Exception:  # the placement actor is gone (cluster closing): nothing to tell
                return


# ---------------------------------------------------------------------- placement
class PlacementActor:
    """Every lender's free pages and the time of its last heartbeat (DistKV-LLM's gManager).

    `choose` debits what it hands out from its estimate, so choices made between two heartbeats
    still spread; the lender's next report of a change replaces the estimate with the truth.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.free: dict[str, int] = {}  # lender -> free pages (estimate)
        self.seq: dict[str, int] = {}  # lender -> sequence number of its last applied report
        self.seen: dict[str, float] = {}  # lender -> clock() at its last heartbeat
        self.dead: set[str] = set()

    def report(self, name: str, free_pages: int, seq: int) -> None:
        """A heartbeat: `free_pages` as of the lender's change number `seq`."""
        self.seen[name] = self.clock()
        if seq > self.seq.get(name, -1):  # a report of an older state (arriving late) is ignored
            self.free[name], self.seq[name] = free_pages, seq

    def forget(self, name: str) -> None:
        """A borrower found `name` dead: never choose it again."""
        self.dead.add(name)

    def choose(self, num_pages: int, exclude: list[str] | tuple[str, ...] = ()) -> str | None:
        """The live lender, not in `exclude`, with the most free pages (ties: the first name);
        None if there is none. The lender's `put` decides whether the pages fit."""
        now = self.clock()
        live = [n for n in self.free if n not in exclude and self._live(n, now)]
        if not live:
            return None
        name = max(sorted(live), key=lambda n: self.free[n])
        self.free[name] -= num_pages
        return name

    def view(self) -> dict[str, dict[str, Any]]:
        """lender -> {free_pages (estimate), age_s (since its last heartbeat), live}."""
        now = self.clock()
        return {n: {"free_pages": self.free[n], "age_s": now - self.seen[n], "live": self._live(n, now)}
                for n in sorted(self.free)}

    def _live(self, name: str, now: float) -> bool:
        return name not in self.dead and now - self.seen[name] <= self.timeout_s


# ---------------------------------------------------------------------- the borrowing side
@dataclass(slots=True)
class RemoteCounters:
    """Shared by every layer's tier of one cluster."""

    pull_bytes: int = 0  # page bytes pulled over the wire by `load`
    attend_bytes: int = 0  # remote attention: query + table sent, out / lse / page_lse returned
    remote_attend_s: float = 0.0  # wall time of remote attention calls (issue to last result)
    stored_pages: int = 0  # pages written to lenders
    lost_pages: int = 0  # pages held by lenders when they were found dead


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the remote tier needs Ray: pip install 'offload[distributed]'") from exc
    return ray


_ACTORS: tuple[Any, Any] | None = None


def _actor_classes() -> tuple[Any, Any]:
    """(lender, placement) Ray actor classes, wrapped on first use so importing needs no Ray.
    num_cpus=0: they hold memory and answer calls; they must not take CPUs Ray schedules tasks on."""
    global _ACTORS
    if _ACTORS is None:
        ray = _import_ray()
        _ACTORS = (ray.remote(num_cpus=0)(LenderActor), ray.remote(num_cpus=0)(PlacementActor))
    return _ACTORS


class RemoteCluster:
    """`lenders` lender actors lending `budget` bytes each (split evenly over layers), and one
    placement actor, on the Ray cluster this process is connected to.

    Ray: if `ray.is_initialized()`, that session is used (call `ray.init` yourself first to pass a
    `runtime_env` or a namespace); else `address` None starts a local one on the loopback, and an
    address ("host:6379", "auto") joins an existing cluster. `close()` kills the actors, never Ray.
    """

    def __init__(self, layout: KVLayout, lenders: int, budget: int, address: str | None = None,
                 heartbeat_s: float = 0.5, kernel: str = "auto", threads: int | None = None) -> None:
        if not isinstance(lenders, int) or lenders < 1:
            raise ValueError(f"OFFLOAD_REMOTE_LENDERS={lenders!r}: the remote tier needs at least one lender")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s={heartbeat_s!r}: the lenders' heartbeat interval must be > 0 seconds")
        slots = budget // layout.num_layers // layout.page_bytes if budget > 0 else 0
        if slots < 1:
            need = layout.num_layers * layout.page_bytes
            raise ValueError(
                f"OFFLOAD_REMOTE_BUDGET={budget} bytes per lender holds no page per layer: {layout.num_layers} "
                f"layer(s) x {layout.page_bytes} bytes per page need at least {need} bytes")
        ray = _import_ray()
        self.layout = layout
        self.budget = budget
        self.slots_per_layer = slots
        self.heartbeat_s = heartbeat_s
        self.counters = RemoteCounters()
        self.started_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                         _node_ip_address="127.0.0.1")
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            self.started_ray = True
        self._lock = threading.Lock()  # counters, the dead set and the tiers (layers run on worker threads)
        self._tiers: dict[int, RemoteTier] = {}
        self.dead: dict[str, str] = {}  # lender -> why it is considered dead
        self.closed = False
        lender_cls, placement_cls = _actor_classes()
        self.placement = placement_cls.remote(HEARTBEAT_MISSES * heartbeat_s)
        # SPREAD: on a real cluster, lenders land on different machines (their memory is the point).
        self.lender_handles: dict[str, Any] = {
            f"lender-{i}": lender_cls.options(scheduling_strategy="SPREAD").remote(
                f"lender-{i}", layout, slots, self.placement, heartbeat_s, kernel, threads)
            for i in range(lenders)
        }
        try:  # raises here if a lender cannot start or its kernel is unavailable on its machine
            kernels = ray.get([h.ready.remote() for h in self.lender_handles.values()])
        except BaseException:
            self.close()
            raise
        self.kernels = dict(zip(self.lender_handles, kernels))  # lender -> the kernel it runs

    # ------------------------------------------------------------------ the tiers
    def tier(self, layer: int) -> RemoteTier:
        """Layer `layer`'s tier (the same object on every call)."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.layout.num_layers})")
        with self._lock:
            if layer not in self._tiers:
                self._tiers[layer] = RemoteTier(self, layer)
            return self._tiers[layer]

    def live_lenders(self) -> list[str]:
        return [n for n in self.lender_handles if n not in self.dead]

    def view(self) -> dict[str, dict[str, Any]]:
        """The placement actor's table: lender -> {free_pages, age_s, live}."""
        return _import_ray().get(self.placement.view.remote())

    def lender_stats(self) -> dict[str, dict[str, Any]]:
        """Each live lender's own `stats()` (exact slot use per layer)."""
        ray = _import_ray()
        names = self.live_lenders()
        return dict(zip(names, ray.get([self.lender_handles[n].stats.remote() for n in names])))

    # ------------------------------------------------------------------ liveness
    def mark_dead(self, name: str, cause: BaseException | str) -> None:
        """`name` is gone for every layer: its pages are lost, it is never chosen again."""
        with self._lock:
            if name in self.dead:
                return
            self.dead[name] = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
            tiers = list(self._tiers.values())
        lost = sum(t.num_on(name) for t in tiers)
        self.count(lost_pages=lost)
        if not self.closed:
            self.placement.forget.remote(name)

    def probe(self, timeout_s: float | None = None) -> list[str]:
        """Ping every lender not known dead; mark those whose actor is gone. Returns the dead.
        A lender that does not answer within `timeout_s` (default: the heartbeat timeout) is slow,
        not dead, and stays."""
        ray = _import_ray()
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout_s = HEARTBEAT_MISSES * self.heartbeat_s if timeout_s is None else timeout_s
        refs = {n: self.lender_handles[n].ping.remote() for n in self.live_lenders()}
        deadline = time.monotonic() + timeout_s
        for name, ref in refs.items():
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except RayActorError as exc:
                self.mark_dead(name, exc)
            except GetTimeoutError:
                pass
        return sorted(self.dead)

    def choose(self, num_pages: int, tried: set[str]) -> str | None:
        """Where `num_pages` new pages should go: the placement actor's choice, or, when it knows no
        fresh lender (heartbeats late under load), any live lender not yet tried."""
        ray = _import_ray()
        exclude = sorted(tried | set(self.dead))
        name = ray.get(self.placement.choose.remote(num_pages, exclude))
        if name is None:
            name = next((n for n in self.live_lenders() if n not in tried), None)
        return name

    def count(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self.counters, name, getattr(self.counters, name) + amount)

    def close(self) -> None:
        """Kill the lenders and the placement actor (their pages are gone); idempotent."""
        if self.closed:
            return
        self.closed = True
        ray = _import_ray()
        for handle in [*self.lender_handles.values(), self.placement]:
            try:
                ray.kill(handle)
            except Exception:  # already dead
                pass


class RemoteTier:
    """One layer's pages on the cluster's lenders (implements `Tier`). Slots are this tier's own
    ints; `location(slot)` is the (lender, lender slot) holding the page."""

    name = "remote"

    def __init__(self, cluster: RemoteCluster, layer: int) -> None:
        self.cluster = cluster
        self.layer = layer
        self.layout = cluster.layout
        self._where: dict[int, tuple[str, int]] = {}  # slot -> (lender, lender's slot)
        self._free: list[int] = []  # heap of released slots, reused lowest first
        self._next = 0
        self._lease: list | None = None  # [lender, pages it may still take without asking]
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Pages the live lenders may hold for this layer."""
        return self.cluster.slots_per_layer * len(self.cluster.live_lenders())

    @property
    def num_used(self) -> int:
        return len(self._where)

    def location(self, slot: int) -> tuple[str, int]:
        with self._lock:
            return self._locate(slot)

    def num_on(self, lender: str) -> int:
        with self._lock:
            return sum(1 for name, _ in self._where.values() if name == lender)

    # ------------------------------------------------------------------ pages in and out
    def store(self, keys: torch.Tensor, values: torch.Tensor) -> list[int]:
        shape = (keys.shape[0], *self.layout.page_shape) if keys.dim() == 4 else None
        if shape is None or keys.shape != shape or values.shape != shape:
            raise ValueError(f"pages must be [n, {', '.join(map(str, self.layout.page_shape))}]; got "
                             f"{list(keys.shape)} and {list(values.shape)}")
        if keys.dtype != self.layout.dtype or values.dtype != self.layout.dtype:
            raise ValueError(f"pages must be {self.layout.dtype}; got {keys.dtype} and {values.dtype}")
        n = shape[0]
        if n == 0:
            return []
        placed = self._place(to_wire(keys), to_wire(values))
        with self._lock:
            slots = [heapq.heappop(self._free) if self._free else self._new_slot() for _ in range(n)]
            self._where.update(zip(slots, placed))
        self.cluster.count(stored_pages=n)
        return slots

    def load(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        slots = [int(s) for s in slots]
        shape = (len(slots), *self.layout.page_shape)
        keys = torch.empty(shape, dtype=self.layout.dtype)
        values = torch.empty(shape, dtype=self.layout.dtype)
        groups = self._group(slots)  # lender -> (positions, lender slots)
        refs = {n: self._handle(n).get.remote(self.layer, remote) for n, (_, remote) in groups.items()
                if n not in self.cluster.dead}
        replies, cause = self._collect(refs)
        lost, pulled = [], 0
        for name, (positions, _) in groups.items():
            pages = replies.get(name)
            if pages is None:
                lost += [slots[i] for i in positions]
                continue
            k, v = pages
            write_wire(keys, positions, k)
            write_wire(values, positions, v)
            pulled += k.nbytes + v.nbytes
        self.cluster.count(pull_bytes=pulled)
        if lost:
            raise PagesLost(self.name, list(dict.fromkeys(lost)), cause)
        return keys, values

    def release(self, slots: list[int]) -> None:
        with self._lock:
            placed = [self._locate(int(s)) for s in slots]
            for s in slots:
                del self._where[int(s)]
                heapq.heappush(self._free, int(s))
        self._free_remote(placed)

    def readahead(self, slots: list[int]) -> None:
        """Nothing to do: a remote page is read by the call that needs it."""

    def close(self) -> None:
        with self._lock:
            placed = list(self._where.values())
            self._where.clear()
            self._free, self._next = [], 0
        if not self.cluster.closed:
            self._free_remote(placed)

    def lost_slots(self) -> list[int]:
        """Every slot of this layer held by a lender that is dead (lenders are pinged first)."""
        self.cluster.probe()
        dead = self.cluster.dead
        with self._lock:
            return sorted(s for s, (name, _) in self._where.items() if name in dead)

    # ------------------------------------------------------------------ remote attention
    def attend(self, query: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, scale: float, observe: int,
               softcap: float | None) -> Partial:
        bsz, num_heads, q_len, head_dim = query.shape
        width = table.shape[1]
        total = empty_partial(bsz, num_heads, q_len, head_dim, observe, width)
        rows = [row[:c] for row, c in zip(table.tolist(), counts.tolist())]
        # lender -> per sequence: (lender slots, columns of `table` they came from)
        groups: dict[str, list[tuple[list[int], list[int]]]] = {}
        with self._lock:
            for b, row in enumerate(rows):
                for col, slot in enumerate(row):
                    name, remote = self._locate(slot)
                    seqs = groups.setdefault(name, [([], []) for _ in range(bsz)])
                    seqs[b][0].append(remote)
                    seqs[b][1].append(col)
        if not groups:
            return total
        packed = {name: _pack(groups[name]) for name in sorted(groups)}  # (table, counts, columns) per lender
        q = to_wire(query.float())
        start = time.perf_counter()
        calls, sent = {}, 0
        for name, (table_l, counts_l, _) in packed.items():
            if name in self.cluster.dead:
                continue
            calls[name] = self._handle(name).attend.remote(self.layer, q, table_l, counts_l, float(scale), int(observe),
                                                           None if softcap is None else float(softcap))
            sent += q.nbytes + table_l.nbytes + counts_l.nbytes
        replies, cause = self._collect(calls)
        lost, received = [], 0
        for name, (_, _, columns) in packed.items():
            result = replies.get(name)
            if result is None:
                lost += [rows[b][c] for b, (_, cols) in enumerate(groups[name]) for c in cols]
                continue
            received += sum(a.nbytes for a in result)
            part = Partial(*(from_wire(a, torch.float32) for a in result))
            merge_into(total, part, torch.from_numpy(columns))
        self.cluster.count(attend_bytes=sent + received, remote_attend_s=time.perf_counter() - start)
        if lost:
            raise PagesLost(self.name, list(dict.fromkeys(lost)), cause)
        return total

    def _collect(self, refs: dict[str, Any]) -> tuple[dict[str, Any], BaseException | None]:
        """Each lender's reply to a call issued to all of them: {lender: result} for those that
        answered; a lender found dead is marked dead (for every layer) and its death returned."""
        ray = _import_ray()
        from ray.exceptions import RayActorError

        replies, cause = {}, None
        for name, ref in refs.items():
            try:
                replies[name] = ray.get(ref)
            except RayActorError as exc:
                self.cluster.mark_dead(name, exc)
                cause = exc
        return replies, cause

    # ------------------------------------------------------------------ planner estimates
    def wire_bytes_pull(self, n_pages: int) -> int:
        """Bytes `load` moves for `n_pages` pages."""
        return n_pages * self.layout.page_bytes

    def wire_bytes_attend(self, batch: int, heads: int, q_rows: int, head_dim: int, observe: int, n_pages: int,
                          num_lenders: int | None = None) -> int:
        """Bytes `attend` moves for a [batch, heads, q_rows, head_dim] query over `n_pages` pages per
        sequence: to each of `num_lenders` lenders (default: every live lender, at most n_pages) the
        query, its table (int32) and counts; back, out, lse and page_lse of `observe` rows (float32).
        Exact when each sequence's pages split over the lenders the same way."""
        if n_pages == 0:
            return 0
        lenders = num_lenders if num_lenders is not None else min(n_pages, len(self.cluster.live_lenders()))
        per_lender = 4 * batch * (2 * heads * q_rows * head_dim + heads * q_rows + 1)  # query, out, lse, counts
        return lenders * per_lender + 4 * batch * n_pages * (1 + heads * observe)  # table, page_lse

    # ------------------------------------------------------------------ internals
    def _place(self, keys: np.ndarray, values: np.ndarray) -> list[tuple[str, int]]:
        """Put pages on lenders: the whole batch on one if one takes it, else halves (recursively);
        all or nothing (`TierFull` after giving back what this call placed)."""
        ray = _import_ray()
        from ray.exceptions import RayActorError

        n = keys.shape[0]
        tried: set[str] = set()
        name = self._target(n, tried)
        while name is not None:
            try:
                remote = ray.get(self._handle(name).put.remote(self.layer, keys, values))
            except TierFull:
                pass
            except RayActorError as exc:
                self.cluster.mark_dead(name, exc)
            else:
                if self._lease is not None and self._lease[0] == name:
                    self._lease[1] -= n
                return [(name, r) for r in remote]
            tried.add(name)
            self._lease = None
            name = self._target(n, tried)
        if n == 1:
            cluster = self.cluster
            raise TierFull(
                f"remote tier, layer {self.layer}: no live lender has a free slot ({len(cluster.live_lenders())} live "
                f"lender(s) x {cluster.slots_per_layer} slots per layer, OFFLOAD_REMOTE_BUDGET={cluster.budget} bytes "
                f"per lender)")
        half = n // 2
        first = self._place(keys[:half], values[:half])
        try:
            return first + self._place(keys[half:], values[half:])
        except BaseException:
            self._free_remote(first)
            raise

    def _target(self, n: int, tried: set[str]) -> str | None:
        """The lender for n pages: the lease's while it covers them, else a new lease."""
        lease = self._lease
        if lease is not None and lease[1] >= n and lease[0] not in tried and lease[0] not in self.cluster.dead:
            return lease[0]
        want = max(n, LEASE_PAGES)
        name = self.cluster.choose(want, tried)
        self._lease = None if name is None else [name, want]
        return name

    def _group(self, slots: list[int]) -> dict[str, tuple[list[int], list[int]]]:
        """lender -> (positions in `slots`, lender slots), lenders in name order."""
        groups: dict[str, tuple[list[int], list[int]]] = {}
        with self._lock:
            for i, slot in enumerate(slots):
                name, remote = self._locate(slot)
                positions, remotes = groups.setdefault(name, ([], []))
                positions.append(i)
                remotes.append(remote)
        return dict(sorted(groups.items()))

    def _free_remote(self, placed: list[tuple[str, int]]) -> None:
        """Give lender slots back. Not awaited (calls to one actor run in order, so a later put
        sees the slots free); dead lenders are skipped: their memory is gone already."""
        per_lender: dict[str, list[int]] = {}
        for name, remote in placed:
            per_lender.setdefault(name, []).append(remote)
        for name, remote in per_lender.items():
            if name not in self.cluster.dead and not self.cluster.closed:
                self._handle(name).free.remote(self.layer, remote)

    def _locate(self, slot: int) -> tuple[str, int]:
        try:
            return self._where[slot]
        except KeyError:
            raise ValueError(f"remote tier, layer {self.layer}: slot {slot} holds no page") from None

    def _new_slot(self) -> int:
        self._next += 1
        return self._next - 1

    def _handle(self, name: str) -> Any:
        if self.cluster.closed:
            raise RuntimeError("the RemoteCluster is closed")
        return self.cluster.lender_handles[name]


def _pack(seqs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sequence (lender slots, columns) -> table [B, n] int32, counts [B] int32, columns [B, n]
    int64 (-1 padded)."""
    width = max(len(slots) for slots, _ in seqs)
    table = np.full((len(seqs), width), -1, dtype=np.int32)
    columns = np.full((len(seqs), width), -1, dtype=np.int64)
    for b, (slots, cols) in enumerate(seqs):
        table[b, : len(slots)] = slots
        columns[b, : len(cols)] = cols
    counts = np.array([len(slots) for slots, _ in seqs], dtype=np.int32)
    return table, counts, columns
