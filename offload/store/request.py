"""`Request`: one batch's KV in a `KVStore`: a page table per layer and the token id of every
stored token. It outlives a `generate` call (multi-turn continues it) and holds host pages by
reference until it is released; it holds device memory only while it is the store's active one.
"""

from __future__ import annotations

import dataclasses

import torch

from offload.stats import OffloadStats
from offload.store.page_table import CROP_MARGIN, LayerCounters, PageTable, ResidencyRules
from offload.store.planner import new_positions

# PageTable counters summed into OffloadStats.
LAYER_SUMS = (
    "device_attn_s", "host_attn_s", "stall_s", "needed_pages", "needed_on_device", "prefetch_issued_pages",
    "prefetch_hit_pages", "prefetch_skipped", "skipped_pages", "failed_copies", "failed_kernels", "mass_device", "mass_rows",
    "dropped_pages", "gathered_bytes", "policy_read_bytes", "oracle_pages", "oracle_hits", "mass_missed",
    "mass_measured_rows", "merged_pages", "device_read_bytes", "host_read_bytes",
)

COUNTER_NAMES = tuple(field.name for field in dataclasses.fields(LayerCounters))

# TransferEngine counters (cumulative over the store) reported as their change since the request opened.
TRANSFER_SUMS = ("h2d_bytes", "d2h_bytes", "h2d_transfers", "d2h_transfers", "link_s", "h2d_link_s", "d2h_link_s",
                 "d2h_wait_s", "failed_home_copies")


class Request:
    def __init__(self, store, batch_size: int, max_tokens: int) -> None:
        self.store = store
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        layout = store.layout
        max_pages = layout.num_pages(max_tokens)
        track = store.policy.needs_mean_values
        self.tables = [PageTable(layout, batch_size, max_pages, pool, track) for pool in store.homes]
        if store.policy.merges:  # merged tokens live on the host: their room is held from the start
            try:
                for table in self.tables:
                    table.reserve_merged()
            except BaseException:
                for table in self.tables:
                    table.release()
                raise
        self.token_ids = torch.full((batch_size, max_tokens), -1, dtype=torch.long)  # -1: unknown
        self.rules: list[ResidencyRules] | None = None  # per layer, while active
        self.device_reserved_bytes = 0
        self.device_peak_bytes = 0
        self.prefix_hit_tokens = 0
        self.device_reused_pages = 0  # shared pages whose device copy a previous request left
        self.crop_margin = CROP_MARGIN  # local layers keep this many tokens for crop (raised for long lookaheads)
        self.released = False
        # Every stored token sits at its index among the real tokens (generate's positions), so a
        # page can be recomputed from token ids alone (a lower tier lost it).
        self.positions_known = True
        self._transfer_start = dataclasses.replace(store.transfer.counters)
        self._tiers_start = store.tier_counters()

    @property
    def on_device(self) -> bool:
        return self.tables[0].on_device

    def grow(self, max_tokens: int) -> None:
        if max_tokens > self.token_ids.shape[1]:
            extra = torch.full((self.batch_size, max_tokens - self.token_ids.shape[1]), -1, dtype=torch.long)
            self.token_ids = torch.cat([self.token_ids, extra], dim=1)
        self.max_tokens = max(self.max_tokens, max_tokens)

    def record_tokens(self, new_valid: torch.Tensor, input_ids: torch.Tensor | None) -> None:
        """Remember the ids of the tokens the first layer is about to store (before its append)."""
        pos = new_positions(self.tables[0], new_valid)
        last = int(pos.max()) if pos.numel() else -1
        if last >= self.token_ids.shape[1]:
            self.grow(last + 1)  # (append refuses clearly if the pages run out)
        ids = input_ids.to("cpu") if input_ids is not None else torch.full_like(pos, -1)
        rows, cols = (pos >= 0).nonzero(as_tuple=True)
        self.token_ids[rows, pos[rows, cols]] = ids[rows, cols]

    def device_used_bytes(self) -> int:
        if not self.on_device:
            return 0
        layout = self.store.layout
        summaries = self.batch_size * self.tables[0].max_pages * layout.summary_bytes
        return sum(t.device_pool.used_bytes + (summaries if t.key_min is not None else 0) for t in self.tables)

    def track_peak(self) -> None:
        self.device_peak_bytes = max(self.device_peak_bytes, self.device_used_bytes())

    def stats(self, flush: bool = True) -> OffloadStats:
        """The request's counters. flush: wait for copies still running, so that their link time
        counts (False: bytes are counted when a copy is submitted, its time when it ends)."""
        if flush:
            self.store.transfer.flush()
        now, start = self.store.transfer.counters, self._transfer_start
        stats = OffloadStats(
            device_peak_bytes=self.device_peak_bytes,
            device_reserved_bytes=self.device_reserved_bytes,
            device_budget_bytes=self.store.config.device_budget,
            host_bytes=self.store.host_used_bytes(),
            host_reserved_bytes=self.store.host_reserved_bytes(),
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_device_pages=self.device_reused_pages,
            prefix_cached_pages=self.store.prefix_cached_pages(),
        )
        for name in TRANSFER_SUMS:
            setattr(stats, name, getattr(now, name) - getattr(start, name))
        for name, value in self.store.tier_counters().items():
            setattr(stats, name, value - self._tiers_start[name])
        stats.lower_bytes = self.store.lower_bytes()
        for idx, table in enumerate(self.tables):
            # (pages past a sequence's complete ones are never resident nor alive: whole-table counts)
            resident = int((table.slots >= 0).sum()) if table.on_device else 0
            total = sum(table.num_complete(b) for b in range(table.batch_size))
            stats.pages_resident += resident
            stats.pages_total += total
            # (a GPU's running sums are read here, once: float() waits for its queue)
            counters = {name: _number(getattr(table.counters, name)) for name in COUNTER_NAMES}
            for name in LAYER_SUMS:
                setattr(stats, name, getattr(stats, name) + counters[name])
            stats.per_layer.append({"layer": idx, "pages_resident": resident, "pages_total": total, **counters})
        stats.dropped_bytes = stats.dropped_pages * self.store.layout.page_bytes
        layout = self.store.layout
        stats.kv_bytes = sum(int((t.page_ids >= 0).sum()) for t in self.tables) * layout.page_bytes
        # A dropped page's merged token (one key and value per KV head) is what remains of it.
        binds = self.store.policy.binds_merges  # (D2O: a token bound to no kept page was discarded)
        merged = sum(int((t.merged_valid[b, : t.num_complete(b)] & ~t.alive(b)
                          & ((t.merged_into[b, : t.num_complete(b)] >= 0).any(dim=1) if binds else True)).sum())
                     for t in self.tables if t.merged_valid is not None for b in range(t.batch_size))
        stats.kv_bytes += merged * layout.page_bytes // layout.page_size
        return stats

    def release(self) -> None:
        """Give back every page this request references; the request cannot be used afterwards."""
        if not self.released:
            self.store.release(self)


def _number(value):
    """A counter as a Python number (some are sums kept on a GPU as 0-dim tensors)."""
    return value.item() if isinstance(value, torch.Tensor) else value
