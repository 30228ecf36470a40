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
    needed:       decode only: per sequence, the non-required pages the query selected
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
    needed: list[set[int]] | None
    observe: int
    window: int | None = None
    chunk: int | None = None
    gather_ids: torch.Tensor | None = None
    gather_pos: torch.Tensor | None = None
    head_keep: torch.Tensor | None = None


def count_needed(table: PageTable, needed: list[set[int]]) -> None:
    """Recall bookkeeping: needed pages already resident or in flight, speculation hits."""
    table.step += 1
    missed = False
    for b in range(table.batch_size):
        on_device = needed[b] & (set(table.resident_pages(b)) | set(table.inflight[b]))
        missed |= len(on_device) < len(needed[b])
        table.counters.needed_pages += len(needed[b])
        table.counters.needed_on_device += len(on_device)
        table.counters.prefetch_hit_pages += len(needed[b] & table.issued[b])
        table.issued[b].clear()
        if needed[b]:
            table.last_used[b, torch.tensor(sorted(needed[b]), dtype=torch.long)] = float(table.step)
    table.last_needed = needed
    table.quiet_steps = 0 if missed else table.quiet_steps + 1


def new_positions(table: PageTable, new_valid: torch.Tensor) -> torch.Tensor:
    """[B, T] stored position of each valid new token, -1 for padding."""
    lengths = torch.tensor(table.length, dtype=torch.long)
    counts = new_valid.long().cumsum(dim=1)
    return torch.where(new_valid, lengths[:, None] + counts - 1, torch.full_like(counts, -1))


def plan(table: PageTable, new_valid: torch.Tensor, attend: list[set[int]] | None, decode: bool | None = None,
         new_pos: torch.Tensor | None = None, head_keep: torch.Tensor | None = None) -> LayerPlan:
    """The plan of a step whose copies are complete. `attend` is None for prefill (and for sliding
    layers); in sparse mode only the complete pages in `attend` are attended (the tail always is),
    otherwise every stored page is. A sliding layer attends the pages its window reaches, all in
    the device part. `new_pos` [B, T]: the queries' positions when they are not the next ones (a
    layer reading another layer's KV after that layer stored the new tokens). `head_keep`
    [B, H_kv, max_pages] bool (sparse mode): KV heads attend different pages; every attended page
    is then read into the device part, where keys are masked per head."""
    q_len = new_valid.shape[1]
    decode = attend is not None if decode is None else decode
    selected = attend if (attend is not None and table.rules.sparse) else None
    per_head = head_keep is not None and selected is not None
    ps = table.layout.page_size
    device_pages, host_pages, gather_pages = [], [], []
    for b in range(table.batch_size):
        n = table.num_complete(b)
        resident = table.slots[b, :n] >= 0
        alive = table.page_ids[b, :n] >= 0
        # The earliest query of this step: the next position, or (a reader of another layer's KV,
        # whose new tokens are already stored) the earliest position given.
        real = new_pos[b][new_pos[b] >= 0] if new_pos is not None else None
        earliest = int(real.min()) if real is not None and real.numel() else table.length[b]
        if table.rules.local:
            first = max(table.dropped[b], table.first_visible(b, earliest) // ps)  # the oldest page it sees
            device_pages.append([p for p in resident.nonzero().flatten().tolist() if p >= first])
            gather_pages.append([p for p in (~resident & alive).nonzero().flatten().tolist() if p >= first])
            host_pages.append([])
            continue
        device_pages.append(_attended(b, resident.nonzero().flatten().tolist(), selected))
        host = (~resident & alive).nonzero().flatten().tolist()
        # Host kernels see every key of their pages: pages reaching the queries' own positions
        # (already stored for a reader) are read into the device part, where keys are masked causally.
        late = [p for p in host if (p + 1) * ps > earliest]
        host = [p for p in host if (p + 1) * ps <= earliest]
        if selected is not None and table.rules.skip_misses:
            table.counters.skipped_pages += len(_attended(b, host, selected))
            host = []
        host = _attended(b, host, selected)
        if per_head:  # per-head masks apply in the device part only
            late, host = late + host, []
        gather_pages.append(late)
        host_pages.append(host)
    if per_head:
        table.counters.gathered_bytes += sum(map(len, gather_pages)) * table.layout.page_bytes
    page_idx = _pad(device_pages)
    slots = torch.where(page_idx >= 0, table.slots.gather(1, page_idx.clamp(min=0)), torch.zeros_like(page_idx))
    page_pos = _positions(page_idx, ps)
    lengths = torch.tensor(table.length, dtype=torch.long)
    offsets = torch.arange(ps)
    tail_pos = torch.where(offsets[None, :] < (lengths % ps)[:, None], ((lengths // ps) * ps)[:, None] + offsets, -1)
    tails = torch.tensor(table.tail_slot, dtype=torch.long)
    logical = _pad(host_pages)
    host_table = torch.where(logical >= 0, table.page_ids.gather(1, logical.clamp(min=0)), torch.zeros_like(logical))
    return LayerPlan(
        decode=decode,
        new_pos=new_positions(table, new_valid) if new_pos is None else new_pos,
        device_slots=torch.cat([slots, tails[:, None]], dim=1),
        device_pos=torch.cat([page_pos, tail_pos], dim=1),
        host_table=host_table,
        host_pages=logical,
        host_counts=torch.tensor([len(p) for p in host_pages], dtype=torch.long),
        needed=attend,
        observe=min(q_len, OBSERVATION_WINDOW),
        window=table.rules.window,
        chunk=table.rules.chunk,
        head_keep=_head_keep(table, head_keep) if per_head else None,
        **(_gather(table, gather_pages) if any(gather_pages) else {}),
    )


def _head_keep(table: PageTable, head_keep: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, max_pages + 1] bool: which KV heads see each page's keys (the tail, new tokens
    and any page past the complete ones: every head)."""
    out = torch.ones(table.batch_size, head_keep.shape[1], table.max_pages + 1, dtype=torch.bool)
    for b in range(table.batch_size):
        n = table.num_complete(b)
        out[b, :, :n] = head_keep[b, :, :n]
    return out


def _positions(page_idx: torch.Tensor, ps: int) -> torch.Tensor:
    """[B, n * page_size] key positions of the pages in page_idx [B, n] (-1 where none)."""
    offsets = torch.arange(ps)
    pos = torch.where(page_idx[:, :, None] >= 0, page_idx[:, :, None] * ps + offsets, -1)
    return pos.reshape(page_idx.shape[0], -1)


def _gather(table: PageTable, pages: list[list[int]]) -> dict:
    idx = _pad(pages)
    ids = torch.where(idx >= 0, table.page_ids.gather(1, idx.clamp(min=0)), torch.zeros_like(idx))
    return {"gather_ids": ids, "gather_pos": _positions(idx, table.layout.page_size)}


def _attended(b: int, pages: list[int], selected: list[set[int]] | None) -> list[int]:
    """The pages of `pages` that sequence b attends: all, or (sparse) the selected ones."""
    if selected is None:
        return pages
    return [p for p in pages if p in selected[b]]


def _pad(per_seq: list[list[int]]) -> torch.Tensor:
    """[B, max_n] page numbers, -1 padded."""
    num = max((len(p) for p in per_seq), default=0)
    table = torch.full((len(per_seq), num), -1, dtype=torch.long)
    for b, pages in enumerate(per_seq):
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.long)
    return table
