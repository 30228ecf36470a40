"""Appending a step's new tokens to a page table.

The tail page fills first; a full tail becomes a complete page (home copy written to the host
asynchronously, summary recorded on both tiers); whole pages of new tokens go straight to the host, and the
caller's residency decides which of them stay on the device without a copy (`fresh`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offload.store.page_table import PageTable
from offload.store.transfer import TransferEngine

Fresh = dict[int, tuple[torch.Tensor, torch.Tensor]]  # page -> (keys, values) still at hand on the device


@dataclass(slots=True)
class Appended:
    """What one sequence's append left for residency: complete pages still at hand on the device,
    and the tokens past the last complete page, written to the tail by `finish_tail`."""

    fresh: Fresh = field(default_factory=dict)
    leftover: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values [n, H_kv, D]


def append(table: PageTable, transfer: TransferEngine, new_keys: torch.Tensor, new_values: torch.Tensor,
           new_valid: torch.Tensor) -> list[Appended]:
    """Store the valid new tokens of every sequence; return, per sequence, what residency needs.

    new_keys/new_values: [B, H_kv, T, D] on the device; new_valid: [B, T] bool.
    The tail slot of a sequence whose tail completed is consumed (it became that page's resident
    slot); the caller rebalances, then `finish_tail` gives it a new tail slot.
    """
    ps = table.layout.page_size
    pool = table.device_pool
    appended = [Appended() for _ in range(table.batch_size)]
    if _append_to_tails(table, transfer, new_keys, new_values, new_valid):
        return appended
    for b in range(table.batch_size):
        fresh = appended[b].fresh
        valid = new_valid[b].nonzero().flatten().to(new_keys.device)
        if valid.numel() == 0:
            continue
        if table.length[b] + valid.numel() > table.max_pages * ps:
            raise RuntimeError(
                f"sequence {b} would hold {table.length[b] + valid.numel()} tokens, more than the "
                f"{table.max_pages * ps} reserved for this cache (max_tokens); reserve more at cache creation"
            )
        keys = new_keys[b].index_select(1, valid).transpose(0, 1)  # [n, H_kv, D]
        values = new_values[b].index_select(1, valid).transpose(0, 1)
        # 1. Fill the tail page; a full tail becomes a resident complete page.
        offset = table.length[b] % ps
        take = min(ps - offset, keys.shape[0])
        tail = table.tail_slot[b]
        pool.keys[tail, :, offset : offset + take] = keys[:take].transpose(0, 1)
        pool.values[tail, :, offset : offset + take] = values[:take].transpose(0, 1)
        table.length[b] += take
        if offset + take == ps:
            page = table.length[b] // ps - 1
            # (copies of the slot: its home copy lands asynchronously, and the slot may be reused before)
            complete_pages(table, transfer, [b], [page], pool.keys[tail][None].clone(), pool.values[tail][None].clone())
            table.slots[b, page] = tail
            table.tail_slot[b] = -1
        # 2. Whole pages of new tokens: home copy on the host, kept on the device if chosen later.
        rest_k, rest_v = keys[take:], values[take:]
        num_full = rest_k.shape[0] // ps
        if num_full:
            first = table.length[b] // ps
            page_k = table.layout.to_pages(rest_k[: num_full * ps])
            page_v = table.layout.to_pages(rest_v[: num_full * ps])
            complete_pages(table, transfer, [b] * num_full, list(range(first, first + num_full)), page_k, page_v)
            for i in range(num_full):
                fresh[first + i] = (page_k[i], page_v[i])
            table.length[b] += num_full * ps
        leftover = rest_k.shape[0] - num_full * ps
        if leftover:
            appended[b].leftover = (rest_k[num_full * ps :], rest_v[num_full * ps :])
    return appended


def _append_to_tails(table: PageTable, transfer: TransferEngine, new_keys: torch.Tensor, new_values: torch.Tensor,
                     new_valid: torch.Tensor) -> bool:
    """A decode step's common case in one write for the whole batch: one new token per sequence
    (none padding). Tails it completes become complete pages together (one home copy for all, their
    tail slots their resident slots, as in `append`). Returns False, writing nothing, otherwise."""
    ps = table.layout.page_size
    if new_valid.shape[1] != 1 or not bool(new_valid.all()):
        return False
    if max(table.length) + 1 > table.max_pages * ps:
        return False  # a sequence is full: the per-sequence path says so
    pool = table.device_pool
    write_tails(table, new_keys, new_values)
    done = [b for b, length in enumerate(table.length) if length % ps == ps - 1]
    if done:
        pages = [table.length[b] // ps for b in done]
        slots = [table.tail_slot[b] for b in done]
        full = torch.tensor(slots, dtype=torch.long).to(pool.keys.device, non_blocking=True)
        # (gathered copies of the slots: their home copy lands asynchronously, and a slot may be reused before)
        complete_pages(table, transfer, done, pages, pool.keys[full], pool.values[full])
        table.slots[done, pages] = torch.tensor(slots, dtype=torch.long)
        for b in done:
            table.tail_slot[b] = -1
    table.length = [length + 1 for length in table.length]
    return True


def write_tails(table: PageTable, new_keys: torch.Tensor, new_values: torch.Tensor) -> None:
    """Write each sequence's one new token (new_keys/new_values [B, H_kv, 1, D]) into its tail slot
    at its next position, in one indexed write for the whole batch. `length` is the caller's to
    advance: until then the token lies past the stored length, and writing it again is harmless."""
    pool = table.device_pool
    ps = table.layout.page_size
    # (built on the CPU and copied without waiting for a GPU's queue)
    tails = torch.tensor(table.tail_slot, dtype=torch.long).to(pool.keys.device, non_blocking=True)
    at = torch.tensor([length % ps for length in table.length], dtype=torch.long).to(pool.keys.device,
                                                                                    non_blocking=True)
    pool.keys[tails, :, at] = new_keys[:, :, 0].to(pool.keys.dtype)  # [B, H_kv, D]
    pool.values[tails, :, at] = new_values[:, :, 0].to(pool.values.dtype)


def finish_tail(table: PageTable, b: int, appended: Appended) -> None:
    """Give sequence b a tail slot again (after rebalancing) and write its leftover tokens."""
    pool = table.device_pool
    if table.tail_slot[b] < 0:
        table.tail_slot[b] = pool.allocate()
    leftover = appended.leftover
    if leftover is not None:
        n = leftover[0].shape[0]
        pool.keys[table.tail_slot[b], :, :n] = leftover[0].transpose(0, 1)
        pool.values[table.tail_slot[b], :, :n] = leftover[1].transpose(0, 1)
        table.length[b] += n


def complete_pages(table: PageTable, transfer: TransferEngine, seqs: list[int], pages: list[int], keys: torch.Tensor,
                   values: torch.Tensor) -> None:
    """Home copies (new pages of the layer's home) and summaries of complete pages: page pages[i] of
    sequence seqs[i] (keys/values: [n, H_kv, page_size, D], on the device, not written again: they
    are the source of the asynchronous home copies). One home copy for all of them."""
    n = keys.shape[0]
    home = table.home
    ids: list[int] = []
    while len(ids) < n:  # as many at a time as the host has room for (a full host spills between)
        i = len(ids)
        new = home.add(min(n - i, max(1, home.host.num_free)))
        try:  # asynchronous: the pages are landing in their home until a reader settles the copy
            transfer.to_host(home, new, keys[i : i + len(new)], values[i : i + len(new)])
        finally:
            home.unpin(new)
        ids += new
    key_min, key_max = keys.amin(dim=2), keys.amax(dim=2)  # over each page's tokens: [n, H_kv, D]
    table.page_ids[seqs, pages] = torch.tensor(ids, dtype=torch.long)
    if table.key_min is not None:  # (sliding layers keep no device summaries)
        table.key_min[seqs, pages] = key_min
        table.key_max[seqs, pages] = key_max
        table.summaries_changed()
    at = torch.tensor(ids, dtype=torch.long)
    home.key_min[at] = key_min.to(home.key_min.device)
    home.key_max[at] = key_max.to(home.key_max.device)
