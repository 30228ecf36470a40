"""Transfers: coalesced copies equal per-page copies on awkward slot patterns and count fewer
transfers; home copies land asynchronously, readers wait for them, and a failed background copy
is rewritten (or surfaces) without corrupting or losing a page."""

from __future__ import annotations

import threading

import pytest
import torch

from offload.store.copy_runs import copy_runs
from offload.store.disk import DiskCounters, DiskTier
from offload.store.home import PageHome
from offload.store.layout import KVLayout
from offload.store.pools import PagePool
from offload.store.transfer import TransferEngine
from tests.store.conftest import Reference, make_store, step

PS, HKV, D = 4, 2, 8
LAYOUT = KVLayout(1, HKV, D, PS, torch.float32)


def _pages(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *LAYOUT.page_shape, generator=gen), torch.randn(n, *LAYOUT.page_shape, generator=gen)


def _home(num_pages, host_capacity=32, lower=None, seed=0):
    """A home whose pages 0..num_pages-1 hold known data (written synchronously), and that data."""
    home = PageHome(LAYOUT, PagePool(LAYOUT, 0, "cpu", max_capacity=host_capacity), lower)
    keys, values = _pages(num_pages, seed)
    pages = home.add(num_pages)
    slots = home.host_slots(pages)
    home.host.keys[slots], home.host.values[slots] = keys, values
    home.unpin(pages)
    return home, pages, keys, values


# ------------------------------------------------------------------ runs
@pytest.mark.parametrize("src,dst,expected", [
    ([], [], []),
    ([7], [3], [(3, [7])]),
    ([0, 1, 2], [4, 5, 6], [(4, [0, 1, 2])]),
    ([9, 2, 5], [4, 5, 6], [(4, [9, 2, 5])]),  # consecutive destinations, scattered sources: one run, gathered
    ([3, 2, 1, 0], [3, 2, 1, 0], [(0, [0, 1, 2, 3])]),  # destination order
    ([0, 1, 2, 3, 4], [0, 1, 5, 8, 9], [(0, [0, 1]), (5, [2]), (8, [3, 4])]),  # runs at both ends
    ([-1, 4], [0, 1], [(0, [-1, 4])]),  # a page with no host slot
])
def test_copy_runs(src, dst, expected):
    runs = copy_runs(src, dst)
    assert [(r.dst, r.src) for r in runs] == expected
    assert sorted(i for r in runs for i in r.index) == list(range(len(dst)))
    for run in runs:
        assert [dst[i] for i in run.index] == list(range(run.dst, run.dst + run.length))


def test_src_slice_only_for_consecutive_sources():
    assert copy_runs([5, 6, 7], [0, 1, 2])[0].src_slice == slice(5, 8)
    assert copy_runs([5, 7], [0, 1])[0].src_slice is None
    assert copy_runs([-1, 0], [0, 1])[0].src_slice is None


# ------------------------------------------------------------------ host -> device
DEVICE_CASES = {  # page index -> device slot
    "empty": ([], []),
    "one page": ([3], [5]),
    "both consecutive": ([0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]),
    "scattered": ([7, 0, 5, 2], [9, 1, 6, 3]),
    "consecutive destinations only": ([6, 1, 4, 0], [0, 1, 2, 3]),
    "runs at the ends": ([0, 1, 2, 8, 9], [0, 1, 2, 10, 11]),
    "reversed": ([4, 3, 2, 1, 0], [0, 1, 2, 3, 4]),
}


@pytest.mark.parametrize("asynchronous", [True, False])
@pytest.mark.parametrize("case", DEVICE_CASES)
def test_coalesced_host_to_device_equals_per_page_copies(case, asynchronous):
    index, slots = DEVICE_CASES[case]
    home, pages, keys, values = _home(10)
    device = PagePool(LAYOUT, 12, "cpu", name="device")
    expected_k, expected_v = device.keys.clone(), device.values.clone()
    for i, slot in zip(index, slots):  # the obvious reference: one page at a time
        expected_k[slot], expected_v[slot] = keys[i], values[i]
    engine = TransferEngine(asynchronous=asynchronous)
    engine.host_to_device(home, [pages[i] for i in index], device, slots)
    assert torch.equal(device.keys, expected_k) and torch.equal(device.values, expected_v)
    runs = copy_runs(home.host_slots([pages[i] for i in index]), slots)
    assert engine.counters.h2d_transfers == 2 * len(runs)  # keys and values: one transfer each per run
    assert engine.counters.h2d_pages == len(index)
    engine.close()


def test_host_to_device_gathers_pages_from_a_lower_tier(tmp_path):
    tier = DiskTier(LAYOUT, str(tmp_path), capacity=16, layer=0, counters=DiskCounters())
    home, pages, keys, values = _home(8, host_capacity=8, lower=[tier])
    home.spill(3)  # some pages now live on disk only
    on_disk = [p for p in pages if home.host_slots([p])[0] < 0]
    assert on_disk
    device = PagePool(LAYOUT, 8, "cpu", name="device")
    engine = TransferEngine()
    engine.host_to_device(home, pages, device, list(range(8)))
    assert torch.equal(device.keys, keys) and torch.equal(device.values, values)
    assert engine.counters.h2d_transfers == 2  # one run of destinations, sources gathered
    engine.close()
    home.close()


def test_consecutive_pages_take_fewer_transfers():
    home, pages, _, _ = _home(16)
    device = PagePool(LAYOUT, 32, "cpu", name="device")
    engine = TransferEngine()
    engine.host_to_device(home, pages[:8], device, list(range(8)))
    assert engine.counters.h2d_transfers == 2
    engine.host_to_device(home, pages[8:], device, list(range(16, 32, 2)))  # every other slot
    assert engine.counters.h2d_transfers == 2 + 16
    engine.close()


def test_residency_issues_consecutive_pages_as_one_transfer():
    store, request, table = make_store(1, 200, page_size=4, slack_slots=8, sink_tokens=4, recent_tokens=4)
    ref = Reference(1)
    step(store, request, ref, torch.Generator().manual_seed(0), 1, 160)
    store.residency.make_room(table, [0], torch.zeros(1, table.max_pages, dtype=torch.bool), torch.tensor([100]))
    far = [p for p in range(table.num_complete(0)) if p not in table.required_pages(0) and table.slots[0, p] < 0]
    wanted = far[:4]
    before = store.transfer.counters.h2d_transfers
    store.residency.issue(table, 0, wanted[::-1])  # priority order; issue sorts by host slot
    store.residency.complete_copies(table)
    assert set(wanted) <= set(table.resident_pages(0))
    hosts = table.home.host_slots([int(table.page_ids[0, p]) for p in wanted])
    devices = [int(table.slots[0, p]) for p in wanted]
    expected = 2 * len(copy_runs(hosts, devices))
    assert store.transfer.counters.h2d_transfers - before == expected
    assert hosts == list(range(hosts[0], hosts[0] + 4))  # one request's pages: consecutive host slots
    store.close()


def test_promotions_of_several_sequences_go_as_one_batch():
    """issue_many: every sequence's pages in one copy batch (one job for the copy engine), each
    page in its own sequence's slot once complete; a failed batch leaves all of them on the host."""
    store, request, table = make_store(3, 200, page_size=4, slack_slots=8, sink_tokens=4, recent_tokens=4)
    ref = Reference(3)
    step(store, request, ref, torch.Generator().manual_seed(0), 3, 160)
    seqs = [0, 1, 2]
    store.residency.make_room(table, seqs, torch.zeros(3, table.max_pages, dtype=torch.bool), torch.tensor([100] * 3))
    wanted = {b: [p for p in range(table.num_complete(b)) if p not in table.required_pages(b)
                  and table.slots[b, p] < 0][:3] for b in seqs}
    store.residency.issue_many(table, [(b, wanted[b]) for b in seqs])
    assert len(table.batches) == 1 and len(table.batches[0][0]) == 9
    assert all(set(wanted[b]) == set(table.inflight[b]) for b in seqs)
    store.residency.complete_copies(table)
    for b in seqs:
        assert set(wanted[b]) <= set(table.resident_pages(b)) and not table.inflight[b]
        keys, _ = table.home.read(table.page_ids[b, wanted[b]].tolist())
        torch.testing.assert_close(table.device_pool.keys[table.slots[b, wanted[b]]], keys, atol=0, rtol=0)

    def broken(batch):
        raise OSError("link down")

    store.transfer.fault_hook = broken
    more = {b: [p for p in range(table.num_complete(b)) if p not in table.required_pages(b)
                and table.slots[b, p] < 0][:2] for b in seqs}
    store.residency.make_room(table, seqs, torch.zeros(3, table.max_pages, dtype=torch.bool), torch.tensor([2] * 3))
    used = table.device_pool.num_used
    store.residency.issue_many(table, [(b, more[b]) for b in seqs])
    store.residency.complete_copies(table)
    assert all(int(table.slots[b, p]) < 0 for b in seqs for p in more[b])  # still on the host, still correct
    assert table.device_pool.num_used == used and table.counters.failed_copies == 6
    store.close()


def test_link_emulation_charges_each_transfer():
    engine = TransferEngine(emulate_link_gbps=10.0, emulate_link_latency_us=5.0)
    one = engine.link_seconds(1_000_000, 1)
    assert one == pytest.approx(5e-6 + 1e-4)
    assert engine.link_seconds(1_000_000, 64) - one == pytest.approx(63 * 5e-6)  # what coalescing saves
    assert engine.link_seconds(0, 3) == 0.0
    assert TransferEngine(emulate_link_latency_us=5.0).link_seconds(1_000_000, 10) == 0.0  # no emulation


# ------------------------------------------------------------------ device -> host (home copies)
HOST_CASES = {
    "one page": [0],
    "consecutive": [0, 1, 2, 3, 4],
    "scattered": [6, 1, 9, 3],
    "runs at the ends": [0, 1, 7, 10, 11],
}


@pytest.mark.parametrize("asynchronous", [True, False])
@pytest.mark.parametrize("case", HOST_CASES)
def test_home_copies_equal_per_page_copies(case, asynchronous):
    slots = HOST_CASES[case]
    home = PageHome(LAYOUT, PagePool(LAYOUT, 12, "cpu"))
    held = home.reserve(12)
    home.unreserve(slots)  # only these slots are free
    pages = home.add(len(slots))
    for page, slot in zip(pages, slots):  # in this (awkward) order
        home.host_slot[page] = slot
    keys, values = _pages(len(slots), seed=1)
    engine = TransferEngine(asynchronous=asynchronous)
    engine.to_host(home, pages, keys, values)
    got_k, got_v = home.read(pages)  # waits for the copy
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert not home.landing
    assert engine.counters.d2h_transfers == 2 * len(copy_runs(range(len(slots)), slots))
    assert engine.counters.d2h_bytes == len(slots) * LAYOUT.page_bytes
    home.unreserve([s for s in held if s not in slots])
    engine.close()


def test_empty_home_copy_is_settled_at_once():
    home = PageHome(LAYOUT, PagePool(LAYOUT, 4, "cpu"))
    copy = TransferEngine().to_host(home, [], torch.zeros(0, *LAYOUT.page_shape), torch.zeros(0, *LAYOUT.page_shape))
    assert copy.settled and not home.landing


def test_new_pages_get_ascending_host_slots():
    home = PageHome(LAYOUT, PagePool(LAYOUT, 0, "cpu", max_capacity=32))
    first = home.add(6)
    home.unpin(first)
    for page in first:  # freed in page order: the free stack hands them back in reverse
        home.decref(page)
    again = home.add(6)
    assert home.host_slots(again) == sorted(home.host_slots(again))
    assert len(copy_runs(range(6), home.host_slots(again))) == 1


class Gate:
    """A home-copy fault hook that holds the copy until `open` (and records that it was opened)."""

    def __init__(self):
        self.event = threading.Event()
        self.opened = False

    def __call__(self, copy):
        assert self.event.wait(10)

    def open_later(self, seconds=0.05):
        def go():
            self.opened = True
            self.event.set()
        threading.Timer(seconds, go).start()


def _landing_home(engine, num_pages=4, host_capacity=8, lower=None):
    home = PageHome(LAYOUT, PagePool(LAYOUT, 0, "cpu", max_capacity=host_capacity), lower)
    pages = home.add(num_pages)
    home.host.keys.fill_(-7.0)  # sentinel: the copy has not written yet
    keys, values = _pages(num_pages, seed=2)
    engine.to_host(home, pages, keys, values)
    home.unpin(pages)
    return home, pages, keys, values


def test_reader_right_after_submission_waits_for_the_home_copy():
    engine = TransferEngine()
    gate = Gate()
    engine.home_fault_hook = gate
    home, pages, keys, values = _landing_home(engine)
    assert set(pages) <= set(home.landing)  # in flight, known to the home
    gate.open_later()
    got_k, got_v = home.read(pages[1:3])
    assert gate.opened  # the read could only return after the copy ran
    assert torch.equal(got_k, keys[1:3]) and torch.equal(got_v, values[1:3])
    assert not home.landing
    engine.close()


def test_host_attention_waits_for_the_home_copy():
    engine = TransferEngine()
    gate = Gate()
    engine.home_fault_hook = gate
    home, pages, keys, values = _landing_home(engine)
    query = torch.randn(1, 2 * HKV, 1, D)
    table = torch.tensor([pages])
    counts = torch.tensor([len(pages)])
    gate.open_later()
    part = home.attend(query, table, counts, 0.3, 1, kernel="torch")
    assert gate.opened
    reference = PageHome(LAYOUT, PagePool(LAYOUT, 8, "cpu"))
    ref_pages = reference.add(len(pages))
    slots = reference.host_slots(ref_pages)
    reference.host.keys[slots], reference.host.values[slots] = keys, values
    expected = reference.attend(query, torch.tensor([ref_pages]), counts, 0.3, 1, kernel="torch")
    torch.testing.assert_close(part.out, expected.out, rtol=0, atol=0)
    engine.close()


def test_spill_and_pool_growth_wait_for_landing_copies(tmp_path):
    tier = DiskTier(LAYOUT, str(tmp_path), capacity=16, layer=0, counters=DiskCounters())
    engine = TransferEngine()
    gate = Gate()
    engine.home_fault_hook = gate
    home, pages, keys, values = _landing_home(engine, num_pages=4, host_capacity=64, lower=[tier])
    assert home.host.capacity == 16
    gate.open_later()
    more = home.add(20)  # grows the host pool: the landing copy must not be lost in the old tensors
    assert gate.opened and home.host.capacity == 32
    home.unpin(more)
    home.spill(64)  # the landing pages' lower copies are written from their landed home copies
    assert all(s < 0 for s in home.host_slots(pages))
    got_k, got_v = home.read(pages)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    engine.close()
    home.close()


def test_failed_background_home_copy_is_rewritten_on_settle(caplog):
    engine = TransferEngine()

    def broken(copy):
        raise OSError("injected home copy failure")

    engine.home_fault_hook = broken
    home, pages, keys, values = _landing_home(engine)
    with caplog.at_level("WARNING", logger="offload"):
        got_k, got_v = home.read(pages)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert engine.counters.failed_home_copies == 1
    assert any("injected home copy failure" in r.getMessage() for r in caplog.records)
    engine.close()


def test_home_copy_that_fails_twice_surfaces_and_loses_nothing(monkeypatch):
    engine = TransferEngine()

    def broken(copy):
        raise OSError("injected home copy failure")

    engine.home_fault_hook = broken
    home, pages, keys, values = _landing_home(engine)
    real = engine._write_home

    def write_fails(copy, non_blocking=False):
        raise OSError("host memory went away")

    monkeypatch.setattr(engine, "_write_home", write_fails)
    with pytest.raises(RuntimeError, match="failed in the background and again"):
        home.read(pages)
    assert set(pages) <= set(home.landing)  # still landing, its source still held
    monkeypatch.setattr(engine, "_write_home", real)
    got_k, got_v = home.read(pages)  # a later reader tries again
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    engine.close()


def test_store_steps_stay_exact_when_home_copies_fail_or_lag():
    store, request, table = make_store(2, 120, page_size=4, slack_slots=3, sink_tokens=4, recent_tokens=4)
    calls = {"n": 0}

    def flaky(copy):
        calls["n"] += 1
        if calls["n"] % 2:
            raise OSError("injected home copy failure")

    store.transfer.home_fault_hook = flaky
    ref = Reference(2)
    gen = torch.Generator().manual_seed(3)
    step(store, request, ref, gen, 2, 37)
    for _ in range(12):
        step(store, request, ref, gen, 2, 1)  # (checked against naive attention each step)
    stats = request.stats()
    assert stats.failed_home_copies > 0
    assert stats.d2h_bytes == sum(table.num_complete(b) for b in range(2)) * table.layout.page_bytes
    assert stats.d2h_transfers >= 2 and stats.bytes_per_transfer > 0
    store.close()
