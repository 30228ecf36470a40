"""`DeviceCache`: device copies of cached prefix pages, kept from one request to the next.

When `generate` returns, its request parks; the resident copies of its pages that the prefix
tree now holds stay in their device slots (one reference each) instead of being dropped. The
next request of the same shape (same pool size) takes the pools over: its page tables adopt the
copies of the shared pages they point to, so a prefix hit needs no promotion copies for them.
A request of another shape, an evicted tree page, or `close()` drops them. Device memory stays
one set of pools, lent to one request at a time, within the budget.
"""

from __future__ import annotations

from offload.store.page_table import PageTable
from offload.store.pools import PagePool


class DeviceCache:
    def __init__(self) -> None:
        self.pools: list[PagePool] | None = None
        self.kept: list[dict[int, int]] = []  # per layer: host page id -> device slot

    def keep(self, tables: list[PageTable], cached_page_ids: list[set[int]]) -> None:
        """Hold the resident copies of `tables` whose host page is in `cached_page_ids[layer]`.
        Call before the tables detach (their copies complete)."""
        self.clear()
        self.pools = [t.device_pool for t in tables]
        for table, cached in zip(tables, cached_page_ids):
            kept: dict[int, int] = {}
            for b in range(table.batch_size):
                for p in table.resident_pages(b):
                    host_id, slot = int(table.page_ids[b, p]), int(table.slots[b, p])
                    if host_id in cached and host_id not in kept:
                        table.device_pool.incref(slot)
                        kept[host_id] = slot
            self.kept.append(kept)

    def take(self, capacities: list[int]) -> list[tuple[PagePool, dict[int, int]]] | None:
        """The pools and kept copies, if each layer's pool has the slots `capacities` asks; otherwise drop them."""
        if self.pools is None or [pool.capacity for pool in self.pools] != list(capacities):
            self.clear()
            return None
        taken = list(zip(self.pools, self.kept))
        self.pools, self.kept = None, []
        return taken

    def forget(self, page_ids: list[int]) -> None:
        """A cached page left the tree (one host id per layer): its device copy goes too."""
        if self.pools is None:
            return
        for pool, kept, host_id in zip(self.pools, self.kept, page_ids):
            slot = kept.pop(host_id, None)
            if slot is not None:
                pool.decref(slot)

    def clear(self) -> None:
        if self.pools is not None:
            for pool, kept in zip(self.pools, self.kept):
                for slot in kept.values():
                    pool.decref(slot)
        self.pools, self.kept = None, []

    @property
    def used_bytes(self) -> int:
        return sum(pool.used_bytes for pool in self.pools) if self.pools is not None else 0
