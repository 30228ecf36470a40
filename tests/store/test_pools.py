from __future__ import annotations

import pytest
import torch

from offload.store.layout import KVLayout
from offload.store.pools import PagePool, PoolExhausted

LAYOUT = KVLayout(num_layers=1, num_kv_heads=2, head_dim=4, page_size=4, dtype=torch.float32)


def test_allocation_order_and_free_order():
    pool = PagePool(LAYOUT, 4, "cpu")
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    pool.decref(1)
    pool.decref(0)
    # Freed slots are reused last-freed first; then the untouched slot 3.
    assert pool.allocate() == 0
    assert pool.allocate() == 1
    assert pool.allocate() == 3
    assert pool.num_used == 4


def test_shared_slot_is_freed_only_when_last_reference_drops():
    pool = PagePool(LAYOUT, 2, "cpu")
    slot = pool.allocate()
    pool.incref(slot)
    pool.decref(slot)
    assert pool.num_used == 1
    pool.decref(slot)
    assert pool.num_used == 0
    with pytest.raises(RuntimeError, match="free slot"):
        pool.decref(slot)


def test_fixed_pool_never_grows_past_capacity():
    pool = PagePool(LAYOUT, 2, "cpu")
    pool.allocate(), pool.allocate()
    with pytest.raises(PoolExhausted, match="budget"):
        pool.allocate()
    assert pool.reserved_bytes == 2 * LAYOUT.page_bytes


def test_growable_pool_keeps_data_and_respects_max():
    pool = PagePool(LAYOUT, 1, "cpu", max_capacity=3)
    slot = pool.allocate()
    pool.keys[slot] = 7.0
    assert [pool.allocate(), pool.allocate()] == [1, 2]
    assert pool.capacity == 3 and torch.all(pool.keys[slot] == 7.0)
    with pytest.raises(PoolExhausted):
        pool.allocate()


def test_pools_start_zeroed():
    pool = PagePool(LAYOUT, 3, "cpu")
    assert torch.count_nonzero(pool.keys) == 0 and torch.count_nonzero(pool.values) == 0
