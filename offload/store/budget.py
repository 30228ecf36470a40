"""How a device budget is split for one batch, and the checks that refuse a batch before any token.

A sliding-window layer (window W) holds exactly what its window needs: the pages of its last W - 1
tokens and the tail, no page summaries (it selects nothing), whatever the context length. The
rest of the budget is split evenly over the full-attention layers: per layer, the page summaries
of every page the batch may have and a pool of page slots; every sequence gets the same number of
slots, at least its sinks, recent window and tail. The host tier and the tiers below it (disk, remote) must hold every complete page together.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from offload.config import OffloadConfig
from offload.sizes import format_bytes
from offload.store.layout import KVLayout
from offload.store.page_table import CROP_MARGIN, ResidencyRules


def window_slots_per_seq(window: int, page_size: int, max_tokens: int) -> int:
    """Device slots one sequence needs in a sliding layer: the pages its last `window - 1` tokens
    can span (a window may start inside a page), and the tail page."""
    span = -(-(window - 1) // page_size) + 1 if window > 1 else 0
    return min(span, max_tokens // page_size) + 1


def window_bytes(layout: KVLayout, windows, batch_size: int, max_tokens: int, chunks=None) -> int:
    """Device bytes of every sliding or chunked layer for this batch."""
    return sum(batch_size * window_slots_per_seq(w, layout.page_size, max_tokens) * layout.page_bytes
               for w in _windows(layout, windows, max_tokens, chunks) if w is not None)


def min_slots_per_seq(config: OffloadConfig, max_tokens: int) -> int:
    """Device slots one sequence needs in one layer: sinks + recent window + the tail page."""
    ps = config.page_size
    sink_pages = -(-config.sink_tokens // ps)
    recent_pages = -(-config.recent_tokens // ps)
    return min(sink_pages + recent_pages, max_tokens // ps) + 1


def _windows(layout: KVLayout, windows, max_tokens: int, chunks=None) -> list:
    """Per layer, the span a query can see (its window or chunk) where contexts of `max_tokens` can
    outgrow it; None where the layer is (or acts as) full attention."""
    windows = list(windows) if windows is not None else [None] * layout.num_layers
    chunks = list(chunks) if chunks is not None else [None] * layout.num_layers
    spans = [w if w is not None else c for w, c in zip(windows, chunks)]
    return [s if s is not None and max_tokens > s else None for s in spans]


def device_slots_per_seq(config: OffloadConfig, layout: KVLayout, batch_size: int, max_tokens: int,
                         windows=None, chunks=None) -> int:
    """Device page slots one sequence gets in each full-attention layer under `config.device_budget`."""
    windows = _windows(layout, windows, max_tokens, chunks)
    num_full = sum(w is None for w in windows)
    if num_full == 0:
        return 0
    summary_bytes = batch_size * layout.num_pages(max_tokens) * layout.summary_bytes
    per_layer = (config.device_budget - window_bytes(layout, windows, batch_size, max_tokens)) // num_full
    return max(0, per_layer - summary_bytes) // layout.page_bytes // batch_size


def minimum_device_budget(config: OffloadConfig, layout: KVLayout, batch_size: int, max_tokens: int,
                          windows=None, chunks=None) -> int:
    """Smallest device budget (bytes) that `device_rules` accepts for this batch."""
    windows = _windows(layout, windows, max_tokens, chunks)
    summary_bytes = batch_size * layout.num_pages(max_tokens) * layout.summary_bytes
    per_layer = summary_bytes + batch_size * min_slots_per_seq(config, max_tokens) * layout.page_bytes
    return sum(w is None for w in windows) * per_layer + window_bytes(layout, windows, batch_size, max_tokens)


def device_rules(config: OffloadConfig, layout: KVLayout, batch_size: int, max_tokens: int,
                 windows=None, chunks=None, crop_margin: int = CROP_MARGIN,
                 weights: list[float] | None = None) -> list[ResidencyRules]:
    """The residency rules of each layer for a batch under the device budget; ValueError if the
    budget cannot hold it. `windows[layer]` / `chunks[layer]`: that layer's sliding window or
    attention chunk, or None (full attention). `weights[layer]`: how the full-attention layers
    share the slots beyond their minimum (default: evenly); the token budget stays the even one."""
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1")
    cfg, lay = config, layout
    is_chunk = [w is None and c is not None for w, c in zip(windows or [None] * lay.num_layers,
                                                            chunks or [None] * lay.num_layers)]
    windows = _windows(lay, windows, max_tokens, chunks)
    need = min_slots_per_seq(cfg, max_tokens)
    slots_per_seq = device_slots_per_seq(cfg, lay, batch_size, max_tokens, windows)
    if all(w is not None for w in windows):
        need, slots_per_seq = 0, 0  # only sliding layers: what they need is all there is
    over = cfg.device_budget < window_bytes(lay, windows, batch_size, max_tokens)
    if slots_per_seq < need or over:
        summary_bytes = batch_size * lay.num_pages(max_tokens) * lay.summary_bytes
        minimum = minimum_device_budget(cfg, lay, batch_size, max_tokens, windows)
        raise ValueError(
            f"device_budget (OFFLOAD_DEVICE_BUDGET)={cfg.device_budget} ({format_bytes(cfg.device_budget)}) is too small "
            f"for {lay.num_layers} layers x {batch_size} sequences of up to {max_tokens} tokens: each layer and sequence needs "
            f"{need} pages of {format_bytes(lay.page_bytes)} on the device (sinks + recent window + tail page, "
            f"page_size={cfg.page_size}, sink_tokens={cfg.sink_tokens}, recent_tokens={cfg.recent_tokens}) plus "
            f"{format_bytes(summary_bytes)} of page summaries per layer; the minimum is {minimum} bytes "
            f"({format_bytes(minimum)}). Raise the budget or lower sink_tokens / recent_tokens."
            + (f" Sliding-window layers need {format_bytes(window_bytes(lay, windows, batch_size, max_tokens))} "
               "for their windows." if any(w is not None for w in windows) else "")
        )
    useful = max_tokens // lay.page_size + 1  # more slots than pages would sit idle
    slots_per_seq = min(slots_per_seq, useful)
    full = ResidencyRules(
        slots_per_seq=slots_per_seq,
        sink_pages=-(-cfg.sink_tokens // lay.page_size),
        recent_tokens=cfg.recent_tokens,
        promote_pages=cfg.promote_pages,
        sparse=cfg.mode == "sparse",
        # Default: select what the device can hold at once (complete-page slots beside the tail).
        token_budget=cfg.token_budget if cfg.token_budget is not None else max(0, slots_per_seq - 1) * lay.page_size,
        skip_misses=cfg.sparse_misses == "skip",
    )
    per_layer = [full] * lay.num_layers
    full_layers = [i for i, w in enumerate(windows) if w is None]
    if weights is not None and len(full_layers) > 1:
        # The same slots in total, each layer its minimum first, the rest by weight.
        extra = (slots_per_seq - need) * len(full_layers)
        total = sum(weights[i] for i in full_layers)
        for i in full_layers:
            slots = need + int(extra * weights[i] / total)
            per_layer[i] = dataclasses.replace(full, slots_per_seq=min(slots, useful))
    return [per_layer[i] if w is None else ResidencyRules(
        slots_per_seq=window_slots_per_seq(w, lay.page_size, max_tokens), sink_pages=0, recent_tokens=w - 1,
        promote_pages=0, sparse=False, token_budget=w, window=None if chunked else w, chunk=w if chunked else None,
        crop_margin=crop_margin)
        for i, (w, chunked) in enumerate(zip(windows, is_chunk))]


def device_reserved_bytes(layout: KVLayout, batch_size: int, max_tokens: int, rules: list[ResidencyRules]) -> int:
    summary_bytes = batch_size * layout.num_pages(max_tokens) * layout.summary_bytes
    return sum((0 if r.local else summary_bytes) + batch_size * r.slots_per_seq * layout.page_bytes
               for r in rules)


def merged_pages(layout: KVLayout, batch_size: int, max_pages: int) -> int:
    """Host page slots per layer that hold the merged tokens of merging policies (one float32 key
    and value per page and KV head, and the page each is bound to), so they count in the budget."""
    per_page = layout.num_kv_heads * (2 * layout.head_dim * 4 + 8)
    return -(-batch_size * max_pages * per_page // layout.page_bytes)


def host_pages_per_layer(config: OffloadConfig, layout: KVLayout) -> int:
    """Host page slots per layer under `config.host_budget`."""
    return config.host_budget // layout.num_layers // layout.page_bytes


def disk_pages_per_layer(config: OffloadConfig, layout: KVLayout) -> int:
    """Disk page slots per layer under `config.disk_budget` (None: the free space of `disk_dir`)."""
    total = config.disk_budget
    if total is None:
        os.makedirs(config.disk_dir, exist_ok=True)
        total = shutil.disk_usage(config.disk_dir).free * 9 // 10
    pages = total // layout.num_layers // layout.page_bytes
    if pages < 1:
        raise ValueError(
            f"disk_budget (OFFLOAD_DISK_BUDGET)={total} ({format_bytes(total)}) holds no page: {layout.num_layers} layers "
            f"need at least {layout.num_layers * layout.page_bytes} bytes ({format_bytes(layout.num_layers * layout.page_bytes)})"
        )
    return pages


def check_host_budget(config: OffloadConfig, layout: KVLayout, new_pages: int, unavailable: int,
                      lower_pages: int = 0) -> None:
    """Refuse a batch whose `new_pages` complete pages per layer cannot fit beside the `unavailable`
    pages other live requests hold (cached prefixes do not count: they are evicted for room), in
    the host tier and the `lower_pages` per layer of the tiers below it."""
    host_max = host_pages_per_layer(config, layout) + lower_pages
    if new_pages + unavailable > host_max:
        minimum = layout.num_layers * (new_pages + unavailable) * layout.page_bytes
        held = f" ({unavailable} pages per layer are held by other live requests)" if unavailable else ""
        raise ValueError(
            f"host_budget (OFFLOAD_HOST_BUDGET)={config.host_budget} ({format_bytes(config.host_budget)}) is too small: "
            f"{layout.num_layers} layers x {new_pages} new pages need {minimum} bytes ({format_bytes(minimum)}) "
            f"of host pages{held}"
            + (f", and the tiers below the host hold {lower_pages} pages per layer" if lower_pages else
               "; a disk tier (OFFLOAD_DISK_DIR) or remote lenders (OFFLOAD_REMOTE_LENDERS) can hold the rest")
        )
