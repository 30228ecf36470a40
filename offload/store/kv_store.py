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
from offload.policies import make_eviction_order, make_policy, make_scorer
from offload.prefetch.prefetcher import Prefetcher, due
from offload.store import budget, merging, selection
from offload.store.append import append, finish_tail
from offload.store.device_cache import DeviceCache
from offload.store.disk import DiskCounters, DiskTier
from offload.store.home import PageHome
from offload.store.layout import KVLayout
from offload.store.planner import MAX_DECODE_QUERY, count_needed, plan
from offload.store.pools import PagePool
from offload.store.prefix_files import PrefixFiles
from offload.store.prefix_tree import PrefixTree
from offload.store.request import Request
from offload.store.residency import Residency, log_once
from offload.store.split_attention import SplitAttention
from offload.store.tiers import PagesLost, RecoveryCounters, Tier
from offload.store.transfer import TransferEngine

LOWER_TIERS_NEED_KV_ONLY = (
    "a disk tier (OFFLOAD_DISK_DIR) or remote lenders (OFFLOAD_REMOTE_LENDERS) need pages that can be recomputed "
    "from their token ids if a tier loses them; this model's pages cannot be rebuilt from a prefix's tokens alone "
    "(recurrent or conv layers whose state they do not hold, or layers attending a later layer's KV, whose prompt "
    "the model computes by iteration): use the host tier only"
)
# Recoveries one layer's step may need before the store gives up (each restores what was lost).
MAX_RECOVERIES = 8
# Pages read at once to write prefix files.
SAVE_CHUNK_PAGES = 256


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
                 reusable_prefixes: bool = True, identity: str | None = None) -> None:
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
        if (config.disk_dir is not None or config.remote_lenders) and not reusable_prefixes:
            raise ValueError(LOWER_TIERS_NEED_KV_ONLY)
        self.disk_counters = DiskCounters()
        self.remote = None  # RemoteCluster when lenders lend memory (offload/store/remote.py)
        if config.remote_lenders:
            from offload.store.remote import RemoteCluster  # needs ray: pip install offload[distributed]

            self.remote = RemoteCluster(layout, config.remote_lenders, config.remote_budget, config.remote_address,
                                        kernel=resolve_kernel(config.cpu_kernel), threads=config.cpu_threads)
        self.disk_pages = budget.disk_pages_per_layer(config, layout) if config.disk_dir is not None else 0
        self.homes = [PageHome(layout, PagePool(layout, 0, "cpu", max_capacity=host_max, pin_memory=pin,
                                                name=f"host pool (layer {i})"),
                               self._lower_tiers(i), name=f"pages (layer {i})",
                               kernel=resolve_kernel(config.cpu_kernel), threads=config.cpu_threads)
                      for i in range(layout.num_layers)]
        for home in self.homes:
            home.pull_remote = self._pulls
        # Recomputes lost pages from their token ids: set by OffloadedModel (offload/recovery.py).
        self.recompute = None
        self.recovery = RecoveryCounters()
        self.transfer = TransferEngine(config.emulate_link_gbps, emulate_link_latency_us=config.emulate_link_latency_us)
        # With an accelerator, one worker runs host-part kernels while the calling thread drives
        # the device part. With the CPU as the device, both parts would share the same cores: a
        # second thread only contends for them and for the GIL (a decode step at batch 8 took
        # 10-20% longer that way), so the host part runs inline, each part with every thread.
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-host")
                         if torch.device(device).type != "cpu" else None)
        self.runner = SplitAttention(resolve_kernel(config.cpu_kernel), config.cpu_threads, self.executor)
        self.policy = make_policy(config)
        self.drops = config.policy_effect == "drop"
        self.measure = False  # benchmarks: compare each decode choice with exact attention (reads every key)
        self.scorer = make_scorer(config.scorer, config.score_decay)
        self.residency = Residency(self.transfer, make_eviction_order(config.device_eviction))
        self.prefetcher = Prefetcher(self.policy, self.residency)
        self.tree: PrefixTree | None = None
        # (a model with recurrent or conv layers, or iterating its prompt, cannot resume from KV pages alone)
        if config.prefix_cache and reusable_prefixes:
            self.tree = PrefixTree(layout.page_size, self.homes, make_eviction_order(config.prefix_eviction))
            for home in self.homes:
                home.reclaim = self.tree.evict
        self.device_cache = DeviceCache()
        if self.tree is not None:
            self.tree.on_remove = self.device_cache.forget
        # With a disk directory and the model's identity, cached prefixes also go to files that a
        # later process reuses (store/prefix_files.py).
        self.prefix_files = None
        if self.tree is not None and config.disk_dir is not None and identity is not None:
            self.prefix_files = PrefixFiles(config.disk_dir, layout, identity)
        self.active: Request | None = None
        self.requests: weakref.WeakSet[Request] = weakref.WeakSet()
        self._dead: list[Request] = []  # requests whose cache was garbage collected, released at a safe point
        self.closed = False
        _LIVE.add(self)

    def _lower_tiers(self, layer: int) -> list[Tier]:
        """The tiers below the host for one layer: disk, then remote, as configured."""
        tiers: list[Tier] = []
        if self.config.disk_dir is not None:
            tiers.append(DiskTier(self.layout, self.config.disk_dir, self.disk_pages, layer, self.disk_counters,
                                  resolve_kernel(self.config.cpu_kernel), self.config.cpu_threads))
        if self.remote is not None:
            tiers.append(self.remote.tier(layer))
        return tiers

    def _pulls(self, tier, counts: torch.Tensor, query: torch.Tensor, observe: int) -> bool:
        """Pull remote pages (counts[b] for sequence b) over the wire rather than attend them
        remotely? `remote_attention`, or by bytes moved."""
        choice = self.config.remote_attention
        if choice != "auto":
            return choice == "pull"
        bsz, heads, rows, dim = query.shape
        return tier.wire_bytes_pull(int(counts.sum())) < tier.wire_bytes_attend(bsz, heads, rows, dim, observe,
                                                                                int(counts.max()))

    def _tier_step(self, request: Request, layer: int, page_mass: torch.Tensor) -> None:
        """With tiers below the host: record what this step attended (the host keeps the hottest
        pages), bring the hottest lower pages back up, and start reading the next layer's lower
        pages (asynchronous reads planned a layer ahead)."""
        table, home = request.tables[layer], self.homes[layer]
        n = table.page_ids.shape[1]
        home.touch(table.page_ids.flatten(), page_mass[:, :n].flatten(), self.config.score_decay)
        if table.rules.sparse:  # (exact mode reads every page each step wherever it is: swapping gains nothing)
            home.promote(table.page_ids[table.page_ids >= 0].tolist(), self.config.promote_pages * table.batch_size)
        ahead = (layer + 1) % self.layout.num_layers
        self.homes[ahead].readahead(request.tables[ahead].page_ids)

    # ------------------------------------------------------------------ lost pages
    def _recover(self, request: Request, lost: PagesLost) -> None:
        """Recompute every page of `request` that a lower tier lost, from its token ids."""
        for home in self.homes:
            home.sync_losses()
        per_seq: dict[int, set[int]] = {}
        for layer, table in enumerate(request.tables):
            gone = self.homes[layer].lost
            if not gone:
                continue
            for b in range(table.batch_size):
                for p, page in enumerate(table.page_ids[b, : table.num_complete(b)].tolist()):
                    if page in gone:
                        per_seq.setdefault(b, set()).add(p)
        if not per_seq:
            raise RuntimeError("a lower tier lost pages that no page table of this request holds") from lost
        if self.recompute is None:
            raise RuntimeError("pages were lost and this store has no model to recompute them with "
                               "(OffloadedModel sets one)") from lost
        log_once("lost", f"{lost}; recomputing them from their token ids", lost.cause or lost)
        self.recovery.recoveries += 1
        for b, pages in sorted(per_seq.items()):
            self.recompute(request, b, min(pages), max(pages) + 1)

    @torch.inference_mode()
    def recovery_request(self, request: Request, b: int, first_page: int, end_page: int) -> Request:
        """A batch-of-one request holding sequence b's first `first_page` pages (shared), with
        their token ids, room up to `end_page` pages, and active: forward the tokens of the pages
        after them to recompute those."""
        ps = self.layout.page_size
        scratch = Request(self, 1, end_page * ps)
        self.requests.add(scratch)
        try:
            for layer, table in enumerate(scratch.tables):
                table.attach_pages(0, request.tables[layer].page_ids[b, :first_page].tolist(), None)
            scratch.token_ids[0, : first_page * ps] = request.token_ids[b, : first_page * ps]
            self.activate(scratch, end_page * ps)
        except BaseException:
            self.release(scratch)
            raise
        return scratch

    @torch.inference_mode()
    def restore_from(self, request: Request, b: int, scratch: Request, first_page: int, end_page: int) -> int:
        """Put the recomputed pages of `scratch` back where sequence b of `request` lost them;
        returns how many pages (all layers) were restored."""
        restored = 0
        for layer, (table, fresh) in enumerate(zip(request.tables, scratch.tables)):
            home = self.homes[layer]
            self.residency.complete_copies(fresh)
            for p in range(first_page, end_page):
                page = int(table.page_ids[b, p])
                if page in home.lost:
                    try:
                        keys, values = fresh.home.read([int(fresh.page_ids[0, p])])
                    except PagesLost:
                        continue  # (the recomputed copy spilled and was lost too: the next recovery)
                    home.restore(page, keys[0], values[0])
                    restored += 1
        self.recovery.recomputed_pages += restored
        return restored

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
        unavailable = self.homes[0].num_used - (self.tree.num_evictable() if self.tree else 0)
        unavailable += sum(len(r.tables[0].merged_slots) for r in self.requests)  # merged tokens' room (this one's too)
        lower = sum(t.capacity for t in self.homes[0].lower)
        try:
            budget.check_host_budget(self.config, self.layout, new_pages, unavailable, lower)
            self.activate(request, max_tokens)
        except BaseException:
            self.release(request)
            raise
        return request, skip

    def _attach_prefix(self, request: Request, rows: Sequence[Sequence[int]], pads: Sequence[int]) -> int:
        ps = self.layout.page_size
        if self.prefix_files is not None:
            for row in rows:
                self._load_prefix_files(list(row))
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
                    keys, values = table.home.read([cut_page.page_ids[layer]])
                    tail = (keys[0, :, :cut].transpose(0, 1).clone(), values[0, :, :cut].transpose(0, 1).clone())
                table.attach_pages(b, [node.page_ids[layer] for node in path[:full]], tail)
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
                                    request.crop_margin, self.policy.device_weights(self.layout.num_layers))
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
                wanted = set(table.page_ids[table.page_ids >= 0].tolist())
                for host_id in [h for h in kept if h not in wanted]:
                    pool.decref(kept.pop(host_id))
                while pool.num_free < request.batch_size and kept:  # room for the tails first
                    pool.decref(kept.pop(next(iter(kept))))
                table.attach_device(pool, rules[layer], max_pages)
                request.device_reused_pages += table.adopt_resident(kept)
                for slot in kept.values():
                    pool.decref(slot)
            self.residency.rebalance(table, list(range(request.batch_size)))  # sinks and recent window come back first
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
            self.device_cache.keep(request.tables, self.tree.page_ids_per_layer())
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
            page_ids = torch.stack([t.page_ids[b, :n] for t in request.tables], dim=1)
            freed = (page_ids < 0).any(dim=1).nonzero()  # a sliding layer freed what its window left
            n = int(freed[0]) if freed.numel() else n
            if n == 0:
                continue
            page_ids = page_ids[:n].tolist()
            added += self.tree.insert(ids[: n * ps].tolist(), page_ids)
            if self.prefix_files is not None:
                self._save_prefix_files(ids[: n * ps].tolist(), page_ids)
        return added

    def _save_prefix_files(self, tokens: list[int], page_ids: list[list[int]]) -> None:
        """Write the pages of a cached prefix that have no file yet (page_ids[p][layer])."""
        files, ps = self.prefix_files, self.layout.page_size
        hashes = files.hashes(tokens, len(page_ids))
        missing = [p for p in range(len(page_ids)) if not files.has(hashes[p])]
        for first in range(0, len(missing), SAVE_CHUNK_PAGES):  # bounded memory whatever the prompt
            chunk = missing[first : first + SAVE_CHUNK_PAGES]
            per_layer = [home.read([page_ids[p][layer] for p in chunk]) for layer, home in enumerate(self.homes)]
            for i, p in enumerate(chunk):
                files.save(hashes[p], hashes[p - 1] if p else files.root, tokens[p * ps : (p + 1) * ps],
                           [keys[i] for keys, _ in per_layer], [values[i] for _, values in per_layer])

    def _load_prefix_files(self, row: list[int]) -> None:
        """Extend the prefix tree with the pages of `row` that earlier processes left on disk."""
        files, ps = self.prefix_files, self.layout.page_size
        limit = max(0, len(row) - 1) // ps  # (the last token is always forwarded)
        path = self.tree.match(row, limit)
        if len(path) >= limit:
            return
        hashes = files.hashes(row, limit)
        loaded: list[list[int]] = []
        for p in range(len(path), limit):
            found = files.load(hashes[p], hashes[p - 1] if p else files.root, row[p * ps : (p + 1) * ps])
            if found is None:
                break
            ids = []
            for home, keys, values in zip(self.homes, *found):
                page = home.add(1)[0]
                slot = home.host_slots([page])[0]
                home.host.keys[slot], home.host.values[slot] = keys, values
                home.key_min[page], home.key_max[page] = keys.amin(dim=1), keys.amax(dim=1)  # over the page's tokens
                home.unpin([page])
                ids.append(page)
            loaded.append(ids)
        if loaded:
            pages = [node.page_ids for node in path] + loaded
            self.tree.insert(row[: len(pages) * ps], pages)
            for ids in loaded:  # the tree holds them now
                for home, page in zip(self.homes, ids):
                    home.decref(page)

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

        Pages a lower tier lost (a failed disk read, a lender that died) are recomputed from their
        token ids and the step runs again (nothing of it was stored yet)."""
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return self._attend(request, layer, query, new_keys, new_values, new_valid, scale, return_lse,
                                    softcap, has_readers)
            except PagesLost as lost:
                if attempt == MAX_RECOVERIES:
                    raise RuntimeError(f"layer {layer}: pages kept getting lost after {MAX_RECOVERIES} recoveries; "
                                       "the lower tiers are failing") from lost
                self._recover(request, lost)

    def _attend(self, request: Request, layer: int, query, new_keys, new_values, new_valid, scale, return_lse,
                softcap, has_readers):
        if self.active is not request:
            self.activate(request)
        table = request.tables[layer]
        table.scale = scale
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
        if self.homes[layer].lower:
            self._tier_step(request, layer, result.page_mass)
        selection.observe(table, result.head_mass, decode, layer_plan.observe)
        if table.value_sum is not None:
            table.value_sum += (new_values.float() * new_valid.to(new_values.device)[:, None, :, None]).sum(dim=2).cpu()
        old_lengths = list(table.length)
        appended = append(table, self.transfer, new_keys, new_values, new_valid)
        grew = new_valid.any(dim=1).nonzero().flatten().tolist()
        self.residency.rebalance(table, grew, [appended[b].fresh for b in grew])
        for b in range(table.batch_size):
            finish_tail(table, b, appended[b])
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
        Exact in every mode (the consumer's queries select nothing); the attention mass of the
        observed queries joins the layer's page scores (`PageScorer.add_readers`), so residency and
        eviction weigh what consumers read too. Returns (out, lse)."""
        if self.active is not request:
            self.activate(request)
        table = request.tables[layer]
        self.residency.complete_copies(table)
        valid = query_pos >= 0
        layer_plan = plan(table, valid, None, query.shape[2] <= MAX_DECODE_QUERY, new_pos=query_pos)
        empty = query.new_zeros(query.shape[0], self.layout.num_kv_heads, 0, self.layout.head_dim)
        result = self.runner.run(layer_plan, table, query, empty, empty, scale, softcap)
        table.scores = self.scorer.add_readers(table.scores, result.page_mass)  # criticality serves every reader
        return result.out, result.lse

    def _may_speculate(self, request: Request, layer: int) -> bool:
        """`layer` of the active request selects pages with a policy that speculation serves."""
        rules = request.tables[layer].rules
        return self.active is request and rules is not None and not rules.local and self.policy.speculates

    def speculation_due(self, request: Request, layer: int) -> bool:
        """Whether `layer` speculates this step (`prefetch.prefetcher.due`): ask before predicting."""
        if not self._may_speculate(request, layer):
            return False
        table = request.tables[layer]
        if due(table.quiet_steps):
            return True
        table.counters.prefetch_skipped += 1
        return False

    @torch.inference_mode()
    def speculate(self, request: Request, layer: int, predicted_query: torch.Tensor) -> None:
        """Prefetch the pages a predicted query [B, H, Q, D] of `layer` selects, before it runs."""
        if self._may_speculate(request, layer) and predicted_query.shape[0] == request.batch_size:
            self.prefetcher.speculate(request.tables[layer], predicted_query, layer, self.layout.num_layers)

    # ------------------------------------------------------------------ state
    def host_used_bytes(self) -> int:
        return sum(home.used_bytes for home in self.homes)

    def tier_counters(self) -> dict[str, float]:
        """Cumulative counters of the tiers below the host and of recovery (OffloadStats fields)."""
        counters = {
            "disk_read_bytes": self.disk_counters.read_bytes,
            "disk_write_bytes": self.disk_counters.write_bytes,
            "spilled_pages": sum(h.spilled_pages for h in self.homes),
            "promoted_pages": sum(h.promoted_pages for h in self.homes),
            "recomputed_pages": self.recovery.recomputed_pages,
            "recoveries": self.recovery.recoveries,
            "wire_pull_bytes": 0, "wire_attend_bytes": 0, "remote_attend_s": 0.0,
            "prefix_disk_pages": self.prefix_files.loaded_pages if self.prefix_files else 0,
            "prefix_rejected_files": self.prefix_files.rejected_files if self.prefix_files else 0,
        }
        if self.remote is not None:
            wire = self.remote.counters
            counters.update(wire_pull_bytes=wire.pull_bytes, wire_attend_bytes=wire.attend_bytes,
                            remote_attend_s=wire.remote_attend_s)
        return counters

    def host_reserved_bytes(self) -> int:
        """Host bytes held for merged tokens (merging policies) by every live request."""
        return sum(len(t.merged_slots) for r in self.requests for t in r.tables) * self.layout.page_bytes

    def lower_bytes(self) -> int:
        return sum(t.num_used for h in self.homes for t in h.lower) * self.layout.page_bytes

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
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        for home in self.homes:
            home.close()
        if self.remote is not None:
            self.remote.close()
        self.closed = True
