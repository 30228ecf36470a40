"""PrefixTree on page homes (host pools only): matching, reference counts, eviction order."""

from __future__ import annotations

import pytest
import torch

from offload.policies import make_eviction_order
from offload.store.layout import KVLayout
from offload.store.home import PageHome
from offload.store.pools import PagePool, PoolExhausted
from offload.store.prefix_tree import PrefixTree

PS = 2


def _tree(num_layers=2, capacity=32, order="lru"):
    layout = KVLayout(num_layers, 1, 4, PS, torch.float32)
    pools = [PageHome(layout, PagePool(layout, 0, "cpu", max_capacity=capacity)) for _ in range(num_layers)]
    return PrefixTree(PS, pools, make_eviction_order(order)), pools


def _new_page(home):
    page = home.add(1)[0]
    home.unpin([page])
    return page


def _store_pages(tree, pools, tokens):
    """What a finished request does: allocate a page per layer for each whole page, insert, drop its refs."""
    ids = [[_new_page(pool) for pool in pools] for _ in range(len(tokens) // PS)]
    added = tree.insert(tokens, ids)
    for page in ids:
        for pool, host_id in zip(pools, page):
            pool.decref(host_id)
    return ids, added


def test_match_returns_the_longest_cached_path_of_whole_pages():
    tree, pools = _tree()
    ids, added = _store_pages(tree, pools, [1, 2, 3, 4, 5, 6, 7])  # 3 whole pages; token 7 is not cached
    assert added == 3 and tree.num_pages == 3
    assert [n.page_ids for n in tree.match([1, 2, 3, 4, 9, 9])] == ids[:2]
    assert [n.page_ids for n in tree.match([1, 2, 3, 4, 5, 6, 7, 8])] == ids
    assert tree.match([1, 2, 3, 4, 5, 6], max_pages=1)[0].page_ids == ids[0]
    assert tree.match([2, 1]) == []
    assert all(pool.refcount[:3] == [1, 1, 1] for pool in pools)  # the tree's own reference only


def test_inserting_a_cached_page_again_keeps_the_first_copy():
    tree, pools = _tree()
    first, _ = _store_pages(tree, pools, [1, 2, 3, 4])
    second, added = _store_pages(tree, pools, [1, 2, 3, 4, 5, 6])
    assert added == 1 and tree.num_pages == 3
    assert [n.page_ids for n in tree.match([1, 2, 3, 4, 5, 6])] == first + second[2:]
    assert pools[0].num_used == 3  # the duplicate copies went back to the pool


def test_eviction_frees_least_recently_used_leaves_first_and_never_live_pages():
    tree, pools = _tree()
    a, _ = _store_pages(tree, pools, [1, 1, 2, 2])
    b, _ = _store_pages(tree, pools, [3, 3, 4, 4])
    c, _ = _store_pages(tree, pools, [5, 5])
    tree.match([1, 1, 2, 2])  # a is now the most recent
    for pool, host_id in zip(pools, c[0]):
        pool.incref(host_id)  # a live request holds c
    assert tree.num_evictable() == 4
    assert tree.evict(1) == 1  # b's leaf (least recent evictable), not c (live) nor a
    assert [n.page_ids for n in tree.match([3, 3, 4, 4])] == b[:1]
    assert tree.evict(10) == 3  # b's root page, then a's two pages; c stays
    assert tree.num_pages == 1 and tree.match([5, 5])[0].page_ids == c[0]
    assert all(pool.num_used == 1 for pool in pools)


def test_a_full_host_pool_reclaims_cached_pages_before_refusing():
    tree, pools = _tree(num_layers=1, capacity=4)
    pools[0].reclaim = tree.evict
    _store_pages(tree, pools, [1, 1, 2, 2, 3, 3, 4, 4])
    assert pools[0].host.num_free == 0
    held = [_new_page(pools[0]) for _ in range(4)]  # each allocation evicts the oldest leaf
    assert tree.num_pages == 0 and sorted(pools[0].host_slots(held)) == [0, 1, 2, 3]
    with pytest.raises(PoolExhausted):
        _new_page(pools[0])


def test_clear_drops_only_the_trees_references():
    tree, pools = _tree()
    ids, _ = _store_pages(tree, pools, [1, 2, 3, 4])
    pools[0].incref(ids[0][0])
    tree.clear()
    assert tree.num_pages == 0 and tree.match([1, 2]) == []
    assert pools[0].num_used == 1 and pools[1].num_used == 0


def test_a_prompt_thousands_of_pages_long_is_matched_counted_and_evicted():
    tree, pools = _tree(num_layers=1, capacity=5000)
    tokens = list(range(2 * 3000))
    _store_pages(tree, pools, tokens)
    assert len(tree.match(tokens)) == 3000
    assert tree.num_evictable() == 3000
    assert tree.evict(3000) == 3000 and pools[0].num_used == 0


def test_evicting_a_cached_page_drops_its_device_copy():
    from tests.store.conftest import Reference, make_store, step

    with torch.inference_mode():
        store, request, table = make_store(1, 40, page_size=4, slack_slots=4, prefix_cache=True)
        step(store, request, Reference(1), torch.Generator().manual_seed(0), 1, 33)
        request.token_ids[0, :33] = torch.arange(33)
        assert store.cache_prefix(request) == 8
        pool = table.device_pool
        store.park(request, keep_cached=True)
        kept = len(store.device_cache.kept[0])
        assert kept > 0 and pool.num_used == kept  # only the kept copies hold slots now
        store.release(request)
        assert store.tree.evict(8) == 8
        assert pool.num_used == 0 and store.device_cache.kept[0] == {}
        store.close()


def test_partial_match_finds_the_cached_page_sharing_the_most_leading_tokens():
    tree, pools = _tree()
    ids, _ = _store_pages(tree, pools, [1, 2, 3, 4, 5, 6])  # pages (1, 2), (3, 4), (5, 6)
    tokens = [1, 2, 3, 9, 9]
    path = tree.match(tokens, max_pages=2)
    assert [n.page_ids for n in path] == ids[:1]  # (3, 9) is no cached page
    node, shared = tree.match_partial(tokens, path, limit=3)
    assert node.page_ids == ids[1] and shared == 1  # token 3 of page (3, 4)
    assert tree.match_partial(tokens, path, limit=0) == (None, 0)
    assert tree.match_partial([7, 7], [], limit=1) == (None, 0)
