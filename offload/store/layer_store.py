"""`LayerStore`: one layer's KV pages for every sequence of the batch.

Per sequence b, logical page p holds stored tokens [p * page_size, (p + 1) * page_size).
Only valid tokens are stored (left padding never is), so stored positions are per sequence.

- Every complete page has a home copy in the host pool (`host_ids[b, p]`).
- The partial last page lives only in the device pool (`tail_slot[b]`).
- Some complete pages are also resident in the device pool (`slots[b, p]`): the sinks, the
  recent window and cached pages chosen by criticality or speculation, within the sequence's
  slot quota. Pages being copied in are `inflight` (their slots are allocated, so counted and
  never reused) and become resident only when their copy completed.
- `key_min/key_max[b, p]` summarise each complete page's keys (Quest) for page selection.

Attention over a layer is `device part (resident pages + tail + new tokens)` merged by
log-sum-exp with `host part (needed pages that are not resident)`; see `attend`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from offload.kernels import dense_attention, merge_partials, paged_attention
from offload.kernels.torch_ref import paged_attention_blocked
from offload.policies.base import PageScorer
from offload.policies.quest import page_upper_bounds
from offload.store.layout import KVLayout
from offload.store.pools import PagePool
from offload.store.transfer import CopyBatch, TransferEngine

logger = logging.getLogger("offload")

# Query blocks longer than this are prefill: attended exactly whatever the mode, no speculation.
MAX_DECODE_QUERY = 16
# Query rows whose attention feeds page scores (SnapKV's observation window).
OBSERVATION_WINDOW = 32
# Hysteresis: a resident page is displaced by criticality only by a page scoring this many times
# more. Without it, promotions and speculative prefetches evict each other's pages every step.
RESIDENT_BONUS = 2.0


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


@dataclass(slots=True)
class LayerCounters:
    device_attn_s: float = 0.0
    host_attn_s: float = 0.0
    stall_s: float = 0.0  # compute waiting for copies
    needed_pages: int = 0  # decode steps: non-required pages the real query selects
    needed_on_device: int = 0  # ... of which resident or in flight when the layer ran
    prefetch_issued_pages: int = 0
    prefetch_hit_pages: int = 0  # issued pages that the real query then needed
    skipped_pages: int = 0  # sparse mode with skip_misses: needed pages not attended
    failed_copies: int = 0
    failed_kernels: int = 0
    mass_device: float = 0.0  # summed over decode rows: share of attention mass on the device part
    mass_rows: int = 0


_logged_once: set[str] = set()


def _log_once(key: str, message: str, exc: BaseException) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.warning("%s (%s: %s); falling back to a correct synchronous path", message, type(exc).__name__, exc)


@dataclass(slots=True)
class _HostResult:
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    page_lse: torch.Tensor | None = None
    seconds: float = 0.0
    error: BaseException | None = None


class LayerStore:
    def __init__(
        self,
        layout: KVLayout,
        batch_size: int,
        max_pages: int,
        device_pool: PagePool,
        host_pool: PagePool,
        transfer: TransferEngine,
        rules: ResidencyRules,
        scorer: PageScorer,
        *,
        cpu_kernel: str = "torch",
        cpu_threads: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.layout = layout
        self.batch_size = batch_size
        self.max_pages = max_pages
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.transfer = transfer
        self.rules = rules
        self.scorer = scorer
        self.cpu_kernel = cpu_kernel
        self.cpu_threads = cpu_threads
        self.executor = executor
        device = device_pool.device
        self.length = [0] * batch_size
        self.host_ids = torch.full((batch_size, max_pages), -1, dtype=torch.long)
        self.slots = torch.full((batch_size, max_pages), -1, dtype=torch.long)
        self.tail_slot = [device_pool.allocate() for _ in range(batch_size)]
        self.inflight: list[dict[int, int]] = [{} for _ in range(batch_size)]  # page -> slot
        self._batches: list[tuple[int, list[int], CopyBatch]] = []  # (seq, pages, batch)
        self.issued: list[set[int]] = [set() for _ in range(batch_size)]  # speculated, not yet judged
        self.last_needed: list[set[int]] = [set() for _ in range(batch_size)]  # the last decode query's pages
        # One extra column collects the mass of invalid keys, so scatter needs no masking.
        self.scores = torch.zeros(batch_size, max_pages + 1, dtype=torch.float32)
        summary_shape = (batch_size, max_pages, layout.num_kv_heads, layout.head_dim)
        self.key_min = torch.zeros(summary_shape, dtype=layout.dtype, device=device)
        self.key_max = torch.zeros(summary_shape, dtype=layout.dtype, device=device)
        self.counters = LayerCounters()

    # ------------------------------------------------------------------ state
    def num_complete(self, b: int) -> int:
        return self.length[b] // self.layout.page_size

    def resident_pages(self, b: int) -> list[int]:
        n = self.num_complete(b)
        return (self.slots[b, :n] >= 0).nonzero().flatten().tolist()

    def slots_in_use(self, b: int) -> int:
        return len(self.resident_pages(b)) + len(self.inflight[b]) + (1 if self.tail_slot[b] >= 0 else 0)

    def required_pages(self, b: int) -> set[int]:
        """Complete pages that must stay resident: sinks and the recent window."""
        n = self.num_complete(b)
        required = set(range(min(self.rules.sink_pages, n)))
        if self.rules.recent_tokens > 0:
            first = max(0, (self.length[b] - self.rules.recent_tokens) // self.layout.page_size)
            required.update(range(first, n))
        return required

    def top_pages(self, query: torch.Tensor, token_budget: int | None = None) -> list[set[int]]:
        """Per sequence, the non-required complete pages a query selects: the highest upper
        bounds of q.k (Quest), as many as fit `token_budget` (default: the rules') beside sinks,
        recent window and tail."""
        ps = self.layout.page_size
        token_budget = self.rules.token_budget if token_budget is None else token_budget
        selected = []
        for b in range(self.batch_size):
            required = self.required_pages(b)
            fixed_tokens = len(required) * ps + self.length[b] % ps
            k = max(0, (token_budget - fixed_tokens) // ps)
            candidates = [p for p in range(self.num_complete(b)) if p not in required]
            if k >= len(candidates) or k == 0:
                selected.append(set(candidates) if k else set())
                continue
            idx = torch.tensor(candidates, dtype=torch.long, device=self.key_min.device)
            bounds = page_upper_bounds(query[b : b + 1], self.key_min[b : b + 1, idx], self.key_max[b : b + 1, idx])[0]
            selected.append({candidates[i] for i in torch.topk(bounds, k).indices.tolist()})
        return selected

    # ------------------------------------------------------------------ copies in (two-phase)
    def _issue(self, b: int, pages: list[int]) -> None:
        """Prepare (allocate = pin destination slots) and submit copies of host pages into the device."""
        if not pages:
            return
        slots = [self.device_pool.allocate() for _ in pages]
        host = [int(self.host_ids[b, p]) for p in pages]
        batch = self.transfer.submit_h2d(self.host_pool, host, self.device_pool, slots)
        for p, slot in zip(pages, slots):
            self.inflight[b][p] = slot
        self._batches.append((b, list(pages), batch))

    def finish_inflight(self) -> None:
        """Complete every copy into this layer: flip arrived pages resident, drop failed ones."""
        for b, pages, batch in self._batches:
            self.counters.stall_s += self.transfer.wait(batch)
            for p in pages:
                slot = self.inflight[b].pop(p)
                if batch.error is None:
                    self.slots[b, p] = slot
                else:
                    self.device_pool.decref(slot)  # the page stays on the host: still correct
            if batch.error is not None:
                self.counters.failed_copies += len(pages)
                _log_once("copy", "a host-to-device page copy failed; those pages are read from the host", batch.error)
        self._batches.clear()

    def _make_room(self, b: int, keep: set[int], num: int) -> int:
        """Evict up to `num` resident pages outside `keep` and the required set, lowest score first
        (oldest first among equals); return how many slots are free for sequence b afterwards."""
        free = self.rules.slots_per_seq - self.slots_in_use(b)
        if free >= num:
            return free
        required = self.required_pages(b)
        victims = [p for p in self.resident_pages(b) if p not in required and p not in keep]
        score = self.scores[b].tolist()
        victims.sort(key=lambda p: (score[p], p))
        for p in victims[: num - free]:
            self.device_pool.decref(int(self.slots[b, p]))
            self.slots[b, p] = -1
        return self.rules.slots_per_seq - self.slots_in_use(b)

    def speculate(self, predicted_query: torch.Tensor) -> None:
        """Prefetch the pages a predicted query [B, H, Q, D] selects, before this layer runs."""
        # As many pages as the device holds, not just the token budget: the real query's pages
        # rank near the top of the predicted ones, so a wider net catches more of them.
        selected = self.top_pages(predicted_query, (self.rules.slots_per_seq - 1) * self.layout.page_size)
        for b in range(self.batch_size):
            wanted = selected[b]
            missing = sorted(wanted - set(self.resident_pages(b)) - set(self.inflight[b]))
            if not missing:
                continue
            room = self._make_room(b, wanted, len(missing))
            # Most promising first: the predicted bound order is lost in the set, so use scores then recency.
            score = self.scores[b].tolist()
            missing.sort(key=lambda p: (-score[p], -p))
            chosen = missing[: max(0, room)]
            self._issue(b, chosen)
            self.issued[b].update(chosen)
            self.counters.prefetch_issued_pages += len(chosen)

    # ------------------------------------------------------------------ attention
    def attend(
        self,
        query: torch.Tensor,
        new_keys: torch.Tensor,
        new_values: torch.Tensor,
        new_valid: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attend the new queries to everything stored plus the new tokens, then store them.

        query:      [B, H, T, D]   queries of the T new tokens
        new_keys:   [B, H_kv, T, D], new_values: [B, H_kv, T, D]
        new_valid:  [B, T] bool    False for padding tokens (never stored, rows give zeros)
        Returns     [B, H, T, D] float32.
        """
        bsz, num_heads, q_len, _ = query.shape
        if bsz != self.batch_size:
            raise ValueError(f"batch size {bsz} differs from the {self.batch_size} this cache was reserved for")
        decode = q_len <= MAX_DECODE_QUERY
        # Pages in flight count as on the device for recall; then they must arrive before use.
        needed = self.top_pages(query) if decode else None
        if needed is not None:
            self._count_needed(needed)
            self.last_needed = needed
        self.finish_inflight()
        lengths = torch.tensor(self.length, dtype=torch.long)
        counts = new_valid.long().cumsum(dim=1)
        new_pos = torch.where(new_valid, lengths[:, None] + counts - 1, torch.full_like(counts, -1))
        selected = needed if (decode and self.rules.sparse) else None

        # Host part (worker thread), concurrently with the device part on this thread.
        host_table, host_pages, host_counts = self._host_plan(selected)
        observe = min(q_len, OBSERVATION_WINDOW)
        future = None
        if host_counts.any():
            args = (query, host_table, host_counts, scale, observe)
            future = self.executor.submit(self._host_part, *args) if self.executor else None
            host = self._host_part(*args) if future is None else None

        start = time.perf_counter()
        keys, values, key_pos = self._gather_device(new_keys, new_values, new_pos, selected)
        visible = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= new_pos[:, :, None])
        out_d, lse_d = dense_attention(query, keys, values, visible, scale)
        self.counters.device_attn_s += time.perf_counter() - start

        page_lse = None
        if host_counts.any():
            if future is not None:
                host = future.result()
            if host.error is not None:
                self.counters.failed_kernels += 1
                _log_once("kernel", f"the {self.cpu_kernel} host attention kernel failed", host.error)
                host = self._host_part(query, host_table, host_counts, scale, observe, kernel="torch")
                if host.error is not None:
                    raise host.error
            self.counters.host_attn_s += host.seconds
            out_h, lse_h = host.out.to(query.device), host.lse.to(query.device)
            out, lse = merge_partials(out_d, lse_d, out_h, lse_h)
            page_lse = host.page_lse
        else:
            out, lse = out_d, lse_d
        if decode:
            self._count_coverage(lse_d, lse, new_pos >= 0)
        # Padding rows see no key: zeros (their lse is -inf in both parts, so the merge gave zeros too).
        out = out.masked_fill((new_pos < 0)[:, None, :, None], 0.0)
        self._observe(query[:, :, -observe:], keys, key_pos, visible[:, -observe:], lse[:, :, -observe:],
                      scale, page_lse, host_pages)
        self._commit(new_keys, new_values, new_valid)
        return out

    def _count_needed(self, needed: list[set[int]]) -> None:
        for b in range(self.batch_size):
            on_device = needed[b] & (set(self.resident_pages(b)) | set(self.inflight[b]))
            self.counters.needed_pages += len(needed[b])
            self.counters.needed_on_device += len(on_device)
            self.counters.prefetch_hit_pages += len(self.issued[b] & needed[b])
            self.issued[b].clear()
            if self.rules.sparse and self.rules.skip_misses:
                self.counters.skipped_pages += len(needed[b]) - len(on_device)

    def _count_coverage(self, lse_d: torch.Tensor, lse: torch.Tensor, real_rows: torch.Tensor) -> None:
        share = torch.exp(lse_d - lse).nan_to_num(0.0)  # [B, H, Q]
        rows = real_rows[:, None, :].expand_as(share).to(share.device)
        self.counters.mass_device += float(share[rows].sum())
        self.counters.mass_rows += int(rows.sum())

    def _host_part(self, query, table, counts, scale, observe, kernel=None) -> _HostResult:
        """Attend the host pages; also per-page lse for the observed rows. Never raises: errors are returned."""
        result = _HostResult()
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # per thread; this may run on the host worker
                self._host_kernels(result, query, table, counts, scale, observe, kernel)
        except Exception as exc:  # reported to the caller, which falls back
            result.error = exc
        result.seconds = time.perf_counter() - start
        return result

    def _host_kernels(self, result: _HostResult, query, table, counts, scale, observe, kernel) -> None:
        """out/lse over the host pages for every row; per-page lse for the last `observe` rows."""
        kernel = kernel or self.cpu_kernel
        q_host = query.to(self.host_pool.device)
        bsz, num_heads, q_len, _ = q_host.shape
        last = torch.full((bsz,), self.layout.page_size, dtype=torch.long)
        pools = (self.host_pool.keys, self.host_pool.values)
        page_lse = torch.full((bsz, num_heads, observe, table.shape[1]), float("-inf"))
        if observe == q_len:
            result.out, result.lse = paged_attention(
                q_host, *pools, table, counts, last, scale, kernel=kernel, page_lse_out=page_lse, validate=False,
                threads=self.cpu_threads)
        else:
            # Prefill: many query rows per KV byte, compute-bound: blocked matmuls, not the decode kernel.
            result.out, result.lse = paged_attention_blocked(q_host, *pools, table, counts, last, scale)
            paged_attention(q_host[:, :, -observe:], *pools, table, counts, last, scale, kernel=kernel,
                            page_lse_out=page_lse, validate=False, threads=self.cpu_threads)
        result.page_lse = page_lse

    def _gather_device(self, new_keys, new_values, new_pos, selected):
        """Contiguous device-part K/V: [B, H_kv, T_dev, D] each, and key positions [B, T_dev] (-1 = no key)."""
        ps = self.layout.page_size
        device = self.device_pool.device
        per_seq = []
        for b in range(self.batch_size):
            per_seq.append(self._attended(b, self.resident_pages(b), selected))
        page_idx = self._pad(per_seq)
        slot_idx = torch.where(page_idx >= 0, self.slots.gather(1, page_idx.clamp(min=0)), torch.zeros_like(page_idx))
        offsets = torch.arange(ps)
        page_pos = torch.where(page_idx[:, :, None] >= 0, page_idx[:, :, None] * ps + offsets, -1).reshape(self.batch_size, -1)
        lengths = torch.tensor(self.length, dtype=torch.long)
        tail_base = (lengths // ps) * ps
        tail_pos = torch.where(offsets[None, :] < (lengths % ps)[:, None], tail_base[:, None] + offsets, -1)
        tails = torch.tensor(self.tail_slot, dtype=torch.long)
        slot_idx = torch.cat([slot_idx, tails[:, None]], dim=1).to(device)
        shape = (self.batch_size, -1, self.layout.num_kv_heads, self.layout.head_dim)
        keys = torch.cat([self.device_pool.keys[slot_idx].reshape(shape), new_keys.transpose(1, 2)], dim=1)
        values = torch.cat([self.device_pool.values[slot_idx].reshape(shape), new_values.transpose(1, 2)], dim=1)
        key_pos = torch.cat([page_pos, tail_pos, new_pos], dim=1).to(device)
        return keys.transpose(1, 2), values.transpose(1, 2), key_pos

    def _attended(self, b: int, pages: list[int], selected: list[set[int]] | None) -> list[int]:
        """The pages of `pages` that sequence b attends: all, or (sparse) the required and selected ones."""
        if selected is None:
            return pages
        required = self.required_pages(b)
        return [p for p in pages if p in required or p in selected[b]]

    def _pad(self, per_seq: list[list[int]]) -> torch.Tensor:
        """[B, max_n] page numbers, -1 padded."""
        num = max((len(p) for p in per_seq), default=0)
        table = torch.full((self.batch_size, num), -1, dtype=torch.long)
        for b, pages in enumerate(per_seq):
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.long)
        return table

    def _host_plan(self, selected):
        """Page table of the host part: [B, max_n] host ids, logical pages [B, max_n], counts [B]."""
        per_seq = []
        for b in range(self.batch_size):
            n = self.num_complete(b)
            pages = (self.slots[b, :n] < 0).nonzero().flatten().tolist()
            if selected is not None and self.rules.skip_misses:
                pages = []
            per_seq.append(self._attended(b, pages, selected))
        logical = self._pad(per_seq)
        table = torch.where(logical >= 0, self.host_ids.gather(1, logical.clamp(min=0)), torch.zeros_like(logical))
        counts = torch.tensor([len(p) for p in per_seq], dtype=torch.long)
        return table, logical, counts

    def _observe(self, query, keys, key_pos, visible, lse, scale, page_lse, host_pages) -> None:
        """Feed the attention mass each page received (observation-window rows) to the scorer."""
        ps = self.layout.page_size
        bsz = self.batch_size
        mass = torch.zeros(bsz, self.max_pages + 1, dtype=torch.float32)
        finite = torch.isfinite(lse)
        safe_lse = torch.where(finite, lse, torch.zeros_like(lse))
        if keys.shape[2] > 0:
            num_kv_heads = keys.shape[1]
            _, num_heads, q_len, head_dim = query.shape
            q = query.float().reshape(bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim)
            scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale
            scores = scores.view(bsz, num_heads, q_len, -1).masked_fill(~visible[:, None], float("-inf"))
            probs = torch.exp(scores - safe_lse[..., None]).masked_fill(~finite[..., None], 0.0)
            key_mass = probs.sum(dim=(1, 2)).cpu()  # [B, T_dev]
            pos = key_pos.cpu()
            page = torch.where(pos >= 0, pos // ps, torch.full_like(pos, self.max_pages))
            mass.scatter_add_(1, page.clamp(max=self.max_pages), key_mass)
        if page_lse is not None and host_pages.numel():
            host_lse = safe_lse.to(page_lse.device)[..., None]
            host_mass = torch.exp(page_lse - host_lse).masked_fill(~finite.to(page_lse.device)[..., None], 0.0)
            host_mass = host_mass.sum(dim=(1, 2))  # [B, max_n]
            page = torch.where(host_pages >= 0, host_pages, torch.full_like(host_pages, self.max_pages))
            mass.scatter_add_(1, page, host_mass)
        mass[:, self.max_pages] = 0.0
        self.scores = self.scorer.update(self.scores, mass)

    # ------------------------------------------------------------------ storing
    def _commit(self, new_keys: torch.Tensor, new_values: torch.Tensor, new_valid: torch.Tensor) -> None:
        """Append the valid new tokens of every sequence, then rebalance its residency."""
        ps = self.layout.page_size
        pool = self.device_pool
        for b in range(self.batch_size):
            valid = new_valid[b].nonzero().flatten().to(new_keys.device)
            if valid.numel() == 0:
                continue
            if self.length[b] + valid.numel() > self.max_pages * ps:
                raise RuntimeError(
                    f"sequence {b} would hold {self.length[b] + valid.numel()} tokens, more than the "
                    f"{self.max_pages * ps} reserved for this cache (max_tokens); reserve more at cache creation"
                )
            keys = new_keys[b].index_select(1, valid).transpose(0, 1)  # [n, H_kv, D]
            values = new_values[b].index_select(1, valid).transpose(0, 1)
            fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            # 1. Fill the tail page; a full tail becomes a resident complete page.
            offset = self.length[b] % ps
            take = min(ps - offset, keys.shape[0])
            tail = self.tail_slot[b]
            pool.keys[tail, offset : offset + take] = keys[:take]
            pool.values[tail, offset : offset + take] = values[:take]
            self.length[b] += take
            if offset + take == ps:
                page = self.length[b] // ps - 1
                self._complete_pages(b, page, pool.keys[tail][None], pool.values[tail][None])
                self.slots[b, page] = tail
                self.tail_slot[b] = -1
            # 2. Whole pages of new tokens: home copy on the host, kept on the device if chosen below.
            rest_k, rest_v = keys[take:], values[take:]
            num_full = rest_k.shape[0] // ps
            if num_full:
                first = self.length[b] // ps
                page_k = rest_k[: num_full * ps].reshape(num_full, *self.layout.page_shape)
                page_v = rest_v[: num_full * ps].reshape(num_full, *self.layout.page_shape)
                self._complete_pages(b, first, page_k, page_v)
                for i in range(num_full):
                    fresh[first + i] = (page_k[i], page_v[i])
                self.length[b] += num_full * ps
            leftover = rest_k.shape[0] - num_full * ps
            # 3. Residency, then a new tail slot for what is left.
            self._rebalance(b, fresh)
            if self.tail_slot[b] < 0:
                self.tail_slot[b] = pool.allocate()
            if leftover:
                tail = self.tail_slot[b]
                pool.keys[tail, :leftover] = rest_k[num_full * ps :]
                pool.values[tail, :leftover] = rest_v[num_full * ps :]
                self.length[b] += leftover

    def _complete_pages(self, b: int, first: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Home copies and summaries of pages first.. (keys/values: [n, page_size, H_kv, D], on the device)."""
        n = keys.shape[0]
        host_ids = [self.host_pool.allocate() for _ in range(n)]
        self.transfer.to_host(keys, values, self.host_pool, host_ids)
        self.host_ids[b, first : first + n] = torch.tensor(host_ids, dtype=torch.long)
        self.key_min[b, first : first + n] = keys.amin(dim=1)
        self.key_max[b, first : first + n] = keys.amax(dim=1)

    def _rebalance(self, b: int, fresh: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Make sequence b's resident set the sinks, the recent window and its best-scoring pages.

        Pages whose data is at hand on the device (`fresh`) are kept without a copy; other
        wanted pages are promoted from the host (asynchronously), at most `promote_pages` per step.
        """
        n = self.num_complete(b)
        required = self.required_pages(b)
        # One slot stays for the tail; pages in flight keep theirs.
        assert self.rules.slots_per_seq - 1 >= len(required), "reserve() guarantees sinks + recent window + tail fit"
        room = self.rules.slots_per_seq - 1 - len(required) - len(self.inflight[b])
        others = [p for p in range(n) if p not in required and p not in self.inflight[b]]
        wanted = set(required)
        if others and room > 0:
            if room >= len(others):
                wanted.update(others)
            else:
                # The pages the last query selected first (the next query selects mostly the same),
                # then highest score (resident pages weighted up), among equal scores the newest page.
                score = self.scores[b, torch.tensor(others, dtype=torch.long)].tolist()
                resident = set(self.resident_pages(b)) | set(fresh)
                weight = [RESIDENT_BONUS if p in resident else 1.0 for p in others]
                last = self.last_needed[b]
                order = sorted(range(len(others)), key=lambda i: (others[i] not in last, -score[i] * weight[i], -others[i]))
                wanted.update(others[i] for i in order[:room])
        for p in self.resident_pages(b):
            if p not in wanted:
                self.device_pool.decref(int(self.slots[b, p]))
                self.slots[b, p] = -1
        promote: list[int] = []
        resident = set(self.resident_pages(b))
        for p in sorted(wanted):
            if p in resident:
                continue
            if p in fresh:
                slot = self.device_pool.allocate()
                self.device_pool.keys[slot] = fresh[p][0]
                self.device_pool.values[slot] = fresh[p][1]
                self.slots[b, p] = slot
            else:
                promote.append(p)
        score = self.scores[b].tolist()
        promote.sort(key=lambda p: (p not in required, -score[p], -p))
        chosen = [p for p in promote if p in required] + [p for p in promote if p not in required][: self.rules.promote_pages]
        self._issue(b, chosen)

    # ------------------------------------------------------------------ batch reordering
    def select(self, indices: torch.Tensor) -> None:
        """Sequence i becomes old sequence indices[i] (beam search). Shared complete pages are
        shared by reference; each new sequence gets its own copy of the tail page."""
        idx = indices.long().cpu()
        if idx.numel() != self.batch_size:
            raise NotImplementedError(
                f"OffloadCache cannot change the batch size from {self.batch_size} to {idx.numel()}"
            )
        self.finish_inflight()
        old_host, old_slots = self.host_ids, self.slots
        new_host, new_slots = old_host[idx], old_slots[idx]
        for ref in new_host[new_host >= 0].tolist():
            self.host_pool.incref(ref)
        for ref in new_slots[new_slots >= 0].tolist():
            self.device_pool.incref(ref)
        for ref in old_host[old_host >= 0].tolist():
            self.host_pool.decref(ref)
        for ref in old_slots[old_slots >= 0].tolist():
            self.device_pool.decref(ref)
        dev_idx = idx.to(self.device_pool.device)
        tails = torch.tensor(self.tail_slot, dtype=torch.long, device=self.device_pool.device)[dev_idx]
        tail_k, tail_v = self.device_pool.keys[tails].clone(), self.device_pool.values[tails].clone()
        for slot in self.tail_slot:
            self.device_pool.decref(slot)
        self.tail_slot = [self.device_pool.allocate() for _ in range(self.batch_size)]
        new_tails = torch.tensor(self.tail_slot, dtype=torch.long, device=self.device_pool.device)
        self.device_pool.keys[new_tails] = tail_k
        self.device_pool.values[new_tails] = tail_v
        self.host_ids, self.slots = new_host, new_slots
        self.length = [self.length[i] for i in idx.tolist()]
        self.issued = [set(self.issued[i]) for i in idx.tolist()]
        self.scores = self.scores[idx]
        dev_idx = idx.to(self.key_min.device)
        self.key_min, self.key_max = self.key_min[dev_idx], self.key_max[dev_idx]

    def release(self) -> None:
        """Drop every reference this layer holds (the cache is done)."""
        self.finish_inflight()
        for ref in self.host_ids[self.host_ids >= 0].tolist():
            self.host_pool.decref(ref)
        for ref in self.slots[self.slots >= 0].tolist():
            self.device_pool.decref(ref)
        for slot in self.tail_slot:
            if slot >= 0:
                self.device_pool.decref(slot)
        self.host_ids.fill_(-1)
        self.slots.fill_(-1)
        self.tail_slot = [-1] * self.batch_size
