"""`PageHome`: every complete page of one layer, and where it lives.

A page is a page id with a reference count (page tables, the prefix tree and in-flight copies
hold references). Its data lives in the host tier (a slot of the host `PagePool`, under the host
budget), in a lower tier (`Tier`: disk, remote), or both: pages never change once complete, so a
lower copy stays valid and spilling a page that has one is free. That pair of locations is the
page's one state; `spill` and `promote` move a page by first writing its new copy and only then
dropping the old one (two-phase), so a page is never without a copy.

With lower tiers the host is a cache over them: when it is full, the coldest unpinned page (least
attention mass, then least recently used: `touch`) spills down; the hottest lower pages a step
attended come back up (`promote`). Without lower tiers a page id is its host slot's id and
nothing here moves.

A lower tier that cannot give a page back (`PagesLost`) leaves it lost: `lost` lists such pages,
which the store recomputes from token ids and puts back with `restore`.

A new page's home copy is written asynchronously (`TransferEngine.to_host`): until that copy is
settled the page is *landing* (`landing`). Everything here that reads a host copy (`read`,
`attend`, a spill) or frees or moves host slots (`_drop_host`, the pool growing) settles the
copies concerned first (`settle`), so nothing reads a home copy before it has arrived.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from offload.sizes import format_bytes
from offload.store.layout import KVLayout
from offload.store.pools import PagePool, PoolExhausted
from offload.store.tiers import (Partial, PagesLost, Tier, TierFull, attend_loaded, attend_pages, empty_partial,
                                 merge_into)


# A full host spills this fraction of its pages at once, so spilling is rare and batched.
SPILL_FRACTION = 16


class PageHome:
    def __init__(self, layout: KVLayout, host: PagePool, lower: list[Tier] | None = None, name: str = "pages",
                 kernel: str = "auto", threads: int | None = None) -> None:
        self.layout = layout
        self.host = host
        self.lower = list(lower or [])
        self.name = name
        self.kernel, self.threads = kernel, threads
        self.refcount: list[int] = []
        self.host_slot: list[int] = []
        self.tier: list[int] = []  # index into `lower` of the lower copy, -1: none
        self.tier_slot: list[int] = []
        self.heat: list[float] = []  # decayed attention mass (what stays on the host)
        self.touched: list[int] = []  # clock of the last use
        self.pins: list[int] = []  # copies in flight that read the page: it does not spill meanwhile
        self.key_min = torch.zeros(0, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
        self.key_max = torch.zeros(0, layout.num_kv_heads, layout.head_dim, dtype=layout.dtype)
        self._free: list[int] = []
        self.clock = 0
        self._version = 0  # bumped at every location change: `_locations` rebuilds its tensors then
        self._cached: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.lost: set[int] = set()
        self.spilled_pages = 0
        self.promoted_pages = 0
        # Called with the number of pages wanted when nothing can spill; returns how many it freed.
        self.reclaim: Callable[[int], int] | None = None
        self._lock = threading.RLock()  # the copy worker reads locations beside the caller
        self.pull_remote = None  # Callable[[Tier, counts, query, observe], bool]: pull pages instead of attending remotely
        self.landing: dict[int, object] = {}  # page -> its home copy in flight (transfer.HomeCopy), until settled
        host.before_grow = self.settle  # growing copies the pool: every copy into it must have landed

    # ------------------------------------------------------------------ references
    @property
    def num_used(self) -> int:
        return len(self.refcount) - len(self._free)

    @property
    def used_bytes(self) -> int:
        """Bytes of the host tier in use."""
        return self.host.used_bytes

    @property
    def capacity(self) -> int:
        """Pages this layer can hold in every tier together."""
        return self.host.max_capacity + sum(t.capacity for t in self.lower)

    def incref(self, page: int) -> None:
        if self.refcount[page] <= 0:
            raise RuntimeError(f"{self.name}: incref of free page {page}")
        self.refcount[page] += 1

    def decref(self, page: int) -> None:
        count = self.refcount[page]
        if count <= 0:
            raise RuntimeError(f"{self.name}: decref of free page {page}")
        self.refcount[page] = count - 1
        if count == 1:
            with self._lock:
                self._drop_host(page)
                self._drop_lower(page)
                self.lost.discard(page)
                self._free.append(page)

    def pin(self, pages: list[int]) -> None:
        for page in pages:
            self.pins[page] += 1

    def unpin(self, pages: list[int]) -> None:
        for page in pages:
            self.pins[page] -= 1

    # ------------------------------------------------------------------ new pages
    def add(self, num: int) -> list[int]:
        """`num` new pages (reference count 1) with a host slot each, pinned until the caller has
        filled them (`host_slots`, then `unpin`); colder pages spill to make room."""
        if 0 < num <= self.host.num_free:  # room for all (a prefill chunk's pages): one allocation, one lock
            slots = self.host.allocate_many(num)  # (ascending: their home copies coalesce)
            with self._lock:
                pages = [self._new_id_locked() for _ in range(num)]
                for page, slot in zip(pages, slots):
                    self.pins[page] = 1
                    self.host_slot[page] = slot
                self._version += 1
            return pages
        pages = []
        try:
            for _ in range(num):
                page = self._new_id()
                pages.append(page)
                self.pins[page] = 1  # not a spill victim before its data is written
                self.host_slot[page] = self._host_slot_for_new()
                self._version += 1
        except BaseException:
            for page in pages:
                self.decref(page)
            raise
        with self._lock:  # ascending slots in page order: their home copies coalesce into few transfers
            for page, slot in zip(pages, sorted(self.host_slot[p] for p in pages)):
                self.host_slot[page] = slot
            self._version += 1
        return pages

    def _new_id(self) -> int:
        with self._lock:
            return self._new_id_locked()

    def _new_id_locked(self) -> int:
        """A new page id (reference count 1, no location); the caller holds `_lock`."""
        if self._free:
            page = self._free.pop()
        else:
            page = len(self.refcount)
            for column in (self.refcount, self.touched, self.pins):
                column.append(0)
            for column in (self.host_slot, self.tier, self.tier_slot):
                column.append(-1)
            self.heat.append(0.0)
            if page >= self.key_min.shape[0]:
                grown = max(16, 2 * self.key_min.shape[0])
                self.key_min = _grow(self.key_min, grown)
                self.key_max = _grow(self.key_max, grown)
        self.refcount[page], self.pins[page], self.heat[page] = 1, 0, 0.0
        self.host_slot[page], self.tier[page], self.tier_slot[page] = -1, -1, -1
        self._version += 1
        self.clock += 1
        self.touched[page] = self.clock
        return page

    def _host_slot_for_new(self) -> int:
        host = self.host
        if host.num_free == 0 and self.lower:
            self.spill(max(1, host.max_capacity // SPILL_FRACTION))  # in batches: one sort, one write per tier
        if host.num_free == 0 and self.reclaim is not None:
            self.reclaim(1)
        if host.num_free == 0:
            lower = "".join(f", {t.name} tier {t.num_used}/{t.capacity} pages" for t in self.lower)
            raise PoolExhausted(
                f"{self.name}: no room for a new page: host tier {host.num_used}/{host.max_capacity} pages of "
                f"{format_bytes(self.layout.page_bytes)}{lower}; raise OFFLOAD_HOST_BUDGET"
                + (" or OFFLOAD_DISK_BUDGET / OFFLOAD_REMOTE_BUDGET" if self.lower else " or add a disk tier (OFFLOAD_DISK_DIR)")
            )
        return host.allocate()

    def reserve(self, num: int) -> list[int]:
        """`num` host slots held for storage that is not pages (merged tokens), so that it counts
        against the host budget; colder pages spill to make room. Give them back with `unreserve`."""
        slots: list[int] = []
        try:
            for _ in range(num):
                slots.append(self._host_slot_for_new())
        except BaseException:
            self.unreserve(slots)
            raise
        return slots

    def unreserve(self, slots: list[int]) -> None:
        for slot in slots:
            self.host.decref(slot)

    def host_slots(self, pages: list[int]) -> list[int]:
        """The host slot of each page (-1: not on the host)."""
        with self._lock:
            return [self.host_slot[p] for p in pages]

    # ------------------------------------------------------------------ home copies in flight
    def land(self, copy) -> None:
        """Record a home copy in flight (`transfer.HomeCopy`) for its pages: readers settle it first.
        Copies that have finished meanwhile are settled here, so their sources are let go."""
        with self._lock:
            finished = {c for c in self.landing.values()  # (failed ones wait for a reader: it gets the error)
                        if c.done.is_set() and c.error is None and (c.event is None or c.event.query())}
            for page in copy.pages:
                self.landing[page] = copy
        if finished:
            self._settle(finished)

    def settle(self, pages: list[int] | None = None) -> None:
        """Wait until the home copies of `pages` (every page when None) have landed."""
        if not self.landing:
            return
        with self._lock:
            if pages is None:
                copies = set(self.landing.values())
            else:
                copies = {self.landing[p] for p in pages if p in self.landing}
        if copies:
            self._settle(copies)

    def _settle(self, copies: set) -> None:
        try:
            for copy in copies:  # (outside the lock: other readers may wait for the same copies)
                copy.settle()
        finally:
            with self._lock:
                for copy in copies:
                    if copy.settled:
                        for page in copy.pages:
                            if self.landing.get(page) is copy:
                                del self.landing[page]

    # ------------------------------------------------------------------ moving pages
    def spill(self, num: int) -> int:
        """Move up to `num` of the coldest unpinned host pages down (writing lower copies first
        where they have none, in one batch per tier); returns how many host slots were freed."""
        with self._lock:
            candidates = [p for p, slot in enumerate(self.host_slot)
                          if slot >= 0 and self.refcount[p] > 0 and self.pins[p] == 0]
            # Pages with a lower copy leave first (free), then the coldest, then the least recent.
            candidates.sort(key=lambda p: (self.tier[p] < 0, self.heat[p], self.touched[p]))
            victims = candidates[:num]
            self._write_lower([p for p in victims if self.tier[p] < 0])
            freed = 0
            for page in victims:
                if self.tier[page] >= 0:  # (a page no tier could take stays)
                    self._drop_host(page)
                    freed += 1
            self.spilled_pages += freed
            return freed

    def _write_lower(self, pages: list[int]) -> None:
        """Write lower copies of host pages, filling the tiers in order."""
        for index, tier in enumerate(self.lower):
            fit = min(len(pages), tier.capacity - tier.num_used)
            if fit <= 0:
                continue
            chosen, pages = pages[:fit], pages[fit:]
            self.settle(chosen)
            slots = torch.tensor([self.host_slot[p] for p in chosen], dtype=torch.long)
            try:
                stored = tier.store(self.host.keys.index_select(0, slots), self.host.values.index_select(0, slots))
            except (TierFull, PagesLost, OSError):
                pages = chosen + pages
                continue
            for page, slot in zip(chosen, stored):
                self.tier[page], self.tier_slot[page] = index, slot
                self._version += 1
            if not pages:
                return

    def promote(self, pages: list[int], limit: int) -> int:
        """Bring up to `limit` of `pages` (lower pages just attended, hottest first) back to the
        host, where they are hotter than what would spill for them; returns how many came up."""
        if not self.lower or limit <= 0:
            return 0
        with self._lock:
            wanted = sorted({p for p in pages if self.host_slot[p] < 0 and self.tier[p] >= 0},
                            key=lambda p: -self.heat[p])[:limit]
            promoted = 0
            for page in wanted:
                if self.host.num_free == 0:
                    coldest = min((p for p, slot in enumerate(self.host_slot)
                                   if slot >= 0 and self.pins[p] == 0 and self.refcount[p] > 0),
                                  key=lambda p: (self.heat[p], self.touched[p]), default=None)
                    if coldest is None or self.heat[coldest] >= self.heat[page]:
                        break
                    if self.tier[coldest] < 0:
                        self._write_lower([coldest])  # (its lower copy first: two-phase)
                        if self.tier[coldest] < 0:
                            break
                    self._drop_host(coldest)
                    self.spilled_pages += 1
                try:
                    keys, values = self.lower[self.tier[page]].load([self.tier_slot[page]])
                except PagesLost:
                    continue  # attended from where it is, or recomputed when it is next needed
                slot = self.host.allocate()
                self.host.keys[slot] = keys[0]
                self.host.values[slot] = values[0]
                self.host_slot[page] = slot
                self._version += 1
                promoted += 1
            self.promoted_pages += promoted
            return promoted

    def touch(self, pages: torch.Tensor, mass: torch.Tensor, decay: float) -> None:
        """Record a step's attention mass on `pages` (ids, -1 ignored): what stays on the host."""
        self.clock += 1
        for page, m in zip(pages.tolist(), mass.tolist()):
            if page >= 0:
                self.heat[page] = decay * self.heat[page] + m
                self.touched[page] = self.clock

    def _drop_host(self, page: int) -> None:
        if self.host_slot[page] >= 0:
            self.settle([page])  # (a copy still landing in the slot would overwrite its next page)
            self.host.decref(self.host_slot[page])
            self.host_slot[page] = -1
            self._version += 1

    def _drop_lower(self, page: int) -> None:
        if self.tier[page] >= 0:
            self.lower[self.tier[page]].release([self.tier_slot[page]])
            self.tier[page], self.tier_slot[page] = -1, -1
            self._version += 1

    # ------------------------------------------------------------------ losses
    def mark_lost(self, tier_index: int, slots: list[int]) -> set[int]:
        """The pages whose copy in lower tier `tier_index` sits in `slots` lost it; those with no
        host copy are lost. Returns the lost pages."""
        wanted = set(slots)
        newly = set()
        with self._lock:
            for page, (t, s) in enumerate(zip(self.tier, self.tier_slot)):
                if t == tier_index and s in wanted and self.refcount[page] > 0:
                    self.tier[page], self.tier_slot[page] = -1, -1
                    self._version += 1
                    if self.host_slot[page] < 0:
                        newly.add(page)
            self.lost |= newly
        return newly

    def sync_losses(self) -> set[int]:
        """Ask every lower tier which of its slots are gone (a lender that died) and mark them."""
        lost = set()
        for index, tier in enumerate(self.lower):
            gone = getattr(tier, "lost_slots", None)
            if gone is not None:
                lost |= self.mark_lost(index, gone())
        return lost

    def restore(self, page: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put recomputed data [H_kv, page_size, D] back for a lost page (on the host)."""
        with self._lock:
            if self.host_slot[page] < 0:
                self.host_slot[page] = self._host_slot_for_new()
                self._version += 1
            slot = self.host_slot[page]
            self.host.keys[slot] = keys.to(self.host.keys.device)
            self.host.values[slot] = values.to(self.host.values.device)
            self.lost.discard(page)

    # ------------------------------------------------------------------ reading
    def read(self, pages: list[int] | torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, H_kv, page_size, D] of `pages`, from wherever they are (CPU).
        `PagesLost` if a lower tier cannot give one back."""
        pages = pages.tolist() if isinstance(pages, torch.Tensor) else list(pages)
        n = len(pages)
        self.settle(pages)
        with self._lock:
            slots = [self.host_slot[p] for p in pages]
            lower = [(i, self.tier[p], self.tier_slot[p]) for i, (p, s) in enumerate(zip(pages, slots)) if s < 0]
            gone = [p for p in pages if p in self.lost]
        if gone:
            raise PagesLost(self.name, gone)
        if not lower:
            index = torch.tensor(slots, dtype=torch.long)
            if out is None:
                return self.host.keys.index_select(0, index), self.host.values.index_select(0, index)
            torch.index_select(self.host.keys, 0, index, out=out[0][:n])
            torch.index_select(self.host.values, 0, index, out=out[1][:n])
            return out[0][:n], out[1][:n]
        keys = out[0][:n] if out is not None else torch.empty(n, *self.layout.page_shape, dtype=self.layout.dtype)
        values = out[1][:n] if out is not None else torch.empty_like(keys)
        on_host = [i for i, s in enumerate(slots) if s >= 0]
        if on_host:
            index = torch.tensor([slots[i] for i in on_host], dtype=torch.long)
            keys[on_host] = self.host.keys.index_select(0, index)
            values[on_host] = self.host.values.index_select(0, index)
        for t in sorted({t for _, t, _ in lower}):
            rows = [i for i, tt, _ in lower if tt == t]
            try:
                k, v = self.lower[t].load([s for _, tt, s in lower if tt == t])
            except PagesLost as lost:
                self._lose(t, lost)
                raise
            keys[rows], values[rows] = k, v
        return keys, values

    def _lose(self, tier_index: int, lost: PagesLost) -> None:
        self.mark_lost(tier_index, lost.slots)
        self.sync_losses()

    def readahead(self, pages: torch.Tensor) -> None:
        """Start reading the lower-tier pages among `pages` (ids, -1 ignored) now: they are attended soon."""
        if not self.lower:
            return
        per_tier: dict[int, list[int]] = {}
        for p in pages.flatten().tolist():
            if p >= 0 and self.host_slot[p] < 0 and self.tier[p] >= 0:
                per_tier.setdefault(self.tier[p], []).append(self.tier_slot[p])
        for t, slots in per_tier.items():
            self.lower[t].readahead(slots)

    # ------------------------------------------------------------------ partial attention
    def attend(self, query: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, scale: float, observe: int,
               softcap: float | None = None, kernel: str | None = None, device: torch.device | None = None) -> Partial:
        """Partial attention of `query` [B, H, Q, D] over pages `table` [B, n] (ids; counts[b] used
        per sequence), each group of pages where it lives: host pages with the host kernel, lower
        pages by their tier (read in bounded chunks, or attended remotely), merged by log-sum-exp.
        `device`: where a prefill block over host pages is computed (`attend_pages`), when every
        page is on the host. `PagesLost` (after marking them) if a tier lost some."""
        kernel = kernel or self.kernel
        self.settle()  # (a layer's copies left a step ago: they have landed by now)
        with self._lock:
            gone = [p for b in range(table.shape[0]) for p in table[b, : int(counts[b])].tolist()
                    if p in self.lost] if self.lost else []
            if gone:
                raise PagesLost(self.name, gone)
            host_slot, tier, tier_slot = self._locations()
        used = torch.arange(table.shape[1])[None, :] < counts[:, None]
        ids = table.clamp(min=0)
        where = torch.where(used & (host_slot[ids] >= 0), -1, tier[ids])  # -1: host
        where = torch.where(used, where, torch.full_like(where, -2))  # -2: no page
        if not self.lower or bool((where[used] == -1).all()):
            slots = torch.where(used, host_slot[ids], torch.full_like(ids, -1))
            return attend_pages(query, self.host.keys, self.host.values, slots, counts, scale, observe, softcap,
                                kernel, self.threads, device)
        query = query.cpu()
        bsz, num_heads, q_len, head_dim = query.shape
        total = empty_partial(bsz, num_heads, q_len, head_dim, observe, table.shape[1])
        for group in [-1, *range(len(self.lower))]:
            mask = where == group
            if not bool(mask.any()):
                continue
            group_counts = mask.sum(dim=1)
            width = int(group_counts.max())
            slots = torch.full((bsz, width), -1, dtype=torch.long)
            columns = torch.full((bsz, width), -1, dtype=torch.long)
            for b in range(bsz):
                cols = mask[b].nonzero().flatten()
                columns[b, : cols.numel()] = cols
                slots[b, : cols.numel()] = (host_slot if group == -1 else tier_slot)[ids[b, cols]]
            if group == -1:
                part = attend_pages(query, self.host.keys, self.host.values, slots, group_counts, scale, observe,
                                    softcap, kernel, self.threads)
            else:
                part = self._attend_lower(group, query, slots, group_counts, scale, observe, softcap, kernel)
            merge_into(total, part, columns)
        return total

    def _locations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """host_slot, tier, tier_slot as tensors indexed by page id (rebuilt only after a change)."""
        if self._cached is None or self._cached[0] != self._version:
            self._cached = (self._version, torch.tensor(self.host_slot, dtype=torch.long),
                            torch.tensor(self.tier, dtype=torch.long), torch.tensor(self.tier_slot, dtype=torch.long))
        return self._cached[1:]

    def _attend_lower(self, index: int, query, slots, counts, scale, observe, softcap, kernel) -> Partial:
        tier = self.lower[index]
        try:
            if self.pull_remote is not None and hasattr(tier, "wire_bytes_attend") and self.pull_remote(
                    tier, counts, query, observe):
                return attend_loaded(tier.load, query, slots, counts, scale, observe, softcap, kernel, self.threads)
            return tier.attend(query, slots, counts, scale, observe, softcap)
        except PagesLost as lost:
            self._lose(index, lost)
            raise

    def close(self) -> None:
        for tier in self.lower:
            tier.close()


def _grow(summary: torch.Tensor, rows: int) -> torch.Tensor:
    grown = torch.zeros(rows, *summary.shape[1:], dtype=summary.dtype)
    grown[: summary.shape[0]] = summary
    return grown
