"""`PageTable`: one layer's view of one request's pages (every sequence of its batch).

Per sequence b, logical page p holds stored tokens [p * page_size, (p + 1) * page_size).
Only valid tokens are stored (left padding never is), so stored positions are per sequence.

- Every complete page is a page of the layer's `PageHome` (`page_ids[b, p]`, one reference held
  by this table; the prefix tree and other requests may hold more), whose home copy is on the
  host or in a lower tier (disk, remote).
- The partial last page lives only in the device pool (`tail_slot[b]`), or, while the request is
  parked between calls, in `parked_tails` on the host.
- Some complete pages are also resident in the device pool (`slots[b, p]`); pages being copied
  in are `inflight` (their slots are allocated, so counted and never reused) and become resident
  only when their copy completed (`Residency.complete_copies`).
- `key_min/key_max[b, p]` summarise each complete page's keys (Quest), on the device; the home
  keeps the same summaries keyed by page id, so a table can be rebuilt from page ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.store.layout import KVLayout
from offload.store.home import PageHome
from offload.store.transfer import CopyBatch


@dataclass(slots=True)
class LayerCounters:
    device_attn_s: float = 0.0
    host_attn_s: float = 0.0
    stall_s: float = 0.0  # compute waiting for copies
    needed_pages: int = 0  # decode steps: non-required pages the real query selects
    needed_on_device: int = 0  # ... of which resident or in flight when the layer ran
    prefetch_issued_pages: int = 0
    prefetch_hit_pages: int = 0  # issued pages that the real query then needed
    prefetch_skipped: int = 0  # speculations left out: the layer's selections were all on the device
    skipped_pages: int = 0  # sparse mode with skip_misses: needed pages not attended
    failed_copies: int = 0
    failed_kernels: int = 0
    mass_device: float | torch.Tensor = 0.0  # summed over decode rows: share of attention mass on the device part
    # (on a GPU a 0-dim tensor there, read by Request.stats)
    mass_rows: int = 0
    dropped_pages: int = 0  # effect="drop": pages this request freed for good
    gathered_bytes: int = 0  # host pages read into the device part (per-head selections)
    policy_read_bytes: int = 0  # keys a policy read to choose pages (SparQ's components, the oracle's keys)
    oracle_pages: int = 0  # measured runs: the oracle's top pages at the policy's budget, per KV head
    oracle_hits: int = 0  # ... of which the policy kept
    mass_missed: float = 0.0  # measured runs: exact attention mass on pages the policy left out
    mass_measured_rows: int = 0  # query rows (x heads) measured
    merged_pages: int = 0  # merging policies: pages merged into one token per KV head
    device_read_bytes: int = 0  # KV bytes the device part read (resident pages, tail, new tokens, gathers)
    host_read_bytes: int = 0  # KV bytes the host part read (pages attended on the CPU or by a lower tier)


@dataclass(slots=True)
class ResidencyRules:
    """How many pages a sequence keeps on the device, and which must stay."""

    slots_per_seq: int  # device slots one sequence may hold (complete pages + in flight + tail)
    sink_pages: int
    recent_tokens: int
    promote_pages: int  # most criticality promotions per sequence and step
    sparse: bool
    token_budget: int
    skip_misses: bool = False  # sparse mode: needed pages not on the device are skipped, not read on the host
    window: int | None = None  # sliding-window layer: a query sees its last `window` tokens only
    chunk: int | None = None  # chunked-attention layer: a query sees the tokens of its own chunk only
    crop_margin: int = 64  # local layers: tokens kept beyond what they attend, so `crop` can go back that far

    @property
    def local(self) -> bool:
        """A layer whose queries see a bounded span (window or chunk): it keeps only that span."""
        return self.window is not None or self.chunk is not None


# A sliding layer keeps at least this many tokens beyond its window (host copies only), so that
# `crop` (assisted decoding rejects candidate tokens) can move the window back; a call that may
# crop more (a longer lookahead) raises its rules' crop_margin.
CROP_MARGIN = 64


def mark_pages(mask: torch.Tensor, members: list) -> torch.Tensor:
    """Set mask [rows, num] True at the pages (< num) each row's collection (`members[i]`, any
    iterable of page numbers) holds, in one indexed write; returns mask."""
    num = mask.shape[1]
    rows, cols = [], []
    for i, pages in enumerate(members):
        for p in pages:
            if p < num:
                rows.append(i)
                cols.append(p)
    if rows:
        mask[rows, cols] = True
    return mask


class PageTable:
    def __init__(self, layout: KVLayout, batch_size: int, max_pages: int, home: PageHome,
                 track_values: bool = False) -> None:
        self.layout = layout
        self.batch_size = batch_size
        self.max_pages = max_pages
        self.home = home
        self.device_pool: PagePool | None = None  # set while the request holds device memory
        self.rules: ResidencyRules | None = None
        self.length = [0] * batch_size
        self._lengths_key: tuple[int, ...] | None = None  # (lengths_of's tensor and what it was made from)
        self._lengths: torch.Tensor | None = None
        self.page_ids = torch.full((batch_size, max_pages), -1, dtype=torch.long)
        self.slots = torch.full((batch_size, max_pages), -1, dtype=torch.long)
        self.tail_slot = [-1] * batch_size
        self.parked_tails: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * batch_size
        self.inflight: list[dict[int, int]] = [{} for _ in range(batch_size)]  # page -> slot
        self.batches: list[tuple[list[tuple[int, int]], CopyBatch]] = []  # ((seq, page) pairs, batch) submitted
        self.issued = torch.zeros(batch_size, max_pages, dtype=torch.bool)  # speculated, not yet judged
        self.last_needed = torch.zeros(batch_size, max_pages, dtype=torch.bool)  # the last decode query's pages
        # One extra column collects the mass of invalid keys, so scatter needs no masking.
        self.scores = torch.zeros(batch_size, max_pages + 1, dtype=torch.float32)
        self.last_used = torch.zeros(batch_size, max_pages, dtype=torch.float64)  # step of last selection
        self.step = 0
        self.scale: float | None = None  # the layer's attention scale, once it attended (speculation uses it)
        self.quiet_steps = 0  # consecutive decode steps whose selected pages were all on the device
        self.dropped = [0] * batch_size  # sliding layers: leading pages freed (out of the window)
        self.key_min: torch.Tensor | None = None  # [B, max_pages, H_kv, D] on the device
        self.key_max: torch.Tensor | None = None
        self._float_summaries: tuple[torch.Tensor, torch.Tensor] | None = None  # (made by float_summaries)
        self.counters = LayerCounters()
        # What KV policies read (offload.policies): attention mass per KV head and page (the extra
        # column collects keys of no page), the prompt's observation, each sequence's own state.
        mass_shape = (batch_size, layout.num_kv_heads, max_pages + 1)
        self.acc_mass = torch.zeros(mass_shape, dtype=torch.float32)
        self.last_mass = torch.zeros(mass_shape, dtype=torch.float32)
        self.prompt_mass = torch.zeros(mass_shape, dtype=torch.float32)
        self.prompt_length = [-1] * batch_size
        self.prompt_open = False  # a prefill step ran since the last decode step
        self.policy_state: list[dict] = [{} for _ in range(batch_size)]
        # The sum of every stored value (SparQ's mean value), kept only for policies that read it.
        self.value_sum = (torch.zeros(batch_size, layout.num_kv_heads, layout.head_dim, dtype=torch.float32)
                          if track_values else None)
        # Merging policies (store/merging.py): one merged key/value per page and KV head, made lazily.
        self.merged_k: torch.Tensor | None = None  # [B, max_pages, H_kv, D] float32
        self.merged_v: torch.Tensor | None = None
        self.merged_valid: torch.Tensor | None = None  # [B, max_pages] bool
        self.merged_into: torch.Tensor | None = None  # [B, max_pages, H_kv] long, D2O: the kept page bound to
        self.merged_slots: list[int] = []  # host slots reserved for the merged tokens (the host budget counts them)

    # ------------------------------------------------------------------ state
    def num_complete(self, b: int) -> int:
        return self.length[b] // self.layout.page_size

    def summaries_changed(self) -> None:
        """Call after writing key_min / key_max: `float_summaries` is made again on next use."""
        self._float_summaries = None

    def float_summaries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """key_min, key_max in float32, as [B, max_pages, H_kv, D] views of [B, H_kv, D, max_pages]
        tensors: the layout of the selector's matmuls, made once per change of the summaries
        rather than converted at every selection and speculation."""
        if self._float_summaries is None:
            self._float_summaries = tuple(
                t.float().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for t in (self.key_min, self.key_max))
        return self._float_summaries

    def alive(self, b: int) -> torch.Tensor:
        """[num_complete] bool: complete pages that exist (a dropped or out-of-window page does not)."""
        return self.page_ids[b, : self.num_complete(b)] >= 0

    def drop_page(self, b: int, p: int) -> None:
        """Free complete page p of sequence b for good, in every tier (effect="drop"); copies must
        be complete. A page the prefix tree also holds stays there (only this reference goes)."""
        assert p not in self.inflight[b], "complete copies before dropping"
        if self.value_sum is not None:
            values = self.home.read([int(self.page_ids[b, p])])[1][0]
            self.value_sum[b] -= values.float().sum(dim=0).to(self.value_sum.device)
        self._free(b, p)
        self.scores[b, p] = 0.0
        self.counters.dropped_pages += 1

    def _free(self, b: int, p: int) -> None:
        """Give back complete page p's device slot (if resident) and host reference; it is gone."""
        if self.slots[b, p] >= 0:
            self.device_pool.decref(int(self.slots[b, p]))
            self.slots[b, p] = -1
        self.home.decref(int(self.page_ids[b, p]))
        self.page_ids[b, p] = -1

    def resident_pages(self, b: int) -> list[int]:
        n = self.num_complete(b)
        return (self.slots[b, :n] >= 0).nonzero().flatten().tolist()

    def lengths_of(self, seqs: list[int] | None = None) -> torch.Tensor:
        """[len(seqs)] long (every sequence when None): the stored tokens of each. Read-only: the
        whole batch's tensor is made once per change of `length` (every layer step asks several times)."""
        key = tuple(self.length)
        if self._lengths_key != key:
            self._lengths, self._lengths_key = torch.tensor(key, dtype=torch.long), key
        if seqs is None or len(seqs) == self.batch_size and seqs == list(range(self.batch_size)):
            return self._lengths
        return self._lengths[seqs]

    def complete_mask(self, seqs: list[int], num: int) -> torch.Tensor:
        """[len(seqs), num] bool: pages 0..num-1 that are complete pages of each sequence in `seqs`."""
        complete = self.lengths_of(seqs).div(self.layout.page_size, rounding_mode="floor")
        return torch.arange(num)[None, :] < complete[:, None]

    def on_device_mask(self, num: int) -> torch.Tensor:
        """[B, num] bool: complete pages (of the first `num`) resident or being copied in."""
        on = self.slots[:, :num] >= 0
        return mark_pages(on, self.inflight)

    def slots_in_use(self, b: int) -> int:
        return len(self.resident_pages(b)) + len(self.inflight[b]) + (1 if self.tail_slot[b] >= 0 else 0)

    def slots_in_use_of(self, seqs: list[int]) -> torch.Tensor:
        """[len(seqs)] long: `slots_in_use` of each sequence in `seqs` at once."""
        resident = (self.slots[torch.tensor(seqs, dtype=torch.long)] >= 0).sum(dim=1)
        return resident + torch.tensor([len(self.inflight[b]) + (self.tail_slot[b] >= 0) for b in seqs])

    def first_visible(self, b: int, length: int | None = None) -> int:
        """Local layers: the oldest stored position the next query (at `length`) can see."""
        length = self.length[b] if length is None else length
        if self.rules.window is not None:
            return max(0, length - (self.rules.window - 1))
        return (length // self.rules.chunk) * self.rules.chunk

    def required_pages(self, b: int) -> set[int]:
        """Complete pages that must stay resident: sinks and the recent window (a local layer:
        the pages its next query can see)."""
        return set(self.required_mask([b], self.num_complete(b))[0].nonzero().flatten().tolist())

    def required_mask(self, seqs: list[int], num: int) -> torch.Tensor:
        """[len(seqs), num] bool: `required_pages` of each sequence in `seqs`, pages 0..num-1."""
        ps = self.layout.page_size
        pages = torch.arange(num)
        exists = self.complete_mask(seqs, num)
        if self.rules.local:
            first = torch.tensor([self.first_visible(b) // ps for b in seqs])
            return exists & (pages >= first[:, None])
        required = exists & (pages < self.rules.sink_pages)
        if self.rules.recent_tokens > 0:
            lengths = self.lengths_of(seqs)
            first = (lengths - self.rules.recent_tokens).clamp(min=0).div(ps, rounding_mode="floor")
            required |= exists & (pages >= first[:, None])
        if self.counters.dropped_pages:  # a dropped page cannot be required
            required &= self.page_ids[torch.tensor(seqs, dtype=torch.long), :num] >= 0
        return required

    @property
    def on_device(self) -> bool:
        return self.device_pool is not None

    # ------------------------------------------------------------------ device memory
    def attach_device(self, device_pool: PagePool, rules: ResidencyRules, max_pages: int) -> None:
        """Give the table device memory (a fresh pool) for up to `max_pages` pages per sequence:
        summaries from the host pool, tails back from the host. Residency is the caller's."""
        self._grow(max_pages)
        self.device_pool, self.rules = device_pool, rules
        device = device_pool.device
        shape = (self.batch_size, self.max_pages, self.layout.num_kv_heads, self.layout.head_dim)
        windowed = rules.local  # a sliding or chunked layer selects nothing: no summaries
        self.key_min = None if windowed else torch.zeros(shape, dtype=self.layout.dtype, device=device)
        self.key_max = None if windowed else torch.zeros(shape, dtype=self.layout.dtype, device=device)
        self.summaries_changed()
        for b in range(self.batch_size):
            n = self.num_complete(b)
            if n and not windowed:
                ids = self.page_ids[b, :n].clamp(min=0)  # (a dropped page's summary is never read)
                self.key_min[b, :n] = self.home.key_min[ids].to(device)
                self.key_max[b, :n] = self.home.key_max[ids].to(device)
            self.tail_slot[b] = device_pool.allocate()
            parked = self.parked_tails[b]
            if parked is not None:
                used = parked[0].shape[0]
                device_pool.keys[self.tail_slot[b], :, :used] = parked[0].transpose(0, 1).to(device)
                device_pool.values[self.tail_slot[b], :, :used] = parked[1].transpose(0, 1).to(device)
                self.parked_tails[b] = None

    def adopt_resident(self, kept: dict[int, int]) -> int:
        """Point complete pages whose host copy is in `kept` (host id -> device slot of this table's
        pool) at that device copy, within the slot quota; returns how many were adopted."""
        adopted = 0
        for b in range(self.batch_size):
            for p in range(self.num_complete(b)):
                slot = kept.get(int(self.page_ids[b, p]))
                if slot is not None and self.slots[b, p] < 0 and self.slots_in_use(b) < self.rules.slots_per_seq:
                    self.device_pool.incref(slot)
                    self.slots[b, p] = slot
                    adopted += 1
        return adopted

    def detach_device(self) -> None:
        """Give the device memory back (copies must be complete): tails move to the host,
        resident copies are dropped (their home copies stay)."""
        assert not self.batches, "complete copies before detaching"
        pool = self.device_pool
        ps = self.layout.page_size
        for b in range(self.batch_size):
            tail = self.tail_slot[b]
            if tail >= 0:
                used = self.length[b] % ps
                if used:
                    self.parked_tails[b] = (pool.keys[tail, :, :used].transpose(0, 1).to("cpu", copy=True),
                                            pool.values[tail, :, :used].transpose(0, 1).to("cpu", copy=True))
                pool.decref(tail)
            self.tail_slot[b] = -1
        for slot in self.slots[self.slots >= 0].tolist():
            pool.decref(slot)
        self.slots.fill_(-1)
        self.device_pool, self.key_min, self.key_max = None, None, None
        self.summaries_changed()

    def _grow(self, max_pages: int) -> None:
        if max_pages <= self.max_pages:
            return
        extra = max_pages - self.max_pages
        bsz = self.batch_size
        self.page_ids = torch.cat([self.page_ids, torch.full((bsz, extra), -1, dtype=torch.long)], dim=1)
        self.slots = torch.cat([self.slots, torch.full((bsz, extra), -1, dtype=torch.long)], dim=1)
        scores = torch.zeros(bsz, max_pages + 1, dtype=torch.float32)
        scores[:, : self.max_pages] = self.scores[:, : self.max_pages]
        self.scores = scores
        self.last_used = torch.cat([self.last_used, torch.zeros(bsz, extra, dtype=torch.float64)], dim=1)
        self.issued = torch.cat([self.issued, torch.zeros(bsz, extra, dtype=torch.bool)], dim=1)
        self.last_needed = torch.cat([self.last_needed, torch.zeros(bsz, extra, dtype=torch.bool)], dim=1)
        for name in ("acc_mass", "last_mass", "prompt_mass"):
            old = getattr(self, name)
            grown = torch.zeros(bsz, old.shape[1], max_pages + 1, dtype=torch.float32)
            grown[:, :, : self.max_pages] = old[:, :, : self.max_pages]
            setattr(self, name, grown)
        if self.merged_k is not None:
            self.reserve_merged(max_pages)
            pad = torch.zeros(bsz, extra, *self.merged_k.shape[2:])
            self.merged_k, self.merged_v = torch.cat([self.merged_k, pad], 1), torch.cat([self.merged_v, pad], 1)
            self.merged_valid = torch.cat([self.merged_valid, torch.zeros(bsz, extra, dtype=torch.bool)], 1)
            self.merged_into = torch.cat([self.merged_into, torch.full((bsz, extra, self.merged_into.shape[2]), -1)], 1)
        self.max_pages = max_pages

    # ------------------------------------------------------------------ shared pages
    def attach_pages(self, b: int, page_ids: list[int], tail: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Start sequence b from shared complete pages (one reference taken on each) and, optionally,
        the first tokens of the next page as a private tail (copy-on-write). keys/values of the
        tail: [n, H_kv, D] with n < page_size. Device state is set up by `attach_device`. A page
        id of -1 is a page that no longer exists (a local layer freed it, a policy dropped it)."""
        if self.length[b]:
            raise RuntimeError(f"sequence {b} already holds {self.length[b]} tokens")
        for p, page in enumerate(page_ids):
            if page >= 0:
                self.home.incref(page)
            self.page_ids[b, p] = page
        while self.dropped[b] < len(page_ids) and page_ids[self.dropped[b]] < 0:
            self.dropped[b] += 1
        self.length[b] = len(page_ids) * self.layout.page_size
        if tail is not None and tail[0].shape[0]:
            self.parked_tails[b] = tail
            self.length[b] += tail[0].shape[0]
        if self.value_sum is not None:
            self.value_sum[b] = self.stored_value_sum(b)

    def drop_out_of_window(self, b: int, length: int | None = None) -> None:
        """Local layer: free (device and host) the pages no query from position `length` on (default:
        the next one) can see, beyond the crop margin."""
        first_kept = max(0, self.first_visible(b, length) - self.rules.crop_margin) // self.layout.page_size
        for p in range(self.dropped[b], min(first_kept, self.num_complete(b))):
            self._free(b, p)
        self.dropped[b] = max(self.dropped[b], min(first_kept, self.num_complete(b)))

    def crop(self, b: int, new_length: int) -> None:
        """Keep sequence b's first `new_length` stored tokens (copies must be complete). A complete
        page cut in two becomes the tail: its kept tokens are copied, the shared page is untouched."""
        ps = self.layout.page_size
        old_length = self.length[b]
        if new_length >= old_length:
            return
        if self.dropped[b] and self.first_visible(b, new_length) < self.dropped[b] * ps:
            raise ValueError(
                f"cannot crop sequence {b} back to {new_length} tokens: its local layer (window {self.rules.window}, "
                f"chunk {self.rules.chunk}) kept only {self.rules.crop_margin} tokens beyond what it attends and freed "
                "the rest"
            )
        assert not self.inflight[b], "complete copies before cropping"
        keep_pages, cut = new_length // ps, new_length % ps
        pool = self.device_pool
        tail_kv = None
        if cut and keep_pages < old_length // ps:  # the new tail was a complete page
            keys, values = self.home.read([int(self.page_ids[b, keep_pages])])
            tail_kv = (keys[0, :, :cut].transpose(0, 1).clone(), values[0, :, :cut].transpose(0, 1).clone())
        for p in range(keep_pages, old_length // ps):
            if self.slots[b, p] >= 0:
                pool.decref(int(self.slots[b, p]))
            if self.page_ids[b, p] >= 0:
                self.home.decref(int(self.page_ids[b, p]))
        self.slots[b, keep_pages:] = -1
        self.page_ids[b, keep_pages:] = -1
        self.scores[b, keep_pages:] = 0.0
        for mass in (self.acc_mass, self.last_mass, self.prompt_mass):
            mass[b, :, keep_pages:] = 0.0
        if self.merged_valid is not None:
            self.merged_valid[b, keep_pages:] = False
        self.issued[b, keep_pages:] = False
        self.last_needed[b, keep_pages:] = False
        self.length[b] = new_length
        if tail_kv is not None:
            if pool is None:
                self.parked_tails[b] = tail_kv
            else:
                pool.keys[self.tail_slot[b], :, :cut] = tail_kv[0].transpose(0, 1).to(pool.device)
                pool.values[self.tail_slot[b], :, :cut] = tail_kv[1].transpose(0, 1).to(pool.device)
        elif pool is None and self.parked_tails[b] is not None:
            kept = self.parked_tails[b]
            self.parked_tails[b] = (kept[0][:cut], kept[1][:cut]) if cut else None
        if self.value_sum is not None:
            self.value_sum[b] = self.stored_value_sum(b)

    def stored_value_sum(self, b: int) -> torch.Tensor:
        """[H_kv, D] float32: the sum of sequence b's stored values, recomputed from its pages."""
        ps = self.layout.page_size
        total = torch.zeros(self.layout.num_kv_heads, self.layout.head_dim, dtype=torch.float32)
        ids = self.page_ids[b, : self.num_complete(b)]
        ids = ids[ids >= 0]
        if ids.numel():
            total += self.home.read(ids)[1].float().sum(dim=(0, 2))  # pages [n, H_kv, S, D]
        used = self.length[b] % ps
        if used:
            if self.device_pool is not None and self.tail_slot[b] >= 0:
                total += self.device_pool.values[self.tail_slot[b], :, :used].float().sum(dim=1).cpu()
            elif self.parked_tails[b] is not None:
                total += self.parked_tails[b][1].float().sum(dim=0).cpu()
        return total

    # ------------------------------------------------------------------ batch reordering
    def select(self, indices: torch.Tensor) -> None:
        """Sequence i becomes old sequence indices[i] (beam search). Complete pages are shared by
        reference; each new sequence gets its own copy of the tail page. Copies must be complete."""
        idx = indices.long().cpu()
        if idx.numel() != self.batch_size:
            raise NotImplementedError(f"OffloadCache cannot change the batch size from {self.batch_size} to {idx.numel()}")
        assert not self.batches, "complete copies before reordering"
        pool = self.device_pool
        old_host, old_slots = self.page_ids, self.slots
        new_host, new_slots = old_host[idx], old_slots[idx]
        for ref in new_host[new_host >= 0].tolist():
            self.home.incref(ref)
        for ref in new_slots[new_slots >= 0].tolist():
            pool.incref(ref)
        for ref in old_host[old_host >= 0].tolist():
            self.home.decref(ref)
        for ref in old_slots[old_slots >= 0].tolist():
            pool.decref(ref)
        dev_idx = idx.to(pool.device)
        tails = torch.tensor(self.tail_slot, dtype=torch.long, device=pool.device)[dev_idx]
        tail_k, tail_v = pool.keys[tails].clone(), pool.values[tails].clone()
        for slot in self.tail_slot:
            pool.decref(slot)
        self.tail_slot = [pool.allocate() for _ in range(self.batch_size)]
        new_tails = torch.tensor(self.tail_slot, dtype=torch.long, device=pool.device)
        pool.keys[new_tails] = tail_k
        pool.values[new_tails] = tail_v
        self.page_ids, self.slots = new_host, new_slots
        order = idx.tolist()
        self.length = [self.length[i] for i in order]
        self.dropped = [self.dropped[i] for i in order]
        self.issued, self.last_needed = self.issued[idx], self.last_needed[idx]
        self.scores = self.scores[idx]
        self.last_used = self.last_used[idx]
        self.acc_mass, self.last_mass, self.prompt_mass = self.acc_mass[idx], self.last_mass[idx], self.prompt_mass[idx]
        self.prompt_length = [self.prompt_length[i] for i in order]
        self.policy_state = [dict(self.policy_state[i]) for i in order]
        if self.value_sum is not None:
            self.value_sum = self.value_sum[idx]
        if self.merged_k is not None:
            self.merged_k, self.merged_v, self.merged_valid = self.merged_k[idx], self.merged_v[idx], self.merged_valid[idx]
            self.merged_into = self.merged_into[idx]
        if self.key_min is not None:
            dev_idx = idx.to(self.key_min.device)
            self.key_min, self.key_max = self.key_min[dev_idx], self.key_max[dev_idx]
            self.summaries_changed()

    def reserve_merged(self, max_pages: int | None = None) -> None:
        """Merging policies: hold host slots for the merged tokens of up to `max_pages` pages per
        sequence (default: the table's), and make their storage if it is not there yet."""
        from offload.store.budget import merged_pages

        wanted = merged_pages(self.layout, self.batch_size, max_pages or self.max_pages)
        if wanted > len(self.merged_slots):
            self.merged_slots += self.home.reserve(wanted - len(self.merged_slots))
        if self.merged_k is None:
            shape = (self.batch_size, self.max_pages, self.layout.num_kv_heads, self.layout.head_dim)
            self.merged_k, self.merged_v = torch.zeros(shape), torch.zeros(shape)
            self.merged_valid = torch.zeros(self.batch_size, self.max_pages, dtype=torch.bool)
            self.merged_into = torch.full(shape[:3], -1, dtype=torch.long)

    def release(self) -> None:
        """Drop every reference this table holds (copies must be complete)."""
        if self.on_device:
            self.detach_device()
        self.home.unreserve(self.merged_slots)
        self.merged_slots = []
        for ref in self.page_ids[self.page_ids >= 0].tolist():
            self.home.decref(ref)
        self.page_ids.fill_(-1)
        self.parked_tails = [None] * self.batch_size
        self.length = [0] * self.batch_size
