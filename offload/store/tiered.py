"""`TieredStore`: every layer's `LayerStore`, the pools under their budgets, and the stats.

`reserve` sizes everything for a batch and a maximum length and checks, before any token is
processed, that the device budget holds the sinks, recent windows and tails of every layer and
sequence (plus page summaries), and that the host budget holds every page.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch

from offload.config import OffloadConfig
from offload.kernels import resolve_kernel
from offload.policies.attention_mass import AttentionMassScorer
from offload.sizes import format_bytes
from offload.stats import OffloadStats
from offload.store.layer_store import LayerStore, ResidencyRules
from offload.store.layout import KVLayout
from offload.store.pools import PagePool
from offload.store.transfer import TransferEngine


# LayerCounters fields summed into OffloadStats.
LAYER_SUMS = (
    "device_attn_s", "host_attn_s", "stall_s", "needed_pages", "needed_on_device", "prefetch_issued_pages",
    "prefetch_hit_pages", "skipped_pages", "failed_copies", "failed_kernels", "mass_device", "mass_rows",
)


def min_slots_per_seq(config: OffloadConfig, max_tokens: int) -> int:
    """Device slots one sequence needs in one layer: sinks + recent window + the tail page."""
    ps = config.page_size
    sink_pages = -(-config.sink_tokens // ps)
    recent_pages = -(-config.recent_tokens // ps)
    return min(sink_pages + recent_pages, max_tokens // ps) + 1


def device_slots_per_seq(config: OffloadConfig, layout: KVLayout, batch_size: int, max_tokens: int) -> int:
    """Device page slots one sequence gets in each layer under `config.device_budget`."""
    summary_bytes = batch_size * layout.num_pages(max_tokens) * layout.summary_bytes
    per_layer = config.device_budget // layout.num_layers
    return max(0, per_layer - summary_bytes) // layout.page_bytes // batch_size


def minimum_device_budget(config: OffloadConfig, layout: KVLayout, batch_size: int, max_tokens: int) -> int:
    """Smallest device budget (bytes) that `TieredStore.reserve` accepts for this batch."""
    summary_bytes = batch_size * layout.num_pages(max_tokens) * layout.summary_bytes
    per_layer = summary_bytes + batch_size * min_slots_per_seq(config, max_tokens) * layout.page_bytes
    return layout.num_layers * per_layer


class TieredStore:
    def __init__(self, config: OffloadConfig, layout: KVLayout) -> None:
        self.config = config
        self.layout = layout
        self.cpu_kernel = resolve_kernel(config.cpu_kernel)
        self.transfer = TransferEngine(config.emulate_link_gbps)
        # One worker runs host-part kernels while the main thread computes the device part.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-host")
        self.layers: list[LayerStore] = []
        self.batch_size = 0
        self.max_tokens = 0
        self.device_peak_bytes = 0
        self.device_reserved_bytes = 0

    @property
    def reserved(self) -> bool:
        return bool(self.layers)

    def reserve(self, batch_size: int, max_tokens: int, device: torch.device | str) -> None:
        """Allocate pools for `batch_size` sequences of up to `max_tokens` tokens each."""
        if self.reserved:
            raise RuntimeError("this store is already reserved; create a new cache for a new batch")
        if batch_size < 1 or max_tokens < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1")
        cfg, lay = self.config, self.layout
        device = torch.device(device)
        max_pages = lay.num_pages(max_tokens)
        summary_bytes = batch_size * max_pages * lay.summary_bytes  # per layer
        need = min_slots_per_seq(cfg, max_tokens)
        slots_per_seq = device_slots_per_seq(cfg, lay, batch_size, max_tokens)
        if slots_per_seq < need:
            minimum = minimum_device_budget(cfg, lay, batch_size, max_tokens)
            raise ValueError(
                f"device_budget (OFFLOAD_DEVICE_BUDGET)={cfg.device_budget} ({format_bytes(cfg.device_budget)}) is too small "
                f"for {lay.num_layers} layers x {batch_size} sequences of up to {max_tokens} tokens: each layer and sequence needs "
                f"{need} pages of {format_bytes(lay.page_bytes)} on the device (sinks + recent window + tail page, "
                f"page_size={cfg.page_size}, sink_tokens={cfg.sink_tokens}, recent_tokens={cfg.recent_tokens}) plus "
                f"{format_bytes(summary_bytes)} of page summaries per layer; the minimum is {minimum} bytes "
                f"({format_bytes(minimum)}). Raise the budget or lower sink_tokens / recent_tokens."
            )
        useful = max_tokens // lay.page_size + 1  # more slots than pages would sit idle
        slots_per_seq = min(slots_per_seq, useful)
        host_pages = batch_size * (max_tokens // lay.page_size)
        host_max = cfg.host_budget // lay.num_layers // lay.page_bytes
        if host_pages > host_max:
            minimum = lay.num_layers * host_pages * lay.page_bytes
            raise ValueError(
                f"host_budget (OFFLOAD_HOST_BUDGET)={cfg.host_budget} ({format_bytes(cfg.host_budget)}) is too small: "
                f"{lay.num_layers} layers x {batch_size} sequences x {max_tokens} tokens need {minimum} bytes "
                f"({format_bytes(minimum)}) of host pages"
            )
        pin = device.type == "cuda" and torch.cuda.is_available()
        rules = ResidencyRules(
            slots_per_seq=slots_per_seq,
            sink_pages=-(-cfg.sink_tokens // lay.page_size),
            recent_tokens=cfg.recent_tokens,
            promote_pages=cfg.promote_pages,
            sparse=cfg.mode == "sparse",
            # Default: select what the device can hold at once (complete-page slots beside the tail).
            token_budget=cfg.token_budget if cfg.token_budget is not None else (slots_per_seq - 1) * lay.page_size,
            skip_misses=cfg.sparse_misses == "skip",
        )
        for layer_idx in range(lay.num_layers):
            device_pool = PagePool(lay, batch_size * slots_per_seq, device, name=f"device pool (layer {layer_idx})")
            host_pool = PagePool(lay, host_pages, "cpu", max_capacity=host_max, pin_memory=pin,
                                 name=f"host pool (layer {layer_idx})")
            self.layers.append(
                LayerStore(lay, batch_size, max_pages, device_pool, host_pool, self.transfer, rules,
                           AttentionMassScorer(cfg.score_decay), cpu_kernel=self.cpu_kernel,
                           cpu_threads=cfg.cpu_threads, executor=self.executor)
            )
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.device_reserved_bytes = lay.num_layers * (summary_bytes + batch_size * slots_per_seq * lay.page_bytes)
        assert self.device_reserved_bytes <= cfg.device_budget
        self.track_peak()

    def device_used_bytes(self) -> int:
        summaries = self.batch_size * self.layout.num_pages(self.max_tokens) * self.layout.summary_bytes
        return sum(layer.device_pool.used_bytes + summaries for layer in self.layers)

    def track_peak(self) -> None:
        self.device_peak_bytes = max(self.device_peak_bytes, self.device_used_bytes())

    def stats(self) -> OffloadStats:
        counters = self.transfer.counters
        stats = OffloadStats(
            h2d_bytes=counters.h2d_bytes,
            d2h_bytes=counters.d2h_bytes,
            device_peak_bytes=self.device_peak_bytes,
            device_reserved_bytes=self.device_reserved_bytes,
            device_budget_bytes=self.config.device_budget,
            link_s=counters.link_s,
        )
        for idx, layer in enumerate(self.layers):
            resident = sum(len(layer.resident_pages(b)) for b in range(layer.batch_size))
            total = sum(layer.num_complete(b) for b in range(layer.batch_size))
            stats.pages_resident += resident
            stats.pages_total += total
            stats.host_bytes += layer.host_pool.used_bytes
            counters = dataclasses.asdict(layer.counters)
            for name in LAYER_SUMS:
                setattr(stats, name, getattr(stats, name) + counters[name])
            stats.per_layer.append({"layer": idx, "pages_resident": resident, "pages_total": total, **counters})
        return stats

    def release(self) -> None:
        for layer in self.layers:
            layer.release()
        self.transfer.close()
        self.executor.shutdown(wait=True)
