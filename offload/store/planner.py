"""Planning one layer's step: which pages a query attends, and where (device part or host part).

The KV policy says which pages a decode query attends (`store/selection.py`); `plan` turns that
and the table's residency into a `LayerPlan`, the only thing `run` reads. Planning never
moves data: copies are issued and completed by `Residency`, before planning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.store.page_table import PageTable

# Query blocks longer than this are prefill: attended exactly whatever the mode, no speculation.
MAX_DECODE_QUERY = 16
# Query rows whose attention feeds page scores (SnapKV's observation window).
OBSERVATION_WINDOW = 32


@dataclass(slots=True)
class LayerPlan:
    """Where each key of one layer's step is attended. Positions are stored-token positions.

    new_pos:      [B, T] long, stored position of each new token (-1: padding, never stored)
    device_slots: [B, n_dev + 1] long, device slots of the attended resident pages, then the tail
    device_pos:   [B, (n_dev + 1) * page_size] long, key positions of those slots (-1: no key)
    host_table:   [B, n_host] long, host ids of the pages the host part attends
    host_pages:   [B, n_host] long, their logical page numbers (-1 padded)
    host_counts:  [B] long, entries of host_table used per sequence
    observe:      query rows (the last ones) whose attention feeds page scores
    window:       sliding layer: a query sees keys at positions > its own - window (else None)
    chunk:        chunked layer: a query sees keys of its own chunk (position // chunk) only
    gather_ids:   [B, n_gather] long, sliding layer: host ids of window pages not resident (copy
                  failed or not yet back), read into the device part so the window mask applies
    gather_pos:   [B, n_gather * page_size] long, their key positions (-1: no key)
    head_keep:    [B, H_kv, max_pages + 1] bool, per-head selections: which KV heads see each page
    """

    decode: bool
    new_pos: torch.Tensor
    device_slots: torch.Tensor
    device_pos: torch.Tensor
    host_table: torch.Tensor
    host_pages: torch.Tensor
    host_counts: torch.Tensor
    observe: int
    window: int | None = None
    chunk: int | None = None
    gather_ids: torch.Tensor | None = None
    gather_pos: torch.Tensor | None = None
    head_keep: torch.Tensor | None = None


def count_needed(table: PageTable, needed: torch.Tensor) -> None:
    """Recall bookkeeping for needed [B, max_pages] bool (the non-required pages a decode query
    selected): those already resident or in flight, speculation hits; all batch-wide on tensors."""
    table.step += 1
    on_device = needed & table.on_device_mask(table.max_pages)
    num_needed, num_on = int(needed.sum()), int(on_device.sum())
    table.counters.needed_pages += num_needed
    table.counters.needed_on_device += num_on
    table.counters.prefetch_hit_pages += int((needed & table.issued).sum())
    table.issued.zero_()
    table.last_used[needed] = float(table.step)
    table.last_needed = needed
    table.quiet_steps = 0 if num_on < num_needed else table.quiet_steps + 1


def new_positions(table: PageTable, new_valid: torch.Tensor) -> torch.Tensor:
    """[B, T] stored position of each valid new token, -1 for padding."""
    lengths = table.lengths_of()
    counts = new_valid.long().cumsum(dim=1)
    return torch.where(new_valid, lengths[:, None] + counts - 1, torch.full_like(counts, -1))


def plan(table: PageTable, new_valid: torch.Tensor, attend: torch.Tensor | None, decode: bool | None = None,
         new_pos: torch.Tensor | None = None, head_keep: torch.Tensor | None = None) -> LayerPlan:
    """The plan of a step whose copies are complete. `attend` [B, max_pages] bool is None for
    prefill (and for sliding layers); in sparse mode only the complete pages it marks are attended
    (the tail always is), otherwise every stored page is. A sliding layer attends the pages its
    window reaches, all in the device part. `new_pos` [B, T]: the queries' positions when they are
    not the next ones (a layer reading another layer's KV after that layer stored the new tokens).
    `head_keep` [B, H_kv, max_pages] bool (sparse mode): KV heads attend different pages; every
    attended page is then read into the device part, where keys are masked per head.
    Built on [B, pages] masks for the whole batch; no per-sequence loop."""
    q_len = new_valid.shape[1]
    decode = attend is not None if decode is None else decode
    selected = attend is not None and table.rules.sparse
    per_head = head_keep is not None and selected
    ps = table.layout.page_size
    bsz = table.batch_size
    lengths = table.lengths_of()
    counts = lengths.div(ps, rounding_mode="floor")
    num = max(table.length) // ps if bsz else 0
    pages = torch.arange(num)
    exists = pages[None, :] < counts[:, None]
    resident = (table.slots[:, :num] >= 0) & exists
    alive = (table.page_ids[:, :num] >= 0) & exists
    # The earliest query of this step: the next position, or (a reader of another layer's KV,
    # whose new tokens are already stored) the earliest position given.
    earliest = lengths
    if new_pos is not None:
        given = torch.where(new_pos >= 0, new_pos, torch.iinfo(torch.long).max).amin(dim=1)
        earliest = torch.where((new_pos >= 0).any(dim=1), given, lengths)
    nothing = torch.zeros_like(exists)
    if table.rules.local:
        first = torch.tensor([max(table.dropped[b], table.first_visible(b, int(earliest[b])) // ps) for b in range(bsz)],
                             dtype=torch.long)
        seen = pages[None, :] >= first[:, None]  # the oldest page it sees, on
        device, gather, host = resident & seen, ~resident & alive & seen, nothing
    else:
        chosen = attend[:, :num] if selected else exists
        device = resident & chosen
        stored = ~resident & alive
        # Host kernels see every key of their pages: pages reaching the queries' own positions
        # (already stored for a reader) are read into the device part, where keys are masked causally.
        gather = stored & ((pages[None, :] + 1) * ps > earliest[:, None])
        host = stored & ~gather & chosen
        if selected and table.rules.skip_misses:
            table.counters.skipped_pages += int(host.sum())
            host = nothing
        if per_head:  # per-head masks apply in the device part only
            gather, host = gather | host, nothing
    if per_head:
        table.counters.gathered_bytes += int(gather.sum()) * table.layout.page_bytes
    page_idx = _compact(device)
    slots = table.slots.gather(1, page_idx.clamp(min=0)).masked_fill(page_idx < 0, 0)
    offsets = torch.arange(ps)
    tail_pos = (counts * ps)[:, None] + offsets
    tail_pos = tail_pos.masked_fill(tail_pos >= lengths[:, None], -1)
    tails = torch.tensor(table.tail_slot, dtype=torch.long)
    logical = _compact(host)
    host_table = table.page_ids.gather(1, logical.clamp(min=0)).masked_fill(logical < 0, 0)
    return LayerPlan(
        decode=decode,
        new_pos=new_positions(table, new_valid) if new_pos is None else new_pos,
        device_slots=torch.cat([slots, tails[:, None]], dim=1),
        device_pos=torch.cat([_positions(page_idx, ps), tail_pos], dim=1),
        host_table=host_table,
        host_pages=logical,
        host_counts=host.sum(dim=1),
        observe=min(q_len, OBSERVATION_WINDOW),
        window=table.rules.window,
        chunk=table.rules.chunk,
        head_keep=_head_keep(table, head_keep, counts) if per_head else None,
        **(_gather(table, gather) if bool(gather.any()) else {}),
    )


def _head_keep(table: PageTable, head_keep: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, max_pages + 1] bool: which KV heads see each page's keys (the tail, new tokens
    and any page past the complete ones: every head)."""
    out = torch.ones(table.batch_size, head_keep.shape[1], table.max_pages + 1, dtype=torch.bool)
    complete = torch.arange(table.max_pages)[None, :] < counts[:, None]  # [B, max_pages]
    out[:, :, : table.max_pages] = torch.where(complete[:, None, :], head_keep[:, :, : table.max_pages], True)
    return out


def _positions(page_idx: torch.Tensor, ps: int) -> torch.Tensor:
    """[B, n * page_size] key positions of the pages in page_idx [B, n] (-1 where none)."""
    offsets = torch.arange(ps)
    pos = torch.where(page_idx[:, :, None] >= 0, page_idx[:, :, None] * ps + offsets, -1)
    return pos.reshape(page_idx.shape[0], -1)


def _gather(table: PageTable, pages: torch.Tensor) -> dict:
    idx = _compact(pages)
    ids = torch.where(idx >= 0, table.page_ids.gather(1, idx.clamp(min=0)), torch.zeros_like(idx))
    return {"gather_ids": ids, "gather_pos": _positions(idx, table.layout.page_size)}


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """[B, max_n] the marked page numbers of each row of mask [B, P], ascending, -1 padded."""
    num = mask.shape[1]
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    idx = torch.where(mask, torch.arange(num), num).sort(dim=1).values[:, :width]
    return torch.where(idx < num, idx, -1)
