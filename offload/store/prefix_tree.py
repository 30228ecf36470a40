"""`PrefixTree`: complete pages of finished requests, keyed by their token ids, for reuse.

A radix tree over whole pages (SGLang's `RadixCache`, ChunkAttention's prefix trie): each node is
one page of `page_size` token ids under its parent, and holds one reference on that page in every
layer's home (host or lower tier). A request whose prompt starts with a cached path takes its own references
on those pages and forwards only the tokens after them. Pages are only ever shared whole and
read-only; a request that needs part of a page copies those tokens into its own tail.

The KV of a token depends on the tokens before it and on its position. Positions here are the
token's index among the real tokens (what `generate` derives from the attention mask), so a path
of token ids identifies its pages.

Eviction frees leaves whose pages no live request references (host reference count 1 in every
layer, the tree's own), lowest `EvictionOrder.priority` first (LRU by default); a parent whose
last child left becomes a leaf and a candidate in turn.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from offload.policies import EvictionCandidates, EvictionOrder, keep_order
from offload.store.home import PageHome


class PrefixNode:
    __slots__ = ("key", "parent", "children", "page_ids", "last_access", "depth")

    def __init__(self, key: tuple[int, ...], parent: "PrefixNode | None", page_ids: list[int], depth: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[tuple[int, ...], PrefixNode] = {}
        self.page_ids = page_ids  # one host page per layer
        self.last_access = 0.0
        self.depth = depth  # page index in its sequence


class PrefixTree:
    def __init__(self, page_size: int, homes: list[PageHome], order: EvictionOrder) -> None:
        self.page_size = page_size
        self.homes = homes
        self.order = order
        self.root = PrefixNode((), None, [], -1)
        self.leaves: set[PrefixNode] = set()
        self.num_pages = 0
        self.clock = 0.0
        self.on_remove: Callable[[list[int]], None] | None = None  # called with a removed page's host ids

    def _pages(self, tokens: Sequence[int], max_pages: int) -> list[tuple[int, ...]]:
        ps = self.page_size
        n = min(len(tokens) // ps, max_pages)
        return [tuple(tokens[i * ps : (i + 1) * ps]) for i in range(n)]

    def match(self, tokens: Sequence[int], max_pages: int | None = None) -> list[PrefixNode]:
        """The cached path of whole pages that `tokens` starts with (at most `max_pages`); marks it used."""
        self.clock += 1
        node, path = self.root, []
        for key in self._pages(tokens, len(tokens) if max_pages is None else max_pages):
            node = node.children.get(key)
            if node is None:
                break
            node.last_access = self.clock
            path.append(node)
        return path

    def match_partial(self, tokens: Sequence[int], path: list[PrefixNode], limit: int) -> tuple[PrefixNode | None, int]:
        """After the whole pages `path` of `tokens`, the cached next page sharing the most leading
        tokens with what follows (at most `limit` of them, fewer than a page): (that page, how many).
        Its first tokens can be copied into a private tail instead of forwarded again."""
        node = path[-1] if path else self.root
        start = len(path) * self.page_size
        rest = tuple(tokens[start : start + min(limit, self.page_size - 1)])
        best, best_len = None, 0
        for key, child in node.children.items():
            n = 0
            while n < len(rest) and key[n] == rest[n]:
                n += 1
            if n > best_len:
                best, best_len = child, n
        if best is not None:
            best.last_access = self.clock
        return best, best_len

    def insert(self, tokens: Sequence[int], page_ids: Sequence[Sequence[int]]) -> int:
        """Cache the pages of `tokens` (whole pages only); page_ids[p][layer] is page p's host copy
        per layer. Pages already cached keep their copy; new ones take a reference. Returns how
        many pages were added."""
        self.clock += 1
        node, added = self.root, 0
        for p, key in enumerate(self._pages(tokens, len(page_ids))):
            child = node.children.get(key)
            if child is None:
                ids = [int(i) for i in page_ids[p]]
                for pool, host_id in zip(self.homes, ids):
                    pool.incref(host_id)
                child = PrefixNode(key, node, ids, p)
                node.children[key] = child
                self.leaves.discard(node)
                self.leaves.add(child)
                self.num_pages += 1
                added += 1
            child.last_access = self.clock
            node = child
        return added

    def _evictable(self, node: PrefixNode) -> bool:
        return not node.children and all(pool.refcount[i] == 1 for pool, i in zip(self.homes, node.page_ids))

    def num_evictable(self) -> int:
        """Pages that eviction could free now (whole subtrees no live request references)."""
        order, stack = [], list(self.root.children.values())
        while stack:  # iterative: a long prompt is a chain thousands of pages deep
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        free: dict[PrefixNode, bool] = {}
        for node in reversed(order):  # every child before its parent
            free[node] = all(free[child] for child in node.children.values()) and all(
                pool.refcount[i] == 1 for pool, i in zip(self.homes, node.page_ids))
        return sum(free.values())

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` cached pages, lowest priority first; returns how many were freed."""
        freed = 0
        while freed < num_pages:
            candidates = [leaf for leaf in self.leaves if self._evictable(leaf)]
            if not candidates:
                break
            info = EvictionCandidates.of(
                len(candidates),
                last_access=torch.tensor([n.last_access for n in candidates], dtype=torch.float64),
                position=torch.tensor([n.depth for n in candidates], dtype=torch.float64),
            )
            order = keep_order(self.order, info)[::-1]  # the first to leave first
            for i in order[: num_pages - freed]:
                self._remove(candidates[i])
                freed += 1
        return freed

    def page_ids_per_layer(self) -> list[set[int]]:
        """Per layer, the host pages the tree holds."""
        held = [set() for _ in self.homes]
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            for layer, host_id in enumerate(node.page_ids):
                held[layer].add(host_id)
        return held

    def _remove(self, node: PrefixNode) -> None:
        if self.on_remove is not None:
            self.on_remove(node.page_ids)
        for pool, host_id in zip(self.homes, node.page_ids):
            pool.decref(host_id)
        parent = node.parent
        del parent.children[node.key]
        self.leaves.discard(node)
        if parent is not self.root and not parent.children:
            self.leaves.add(parent)
        self.num_pages -= 1

    def clear(self) -> None:
        """Drop every cached page (references of live requests stay theirs)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if self.on_remove is not None:
                self.on_remove(node.page_ids)
            for pool, host_id in zip(self.homes, node.page_ids):
                pool.decref(host_id)
        self.root.children.clear()
        self.leaves.clear()
        self.num_pages = 0
