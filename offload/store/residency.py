"""Which complete pages a sequence keeps on the device, and the two-phase copies that bring them.

Copies in are two-phase (vLLM's offloading manager): `issue` *prepares* a copy by allocating,
and thereby pinning, the destination slots (reference count 1: nothing evicts or reuses them),
then submits it; `complete_copies` waits for it and only then flips the pages resident. A failed
copy leaves its pages on the host, which stays correct.

What stays is the eviction order's decision (`OffloadConfig.device_eviction`), beside the pages
that must stay (sinks, recent window) and within the sequence's slot quota.
"""

from __future__ import annotations

import logging

import torch

from offload.policies import EvictionCandidates, EvictionOrder, keep_order
from offload.store.page_table import PageTable
from offload.store.transfer import TransferEngine

logger = logging.getLogger("offload")
_logged_once: set[str] = set()


def log_once(key: str, message: str, exc: BaseException) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.warning("%s (%s: %s); falling back to a correct synchronous path", message, type(exc).__name__, exc)


class Residency:
    def __init__(self, transfer: TransferEngine, order: EvictionOrder) -> None:
        self.transfer = transfer
        self.order = order

    # ------------------------------------------------------------------ copies in (two-phase)
    def issue(self, table: PageTable, b: int, pages: list[int]) -> None:
        """Prepare (allocate = pin destination slots) and submit copies of host pages into the device."""
        if not pages:
            return
        ids = [int(table.page_ids[b, p]) for p in pages]
        # In host-slot order onto ascending device slots: consecutive pages copy as one transfer.
        host = table.home.host_slots(ids)
        order = sorted(range(len(pages)), key=lambda i: (host[i] < 0, host[i]))
        pages, ids = [pages[i] for i in order], [ids[i] for i in order]
        slots = table.device_pool.allocate_many(len(pages))
        batch = self.transfer.submit_h2d(table.home, ids, table.device_pool, slots)
        for p, slot in zip(pages, slots):
            table.inflight[b][p] = slot
        table.batches.append((b, list(pages), batch))

    def complete_copies(self, table: PageTable) -> None:
        """Complete every copy into this table: flip arrived pages resident, drop failed ones."""
        for b, pages, batch in table.batches:
            table.counters.stall_s += self.transfer.wait(batch)
            for p in pages:
                slot = table.inflight[b].pop(p)
                if batch.error is None:
                    table.slots[b, p] = slot
                else:
                    table.device_pool.decref(slot)  # the page stays on the host: still correct
            if batch.error is not None:
                table.counters.failed_copies += len(pages)
                log_once("copy", "a host-to-device page copy failed; those pages are read from the host", batch.error)
        table.batches.clear()

    # ------------------------------------------------------------------ room and rebalance
    def _candidates(self, table: PageTable, b: int, pages: list[int], resident: set[int], needed: set[int]):
        idx = torch.tensor(pages, dtype=torch.long)
        return EvictionCandidates.of(
            len(pages),
            score=table.scores[b, idx],
            last_access=table.last_used[b, idx],
            resident=torch.tensor([p in resident for p in pages], dtype=torch.bool),
            recently_needed=torch.tensor([p in needed for p in pages], dtype=torch.bool),
            position=idx,
        )

    def make_room(self, table: PageTable, b: int, keep: set[int], num: int) -> int:
        """Evict up to `num` resident pages outside `keep` and the required set, lowest priority
        first; return how many slots are free for sequence b afterwards.

        Used by speculation, which does not protect the last query's pages: measured on the
        embedded model, protecting them halved bytes at a 25% budget but cost recall."""
        free = table.rules.slots_per_seq - table.slots_in_use(b)
        if free >= num:
            return free
        required = table.required_pages(b)
        victims = [p for p in table.resident_pages(b) if p not in required and p not in keep]
        if victims:
            order = keep_order(self.order, self._candidates(table, b, victims, set(victims), set()))
            for i in order[::-1][: num - free]:
                p = victims[i]
                table.device_pool.decref(int(table.slots[b, p]))
                table.slots[b, p] = -1
        return table.rules.slots_per_seq - table.slots_in_use(b)

    def rebalance(self, table: PageTable, b: int, fresh: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make sequence b's resident set the sinks, the recent window and the pages the eviction
        order ranks first.

        Pages whose data is at hand on the device (`fresh`) are kept without a copy; other wanted
        pages are promoted from the host (asynchronously), at most `promote_pages` per step.
        """
        rules = table.rules
        n = table.num_complete(b)
        required = table.required_pages(b)
        # One slot stays for the tail; pages in flight keep theirs.
        assert rules.slots_per_seq - 1 >= len(required), "budget.device_rules guarantees sinks + recent window + tail fit"
        room = rules.slots_per_seq - 1 - len(required) - len(table.inflight[b])
        if rules.local:
            room = 0  # a sliding or chunked layer keeps what its next query sees, nothing else
        alive = table.alive(b).tolist()
        others = [p for p in range(n) if alive[p] and p not in required and p not in table.inflight[b]]
        wanted = set(required)
        if others and room > 0:
            if room >= len(others):
                wanted.update(others)
            else:
                resident = set(table.resident_pages(b)) | set(fresh)
                order = keep_order(self.order, self._candidates(table, b, others, resident, table.last_needed[b]))
                wanted.update(others[i] for i in order[:room])
        for p in table.resident_pages(b):
            if p not in wanted:
                table.device_pool.decref(int(table.slots[b, p]))
                table.slots[b, p] = -1
        promote: list[int] = []
        resident = set(table.resident_pages(b))
        pool = table.device_pool
        for p in sorted(wanted):
            if p in resident:
                continue
            if p in fresh:
                slot = pool.allocate()
                pool.keys[slot] = fresh[p][0]
                pool.values[slot] = fresh[p][1]
                table.slots[b, p] = slot
            else:
                promote.append(p)
        score = table.scores[b].tolist()
        promote.sort(key=lambda p: (p not in required, -score[p], -p))
        chosen = [p for p in promote if p in required] + [p for p in promote if p not in required][: rules.promote_pages]
        self.issue(table, b, chosen)
