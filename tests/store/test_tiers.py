"""The disk tier and `PageHome`: bit-exact page round trips, partial attention equal to the host
kernel's over the same pages, spilling within the host budget, promotion, losses and restores."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from offload.store import disk
from offload.store.disk import DiskCounters, DiskTier
from offload.store.home import PageHome
from offload.store.layout import KVLayout
from offload.store.pools import PagePool, PoolExhausted
from offload.store.tiers import PagesLost, TierFull, attend_pages

PS, HKV, D = 4, 2, 8
ATOL = RTOL = 1e-5


def _layout(dtype=torch.float32, layers=1):
    return KVLayout(layers, HKV, D, PS, dtype)


def _pages(n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, HKV, PS, D, generator=gen).to(dtype)  # pages are [H_kv, page_size, D]
    values = torch.randn(n, HKV, PS, D, generator=gen).to(dtype)
    return keys, values


@pytest.fixture
def disk_tier(tmp_path):
    tier = DiskTier(_layout(), str(tmp_path), capacity=64, layer=0, counters=DiskCounters())
    yield tier
    tier.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_round_trip_is_bit_exact_in_any_slot_order(tmp_path, dtype):
    tier = DiskTier(_layout(dtype), str(tmp_path), capacity=16, layer=0, counters=DiskCounters())
    keys, values = _pages(9, dtype)
    slots = tier.store(keys, values)
    assert tier.slot_bytes % mmap.PAGESIZE == 0  # page-aligned slots
    order = [5, 0, 8, 1, 2, 7, 3]  # runs and gaps, out of order
    got_k, got_v = tier.load([slots[i] for i in order])
    assert torch.equal(got_k, keys[order]) and torch.equal(got_v, values[order])
    assert tier.counters.read_bytes == len(order) * _layout(dtype).page_bytes
    tier.close()
    assert not os.path.exists(tier.path)  # scratch space: gone on close


def test_disk_budget_and_slot_reuse(disk_tier):
    keys, values = _pages(64)
    slots = disk_tier.store(keys, values)
    assert disk_tier.num_used == disk_tier.capacity == 64
    with pytest.raises(TierFull):
        disk_tier.store(*_pages(1))
    disk_tier.release(slots[:2])
    again = disk_tier.store(*_pages(2, seed=5))
    assert sorted(again) == sorted(slots[:2])
    assert torch.equal(disk_tier.load(again)[0], _pages(2, seed=5)[0])


def test_failed_and_short_disk_reads_raise_pages_lost_naming_the_slots(disk_tier, monkeypatch):
    slots = disk_tier.store(*_pages(4))

    def fail(wanted):
        raise OSError("injected")

    monkeypatch.setattr(disk_tier, "fault_hook", fail)
    with pytest.raises(PagesLost) as err:
        disk_tier.load(slots[1:3])
    assert err.value.slots == slots[1:3] and isinstance(err.value.cause, OSError)
    monkeypatch.setattr(disk_tier, "fault_hook", None)
    os.truncate(disk_tier.path, disk_tier.slot_bytes * 2)  # slots 2 and 3 are cut off
    assert torch.equal(disk_tier.load(slots[:2])[0], _pages(4)[0][:2])
    with pytest.raises(PagesLost):
        disk_tier.load([slots[3]])
    assert disk_tier.counters.failed_reads == 2


@pytest.mark.parametrize("q_len,observe", [(1, 1), (5, 2), (3, 0)])
def test_disk_attention_in_chunks_equals_the_kernel_over_the_same_pages(disk_tier, monkeypatch, q_len, observe):
    monkeypatch.setattr(disk, "READ_CHUNK_PAGES", 3)  # several chunks, merged by log-sum-exp
    keys, values = _pages(10)
    slots = torch.tensor(disk_tier.store(keys, values))
    table = torch.full((3, 8), -1, dtype=torch.long)
    counts = torch.tensor([8, 5, 0])  # batch 3: different lengths and an empty row
    table[0, :8] = slots[torch.tensor([9, 0, 1, 2, 3, 4, 5, 6])]
    table[1, :5] = slots[torch.tensor([7, 8, 2, 0, 1])]
    query = torch.randn(3, 4, q_len, D)  # GQA: 4 query heads over 2 KV heads
    got = disk_tier.attend(query, table, counts, 0.3, observe, None)
    local = torch.where(table >= 0, torch.argsort(slots)[table.clamp(min=0)], table)  # slot -> row of keys
    want = attend_pages(query, keys, values, local, counts, 0.3, observe, None, kernel="torch")
    torch.testing.assert_close(got.out, want.out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.lse, want.lse, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.page_lse, want.page_lse, atol=ATOL, rtol=RTOL)
    assert bool((got.out[2] == 0).all()) and bool(torch.isinf(got.lse[2]).all())


def _home(tmp_path, host_pages=4, disk_pages=32):
    layout = _layout()
    tier = DiskTier(layout, str(tmp_path), capacity=disk_pages, layer=0, counters=DiskCounters())
    return PageHome(layout, PagePool(layout, 0, "cpu", max_capacity=host_pages), [tier])


def _fill(home, keys, values):
    pages = []
    for i in range(keys.shape[0]):
        page = home.add(1)[0]
        slot = home.host_slots([page])[0]
        home.host.keys[slot], home.host.values[slot] = keys[i], values[i]
        home.unpin([page])
        pages.append(page)
        assert home.host.num_used <= home.host.max_capacity  # the budget is a promise at every step
    return pages


def test_a_full_host_spills_the_coldest_pages_and_reads_stay_exact(tmp_path):
    home = _home(tmp_path)
    keys, values = _pages(12)
    pages = _fill(home, keys[:4], values[:4])
    home.touch(torch.tensor(pages), torch.tensor([5.0, 0.1, 3.0, 0.2]), decay=1.0)
    pages += _fill(home, keys[4:], values[4:])
    assert home.spilled_pages > 0 and home.lower[0].num_used > 0
    assert home.host_slot[pages[0]] >= 0  # the hottest stayed on the host longest
    got_k, got_v = home.read(pages)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    # Partial attention across host and disk equals the kernel over all pages.
    table, counts = torch.tensor([pages]), torch.tensor([12])
    query = torch.randn(1, 4, 1, D)
    got = home.attend(query, table, counts, 0.5, 1)
    want = attend_pages(query, keys, values, torch.arange(12)[None], counts, 0.5, 1, kernel="torch")
    torch.testing.assert_close(got.out, want.out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.page_lse, want.page_lse, atol=ATOL, rtol=RTOL)
    for page in pages:
        home.decref(page)
    assert home.host.num_used == 0 and home.lower[0].num_used == 0 and home.num_used == 0


def test_pinned_pages_never_spill_and_a_home_with_no_room_refuses(tmp_path):
    home = _home(tmp_path, host_pages=2, disk_pages=1)
    keys, values = _pages(3)
    pages = _fill(home, keys[:2], values[:2])
    home.pin(pages[:1])
    pages += _fill(home, keys[2:], values[2:])  # pages[1] spills to the one disk slot
    assert home.host_slot[pages[0]] >= 0 and home.host_slot[pages[1]] < 0
    home.pin(pages[2:])
    with pytest.raises(PoolExhausted, match="OFFLOAD_HOST_BUDGET"):
        home.add(1)


def test_promotion_brings_hot_disk_pages_back(tmp_path):
    home = _home(tmp_path)
    keys, values = _pages(8)
    pages = _fill(home, keys, values)
    cold = [p for p in pages if home.host_slot[p] < 0]
    home.touch(torch.tensor(cold[:1]), torch.tensor([100.0]), decay=1.0)
    assert home.promote(cold, limit=1) == 1 and home.host_slot[cold[0]] >= 0
    assert home.host.num_used <= home.host.max_capacity
    assert torch.equal(home.read(pages)[0], keys)


def test_lost_pages_are_named_and_restored(tmp_path, monkeypatch):
    home = _home(tmp_path)
    keys, values = _pages(8)
    pages = _fill(home, keys, values)
    on_disk = [p for p in pages if home.host_slot[p] < 0]

    def fail(slots):
        raise OSError("injected")

    monkeypatch.setattr(home.lower[0], "fault_hook", fail)
    with pytest.raises(PagesLost):
        home.read(on_disk[:1])
    assert home.lost == {on_disk[0]}
    with pytest.raises(PagesLost):  # a lost page stays lost until restored
        home.attend(torch.randn(1, 4, 1, D), torch.tensor([pages]), torch.tensor([8]), 1.0, 1)
    monkeypatch.setattr(home.lower[0], "fault_hook", None)
    index = pages.index(on_disk[0])
    home.restore(on_disk[0], keys[index], values[index])
    assert not home.lost and torch.equal(home.read(pages)[0], keys)


def test_a_disk_budget_needs_a_disk_dir():
    from offload.config import OffloadConfig

    with pytest.raises(ValueError, match="OFFLOAD_DISK_DIR"):
        OffloadConfig(disk_budget="1GiB")


def test_reserved_host_slots_count_against_the_budget(tmp_path):
    layout = _layout()
    home = PageHome(layout, PagePool(layout, 0, "cpu", max_capacity=4))  # no lower tier: nothing can spill
    slots = home.reserve(3)  # e.g. merged tokens' room
    assert home.used_bytes == 3 * layout.page_bytes
    _fill(home, *_pages(1))
    with pytest.raises(PoolExhausted, match="OFFLOAD_HOST_BUDGET"):
        home.reserve(1)
    home.unreserve(slots)
    assert home.used_bytes == layout.page_bytes
