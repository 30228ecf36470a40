"""`KVStore`: the KV cache of one model, for the model's lifetime.

It owns the per-layer host pools (home copies and page summaries, under the host budget), the
transfer engine and the host-attention worker, the policies, and the prefix tree of cached pages.
Requests (`Request`: a page table per layer) point into it by reference count.

Device memory is lent to one request at a time, sized for its batch when it becomes active:
activating a request parks the previous one (its pages stay on the host, its tails move there),
so two live requests can never exceed the device budget together. Device copies are caches, so
parking loses nothing; when `generate` returns, the copies of pages the prefix tree holds stay on
the device for the next request of the same shape (`DeviceCache`).

One layer's step is `attend`: select -> complete copies -> plan -> run -> observe -> append ->
rebalance, each a call into the module that owns that concept.
"""

from __future__ import annotations

import atexit
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from offload.config import OffloadConfig
from offload.kernels import merge_partials, resolve_kernel
from offload.policies import make_eviction_order, make_policy, make_scorer, make_selector
from offload.prefetch.prefetcher import Prefetcher
from offload.store import budget, merging, selection
from offload.store.append import append, finish_tail
from offload.store.device_cache import DeviceCache
from offload.store.layout import KVLayout
from offload.store.planner import MAX_DECODE_QUERY, count_needed, plan
from offload.store.pools import PagePool
from offload.store.prefix_tree import PrefixTree
from offload.store.request import Request
from offload.store.residency import Residency
from offload.store.split_attention import SplitAttention
from offload.store.transfer import TransferEngine


_LIVE: "weakref.WeakSet[KVStore]" = weakref.WeakSet()


@atexit.register
def _close_live_stores() -> None:
    """Stop worker threads before the interpreter tears down: a daemon thread inside a torch op
    at exit can abort the process ("terminate called without an active exception")."""
    for store in list(_LIVE):
        store.close()


class StoreClosed(RuntimeError):
    """The store was closed (`OffloadedModel.close()` / `unwrap()`); its requests are gone."""


class KVStore:
    def __init__(self, config: OffloadConfig, layout: KVLayout, device: torch.device | str,
                 windows: list[int | None] | None = None, chunks: list[int | None] | None = None,
                 reusable_prefixes: bool = True) -> None:
        self.config = config
        self.layout = layout
        # Per layer: its sliding window (it attends and keeps only that), or None (full attention).
        self.windows = list(windows) if windows is not None else [None] * layout.num_layers
        if len(self.windows) != layout.num_layers or any(w is not None and w < 1 for w in self.windows):
            raise ValueError(f"windows must give each of {layout.num_layers} layers a window >= 1 or None; got {windows}")
        # Per layer: its attention chunk (chunked attention, Llama 4), or None.
        self.chunks = list(chunks) if chunks is not None else [None] * layout.num_layers
        if len(self.chunks) != layout.num_layers or any(c is not None and c < 1 for c in self.chunks):
            raise ValueError(f"chunks must give each of {layout.num_layers} layers a chunk >= 1 or None; got {chunks}")
        self.device = torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        host_max = budget.host_pages_per_layer(config, layout)
        self.host_pools = [
            PagePool(layout, 0, "cpu", max_capacity=host_max, pin_memory=pin, with_summaries=True,
                     name=f"host pool (layer {i})")
            for i in range(layout.num_layers)
        ]
        self.transfer = TransferEngine(config.emulate_link_gbps)
        # One worker runs host-part kernels while the calling thread computes the device part.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-host")
        self.runner = SplitAttention(resolve_kernel(config.cpu_kernel), config.cpu_threads, self.executor)
        self.selector = make_selector(config.selector)
        self.policy = make_policy(config)
        self.drops = config.policy_effect == "drop"
        self.measure = False  # benchmarks: compare each decode choice with exact attention (reads every key)
        self.scorer = make_scorer(config.scorer, config.score_decay)
        self.residency = Residency(self.transfer, make_eviction_order(config.device_eviction))
        self.prefetcher = Prefetcher(self.selector, self.residency)
        self.tree: PrefixTree | None = None
        # (a model with recurrent or conv layers cannot resume from KV pages alone: no prefix reuse)
        if config.prefix_cache and reusable_prefixes:
            self.tree = PrefixTree(layout.page_size, self.host_pools, make_eviction_order(config.prefix_eviction))
            for pool in self.host_pools:
                pool.reclaim = self.tree.evict
        self.device_cache = DeviceCache()
        if self.tree is not None:
            self.tree.on_remove = self.device_cache.forget
        self.active: Request | None = None
        self.requests: weakref.WeakSet[Request] = weakref.WeakSet()
        self._dead: list[Request] = []  # requests whose cache was garbage collected, released at a safe point
        self.closed = False
        _LIVE.add(self)

    # ------------------------------------------------------------------ requests
    @torch.inference_mode()  # tensors made under it can only be changed under it
    def open(self, batch_size: int, max_tokens: int, rows: Sequence[Sequence[int]] | None = None,
             pads: Sequence[int] | None = None, crop_margin: int | None = None) -> tuple[Request, int]:
        """A request for `batch_size` sequences of up to `max_tokens` tokens (padding included),
        active on the device. With `rows` (each sequence's real token ids) and `pads` (its left
        padding), it starts from the longest cached prefix every sequence can share: returns the
        request and how many leading positions (padding included) need no forward pass."""
        self._check_open()
        self.release_dead()
        budget.device_rules(self.config, self.layout, batch_size, max_tokens, self.windows, self.chunks)  # refuse before anything
        request = Request(self, batch_size, max_tokens)
        if crop_margin is not None:
            request.crop_margin = max(request.crop_margin, crop_margin)
        self.requests.add(request)
        skip = 0
        if rows is not None and self.tree is not None:
            skip = self._attach_prefix(request, rows, pads or [0] * batch_size)
        shared = sum(t.num_complete(b) for t in request.tables[:1] for b in range(batch_size))
        new_pages = batch_size * (max_tokens // self.layout.page_size) - shared
        unavailable = self.host_pools[0].num_used - (self.tree.num_evictable() if self.tree else 0)
        try:
            budget.check_host_budget(self.config, self.layout, new_pages, unavailable)
            self.activate(request, max_tokens)
        except BaseException:
            self.release(request)
            raise
        return request, skip

    def _attach_prefix(self, request: Request, rows: Sequence[Sequence[int]], pads: Sequence[int]) -> int:
        ps = self.layout.page_size
        # Every sequence must forward at least its last token (its logits start generation).
        paths = [self.tree.match(row, max(0, len(row) - 1) // ps) for row in rows]
        # Then the leading tokens of a cached next page that this prompt shares (token granularity).
        partials = [self.tree.match_partial(row, path, max(0, len(row) - 1 - len(path) * ps))
                    for row, path in zip(rows, paths)]
        skip = min(pad + len(path) * ps + k for pad, path, (_, k) in zip(pads, paths, partials))
        for b, (row, pad, path, (partial, _)) in enumerate(zip(rows, pads, paths, partials)):
            reuse = max(0, skip - pad)
            full, cut = divmod(reuse, ps)
            cut_page = path[full] if full < len(path) else partial  # holds the cut tokens (reuse <= what matched)
            for layer, table in enumerate(request.tables):
                tail = None
                if cut:
                    host, host_id = table.host_pool, cut_page.host_ids[layer]
                    tail = (host.keys[host_id, :cut].clone(), host.values[host_id, :cut].clone())
                table.attach_pages(b, [node.host_ids[layer] for node in path[:full]], tail)
            request.token_ids[b, :reuse] = torch.tensor(list(row[:reuse]), dtype=torch.long)
            request.prefix_hit_tokens += reuse
        return skip

    @torch.inference_mode()  # tensors made under it can only be changed under it
    def activate(self, request: Request, max_tokens: int | None = None) -> None:
        """Lend the device to `request` (parking the active one), sized for `max_tokens` per sequence."""
        self._check_open()
        if request.released:
            raise RuntimeError("this cache was released; its pages are gone")
        max_tokens = max(max_tokens or 0, request.max_tokens)
        if self.active is request and max_tokens <= request.max_tokens:
            return
        if self.active is not None:
            self.park(self.active)
        rules = budget.device_rules(self.config, self.layout, request.batch_size, max_tokens, self.windows, self.chunks,
                                    request.crop_margin)
        request.grow(max_tokens)
        max_pages = self.layout.num_pages(max_tokens)
        capacities = [request.batch_size * r.slots_per_seq for r in rules]
        reuse = self.device_cache.take(capacities)
        for layer, table in enumerate(request.tables):
            if reuse is None:
                pool = PagePool(self.layout, capacities[layer], self.device, name=f"device pool (layer {layer})")
                table.attach_device(pool, rules[layer], max_pages)
            else:
                pool, kept = reuse[layer]
                wanted = set(table.host_ids[table.host_ids >= 0].tolist())
                for host_id in [h for h in kept if h not in wanted]:
                    pool.decref(kept.pop(host_id))
                while pool.num_free < request.batch_size and kept:  # room for the tails first
                    pool.decref(kept.pop(next(iter(kept))))
                table.attach_device(pool, rules[layer], max_pages)
                request.device_reused_pages += table.adopt_resident(kept)
                for slot in kept.values():
                    pool.decref(slot)
            for b in range(request.batch_size):
                self.residency.rebalance(table, b, {})  # sinks and recent window come back first
        request.rules = rules
        request.device_reserved_bytes = budget.device_reserved_bytes(self.layout, request.batch_size, max_tokens, rules)
        assert request.device_reserved_bytes <= self.config.device_budget
        self.active = request
        request.track_peak()

    @torch.inference_mode()  # tensors made under it can only be changed under it
    def park(self, request: Request, keep_cached: bool = False) -> None:
        """Take the device memory back from `request`; its pages stay on the host. With
        `keep_cached`, resident copies of pages the prefix tree holds stay on the device for the
        next request (`DeviceCache`)."""
        if keep_cached and self.tree is not None and request.on_device:
            for table in request.tables:
                self.residency.complete_copies(table)
            self.device_cache.keep(request.tables, self.tree.host_ids_per_layer())
        for table in request.tables:
            if table.on_device:
                self.residency.complete_copies(table)
                table.detach_device()
        if self.active is request:
            self.active = None

    @torch.inference_mode()  # tensors made under it can only be changed under it
    def release(self, request: Request) -> None:
        if request.released:
            return
        self.park(request)
        for table in request.tables:
            table.release()
        request.released = True
        self.requests.discard(request)

    def release_later(self, request: Request) -> None:
        """For finalizers: release at the next safe point (never from inside a garbage collection)."""
        if not self.closed:  # a closed store released everything already
            self._dead.append(request)

    @torch.inference_mode()  # tensors made under it can only be changed under it
    def release_dead(self) -> None:
        while self._dead:
            self.release(self._dead.pop())

    @torch.inference_mode()  # tensors made under it can only be changed under it
    def cache_prefix(self, request: Request) -> int:
        """Put the complete pages of every sequence whose token ids are known into the prefix tree."""
        if self.tree is None or request.released:
            return 0
        ps = self.layout.page_size
        added = 0
        for b in range(request.batch_size):
            n = min(t.num_complete(b) for t in request.tables)
            ids = request.token_ids[b, : n * ps]
            unknown = (ids < 0).nonzero()
            n = int(unknown[0]) // ps if unknown.numel() else n
            host_ids = torch.stack([t.host_ids[b, :n] for t in request.tables], dim=1)
            freed = (host_ids < 0).any(dim=1).nonzero()  # a sliding layer freed what its window left
            n = int(freed[0]) if freed.numel() else n
            if n == 0:
                continue
            host_ids = host_ids[:n].tolist()
            added += self.tree.insert(ids[: n * ps].tolist(), host_ids)
        return added

    # ------------------------------------------------------------------ one layer's step
    @torch.inference_mode()
    def attend(self, request: Request, layer: int, query: torch.Tensor, new_keys: torch.Tensor,
               new_values: torch.Tensor, new_valid: torch.Tensor, scale: float, return_lse: bool = False,
               softcap: float | None = None, has_readers: bool = False):
        """Attend the new queries to everything stored plus the new tokens, then store them.

        query:      [B, H, T, D]   queries of the T new tokens
        new_keys:   [B, H_kv, T, D], new_values: [B, H_kv, T, D]
        new_valid:  [B, T] bool    False for padding tokens (never stored, rows give zeros)
        softcap:    attention logit soft-capping (Gemma 2), or None
        has_readers: later layers read this layer's KV in this step (`attend_stored`): a local
                    layer keeps what this step's queries see until the next step
        Returns     [B, H, T, D] float32 (and, with `return_lse`, the log-sum-exp [B, H, T] float32).
        """
        if self.active is not request:
            self.activate(request)
        table = request.tables[layer]
        if query.shape[0] != table.batch_size:
            raise ValueError(f"batch size {query.shape[0]} differs from the {table.batch_size} this cache was reserved for")
        chosen, decode = None, query.shape[2] <= MAX_DECODE_QUERY
        if decode and not table.rules.local:
            # Pages in flight count as on the device for recall; then they must arrive before use.
            chosen = selection.select(table, self.policy, query, layer, self.layout.num_layers, scale, self.measure)
            count_needed(table, chosen.needed)
        self.residency.complete_copies(table)
        merges = chosen is not None and self.policy.merges and table.rules.sparse
        if merges:  # before dropping: a page's merged token is made from its home copy
            merging.merge_unkept(table, chosen.keep,
                                 self.config.merge_threshold if self.policy.binds_merges else None)
        if chosen is not None and self.drops:
            selection.drop_unkept(table, chosen)
        layer_plan = plan(table, new_valid, chosen.attend if chosen else None, decode,
                          head_keep=chosen.head_keep if chosen else None)
        result = self.runner.run(layer_plan, table, query, new_keys, new_values, scale, softcap)
        out, lse = result.out, result.lse
        if chosen is not None and table.rules.sparse and any(i is not None for i in chosen.interpolation):
            out, lse = selection.interpolate(out, lse, chosen, new_valid)
        if merges:
            merged = merging.attend_merged(table, query, chosen.keep, new_valid, scale, self.policy.binds_merges)
            if merged is not None:
                out, lse = merge_partials(out, lse, *merged)
        table.scores = self.scorer.update(table.scores, result.page_mass)
        selection.observe(table, result.head_mass, decode, layer_plan.observe)
        if table.value_sum is not None:
            table.value_sum += (new_values.float() * new_valid.to(new_values.device)[:, None, :, None]).sum(dim=2).cpu()
        old_lengths = list(table.length)
        for b, appended in enumerate(append(table, self.transfer, new_keys, new_values, new_valid)):
            if new_valid[b].any():
                self.residency.rebalance(table, b, appended.fresh)
            finish_tail(table, b, appended)
            if table.rules.local:
                table.drop_out_of_window(b, old_lengths[b] if has_readers else None)
        request.track_peak()
        return (out, lse) if return_lse else out

    @torch.inference_mode()
    def attend_stored(self, request: Request, layer: int, query: torch.Tensor, query_pos: torch.Tensor, scale: float,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of queries over what `layer` stores, appending nothing: cross-layer KV sharing,
        where a consumer layer reads its producer's KV after the producer stored the new tokens.

        query [B, H, T, D]; query_pos [B, T] the queries' stored positions (-1: padding).
        Exact in every mode (the consumer's queries select nothing). Returns (out, lse)."""
        if self.active is not request:
            self.activate(request)
        table = request.tables[layer]
        self.residency.complete_copies(table)
        valid = query_pos >= 0
        layer_plan = plan(table, valid, None, query.shape[2] <= MAX_DECODE_QUERY, new_pos=query_pos)
        empty = query.new_zeros(query.shape[0], self.layout.num_kv_heads, 0, self.layout.head_dim)
        result = self.runner.run(layer_plan, table, query, empty, empty, scale, softcap)
        return result.out, result.lse

    @torch.inference_mode()
    def speculate(self, request: Request, layer: int, predicted_query: torch.Tensor) -> None:
        """Prefetch the pages a predicted query [B, H, Q, D] of `layer` selects, before it runs."""
        table = request.tables[layer]
        if (self.active is request and predicted_query.shape[0] == request.batch_size and not table.rules.local
                and self.policy.speculates):
            self.prefetcher.speculate(table, predicted_query)

    # ------------------------------------------------------------------ state
    def host_used_bytes(self) -> int:
        return sum(pool.used_bytes for pool in self.host_pools)

    def prefix_cached_pages(self) -> int:
        return self.tree.num_pages if self.tree is not None else 0

    def _check_open(self) -> None:
        if self.closed:
            raise StoreClosed("this OffloadedModel was closed; its KV store and every cache are released")

    @torch.inference_mode()  # tensors made under it can only be changed under it
    def close(self) -> None:
        """Release every request and cached page, stop the worker threads. Idempotent."""
        if self.closed:
            return
        for request in list(self.requests) + self._dead:
            self.release(request)
        self._dead.clear()
        self.device_cache.clear()
        if self.tree is not None:
            self.tree.clear()
        self.transfer.close()
        self.executor.shutdown(wait=True)
        self.closed = True
