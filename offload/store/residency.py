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

from offload.policies import EvictionCandidates, EvictionOrder
from offload.store.append import Fresh
from offload.store.page_table import PageTable, mark_pages
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
        self.issue_many(table, [(b, pages)])

    def issue_many(self, table: PageTable, requests: list[tuple[int, list[int]]]) -> None:
        """`issue` for several sequences' pages ((sequence, pages) each) as one copy batch: one job
        for the copy engine, and pages of different sequences coalesce where their slots are consecutive."""
        pairs = [(b, p) for b, pages in requests for p in pages]
        if not pairs:
            return
        seqs, pages = zip(*pairs)
        ids = table.page_ids[list(seqs), list(pages)].tolist()
        # In host-slot order onto ascending device slots: consecutive pages copy as one transfer.
        host = table.home.host_slots(ids)
        order = sorted(range(len(pairs)), key=lambda i: (host[i] < 0, host[i]))
        pairs, ids = [pairs[i] for i in order], [ids[i] for i in order]
        slots = table.device_pool.allocate_many(len(pairs))
        batch = self.transfer.submit_h2d(table.home, ids, table.device_pool, slots)
        for (b, p), slot in zip(pairs, slots):
            table.inflight[b][p] = slot
        table.batches.append((pairs, batch))

    def complete_copies(self, table: PageTable) -> None:
        """Complete every copy into this table: flip arrived pages resident, drop failed ones."""
        for pairs, batch in table.batches:
            table.counters.stall_s += self.transfer.wait(batch)
            for b, p in pairs:
                slot = table.inflight[b].pop(p)
                if batch.error is None:
                    table.slots[b, p] = slot
                else:
                    table.device_pool.decref(slot)  # the page stays on the host: still correct
            if batch.error is not None:
                table.counters.failed_copies += len(pairs)
                log_once("copy", "a host-to-device page copy failed; those pages are read from the host", batch.error)
        table.batches.clear()

    # ------------------------------------------------------------------ room and rebalance
    def make_room(self, table: PageTable, seqs: list[int], keep: torch.Tensor, wanted: torch.Tensor) -> list[int]:
        """For each sequence of `seqs`, evict up to wanted[i] resident pages outside keep[i] ([S, P]
        bool) and the required set, lowest priority first (equal priorities: the older page);
        return how many slots each has free afterwards. The whole batch at once.

        Used by speculation, which does not protect the last query's pages: measured on the
        embedded model, protecting them halved bytes at a 25% budget but cost recall."""
        rules, num = table.rules, keep.shape[1]
        rows = torch.tensor(seqs, dtype=torch.long)
        short = wanted - (rules.slots_per_seq - table.slots_in_use_of(seqs))
        if bool((short > 0).any()):
            slots = table.slots[rows, :num]
            victims = (slots >= 0) & ~table.required_mask(seqs, num) & ~keep & (short > 0)[:, None]
            candidates = EvictionCandidates(
                score=table.scores[rows, :num].double(), last_access=table.last_used[rows, :num].double(),
                resident=torch.ones_like(victims), recently_needed=torch.zeros_like(victims),
                position=torch.arange(num, dtype=torch.float64).expand(len(seqs), num))
            rank = keep_ranks(self.order.priority(candidates), victims)
            evict = victims & (rank >= (victims.sum(dim=1) - short)[:, None])
            if bool(evict.any()):
                for slot in slots[evict].tolist():
                    table.device_pool.decref(slot)
                table.slots[rows, :num] = slots.masked_fill(evict, -1)
        return (rules.slots_per_seq - table.slots_in_use_of(seqs)).tolist()

    def rebalance(self, table: PageTable, seqs: list[int], fresh: list[Fresh] | None = None) -> None:
        """Make each sequence's resident set (the sequences `seqs`) the sinks, the recent window and
        the pages the eviction order ranks first, for the whole batch at once.

        Pages whose data is at hand on the device (`fresh[i]` for `seqs[i]`, page -> (keys, values))
        are kept without a copy; other wanted pages are promoted from the host (asynchronously), at
        most `promote_pages` per sequence and step besides required ones. Pages in flight keep their
        slots. Equal priorities keep the newer page (`keep_order`'s rule)."""
        if not seqs:
            return
        fresh = fresh if fresh is not None else [{} for _ in seqs]
        rules, pool = table.rules, table.device_pool
        num = max(table.num_complete(b) for b in seqs)
        if num == 0:
            return
        # The whole batch (a decode step's usual case) is read through views, not gathered rows.
        rows = slice(None) if seqs == list(range(table.batch_size)) else torch.tensor(seqs, dtype=torch.long)
        pages = torch.arange(num)
        exists = table.complete_mask(seqs, num)
        alive = (table.page_ids[rows, :num] >= 0) & exists
        slots = table.slots[rows, :num]
        resident = (slots >= 0) & exists
        required = table.required_mask(seqs, num)
        inflight = mark_pages(torch.zeros(len(seqs), num, dtype=torch.bool), [table.inflight[b] for b in seqs])
        num_required = required.sum(dim=1)
        assert bool((num_required <= rules.slots_per_seq - 1).all()), \
            "budget.device_rules guarantees sinks + recent window + tail fit"
        # One slot stays for the tail; pages in flight keep theirs. A sliding or chunked layer keeps
        # what its next query sees, nothing else.
        room = rules.slots_per_seq - 1 - num_required - inflight.sum(dim=1)
        if rules.local:
            room.zero_()
        at_hand = mark_pages(torch.zeros(len(seqs), num, dtype=torch.bool), fresh)
        others = alive & ~required & ~inflight
        score = table.scores[rows, :num].double()
        candidates = EvictionCandidates(
            score=score,
            last_access=table.last_used[rows, :num].double(),
            resident=resident | at_hand,
            recently_needed=table.last_needed[rows, :num],
            position=pages.double().expand(len(seqs), num),
        )
        wanted = required | (others & (keep_ranks(self.order.priority(candidates), others) < room[:, None]))

        evict = resident & ~wanted
        if bool(evict.any()):
            for slot in slots[evict].tolist():
                pool.decref(slot)
            table.slots[rows, :num] = slots.masked_fill(evict, -1)
        bring = wanted & ~resident & ~inflight
        for i, b in enumerate(seqs):  # pages at hand: one allocation and one write per sequence
            at = [p for p in fresh[i] if p < num]
            if not at:  # (a decode step's usual case)
                continue
            at = torch.tensor(at, dtype=torch.long)
            keep = at[bring[i, at]]
            if keep.numel():
                pages_kept = keep.tolist()
                slots = torch.tensor(pool.allocate_many(len(pages_kept)), dtype=torch.long)
                pool.keys[slots] = torch.stack([fresh[i][p][0] for p in pages_kept])
                pool.values[slots] = torch.stack([fresh[i][p][1] for p in pages_kept])
                table.slots[b, keep] = slots
                bring[i, keep] = False
        if not bool(bring.any()):
            return
        # Required pages all come; of the rest the highest scores (then the newest) first.
        optional = bring & ~required
        chosen = (bring & required) | (optional & (keep_ranks(score, optional) < rules.promote_pages))
        # Every sequence's promotions go as one copy batch (read as lists once: a per-row nonzero
        # costs more than the whole batch's tolist).
        self.issue_many(table, [(b, [p for p, c in enumerate(row) if c]) for b, row in zip(seqs, chosen.tolist())])


def keep_ranks(priority: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[S, P] long: each candidate's place in its row's keep order (0 = kept first), highest
    priority first, equal priorities the newer (higher) position first; non-candidates rank after
    every candidate. The batched form of `keep_order`."""
    num = priority.shape[1]
    key = torch.where(candidates, priority, torch.tensor(float("-inf"), dtype=priority.dtype)).flip(1)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # ties: newer first (flipped)
    is_candidate = candidates.flip(1).gather(1, order)
    place = torch.where(is_candidate, is_candidate.long().cumsum(dim=1) - 1, num)
    return torch.empty_like(place).scatter_(1, torch.rsub(order, num - 1), place)
