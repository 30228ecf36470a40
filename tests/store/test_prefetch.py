"""Two-phase copies: nothing is read before it arrives, nothing in flight is evicted, budgets
hold under random interleavings, failures fall back to exact results."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.store.selection import view_of
from offload.store.transfer import TransferEngine
from tests.store.conftest import D, H, Reference, make_store, step


def _prefill(store, request, ref, batch=1, tokens=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    step(store, request, ref, gen, batch, tokens)
    return gen


def _nothing(table):
    """make_room's keep: no page of the one sequence is protected."""
    return torch.zeros(1, table.max_pages, dtype=torch.bool)


def _far_pages(store, table, b=0, room=2):
    """Complete pages that are neither required nor resident, after making `room` free slots."""
    assert store.residency.make_room(table, [b], _nothing(table), torch.tensor([room]))[0] >= room
    required = table.required_pages(b)
    return [p for p in range(table.num_complete(b)) if p not in required and table.slots[b, p] < 0]


def test_prefetched_page_is_not_read_before_its_copy_completes():
    store, request, layer = make_store(1, 80, page_size=4, slack_slots=3, sink_tokens=4, recent_tokens=4)
    ref = Reference(1)
    gen = _prefill(store, request, ref)
    release = threading.Event()
    store.transfer.fault_hook = lambda batch: release.wait(5)  # the link delivers only when released
    pages = _far_pages(store, layer)[:2]
    store.residency.issue(layer, 0, pages)
    slots = [layer.inflight[0][p] for p in pages]
    layer.device_pool.keys[slots] = -7.0  # sentinel: the blocked copy has not written yet
    time.sleep(0.05)
    # Still in flight: not resident, destination untouched, slots held.
    assert set(layer.resident_pages(0)).isdisjoint(pages)
    assert bool((layer.device_pool.keys[slots] == -7.0).all())
    assert all(layer.device_pool.refcount[s] == 1 for s in slots)
    threading.Timer(0.2, release.set).start()
    start = time.perf_counter()
    store.residency.complete_copies(layer)  # completing waits for the link
    assert time.perf_counter() - start >= 0.15
    assert layer.counters.stall_s >= 0.15
    assert set(pages) <= set(layer.resident_pages(0))
    assert torch.equal(layer.device_pool.keys[slots], layer.home.read(layer.page_ids[0, pages])[0])
    step(store, request, ref, gen, 1, 1)  # and attention over them is exact


def test_pages_in_flight_are_never_evicted():
    store, request, layer = make_store(1, 80, page_size=4, slack_slots=3, sink_tokens=4, recent_tokens=4)
    ref = Reference(1)
    _prefill(store, request, ref)
    release = threading.Event()
    store.transfer.fault_hook = lambda batch: release.wait(5)
    far = _far_pages(store, layer)
    store.residency.issue(layer, 0, far[:2])
    held = dict(layer.inflight[0])
    # Ask for far more room than there is: only resident, non-required pages may go.
    store.residency.make_room(layer, [0], _nothing(layer), torch.tensor([100]))
    store.residency.rebalance(layer, [0])  # may promote more pages, but never touches those in flight
    assert held.items() <= layer.inflight[0].items()
    assert all(layer.device_pool.refcount[s] == 1 for s in held.values())
    assert layer.slots_in_use(0) <= layer.rules.slots_per_seq
    release.set()
    store.residency.complete_copies(layer)
    assert set(held) <= set(layer.resident_pages(0))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    page_size=st.sampled_from([1, 4, 8]),
    slack=st.integers(0, 5),
    ops=st.lists(st.sampled_from(["step", "decode", "speculate", "finish"]), min_size=3, max_size=14),
    fail_rate=st.sampled_from([0.0, 0.3]),
)
def test_budget_and_exactness_hold_under_random_interleavings(seed, page_size, slack, ops, fail_rate):
    batch = 2
    store, request, layer = make_store(batch, 200, page_size, slack, sink_tokens=page_size,
                                       recent_tokens=2 * page_size, token_budget=4 * page_size)
    ref = Reference(batch)
    rng = random.Random(seed)

    def flaky_link(_batch):
        time.sleep(rng.random() * 0.002)
        if rng.random() < fail_rate:
            raise OSError("injected copy failure")

    store.transfer.fault_hook = flaky_link
    store.transfer.home_fault_hook = flaky_link  # home copies lag and fail too: readers wait, failures are rewritten
    gen = _prefill(store, request, ref, batch, tokens=3 * page_size + 1, seed=seed)
    for op in ops:
        if op == "step":
            step(store, request, ref, gen, batch, rng.randint(2, 3 * page_size))
        elif op == "decode":
            step(store, request, ref, gen, batch, 1)
        elif op == "speculate":
            store.prefetcher.speculate(layer, torch.randn(batch, H, 1, D, generator=gen))
        else:
            store.residency.complete_copies(layer)
        for b in range(batch):
            assert layer.slots_in_use(b) <= layer.rules.slots_per_seq
        assert layer.device_pool.num_used <= layer.device_pool.capacity
        assert request.device_used_bytes() <= store.config.device_budget
    store.residency.complete_copies(layer)
    if fail_rate == 0.0:
        assert layer.counters.failed_copies == 0
    store.close()  # (settles the home copies still landing now, not at exit)


def test_transfer_engine_counts_and_surfaces_errors():
    store, request, layer = make_store(1, 40, page_size=4, slack_slots=2, sink_tokens=4, recent_tokens=4)
    ref = Reference(1)
    _prefill(store, request, ref, tokens=32)

    def broken(_batch):
        raise OSError("link down")

    store.transfer.fault_hook = broken
    page = _far_pages(store, layer, room=1)[0]
    with pytest.raises(RuntimeError, match="copy failed"):
        store.transfer.host_to_device(layer.home, [int(layer.page_ids[0, page])], layer.device_pool,
                                      [layer.device_pool.allocate()])
    assert store.transfer.counters.failed_batches == 1


def test_emulated_link_takes_bytes_over_bandwidth():
    engine = TransferEngine(emulate_link_gbps=1.0)
    start = time.perf_counter()
    engine._link_wait(5_000_000)  # 5 MB at 1 GB/s
    assert time.perf_counter() - start >= 0.005
    assert engine.counters.link_s >= 0.005


def _policy_pages(store, table, query, b=0):
    """The complete pages the store's policy selects for `query` [1, H, 1, D] now."""
    view = view_of(table, b, table.rules.token_budget, query[b], 0, 1, D ** -0.5)
    return set(store.policy.keep(view).any(dim=0).nonzero().flatten().tolist())


def test_speculation_copies_what_the_policy_would_newly_select():
    # The prediction follows the real selection's rule (budget, sinks, recent window, stickiness):
    # it copies exactly the pages that rule would bring in, evicting only pages it does not want.
    store, request, layer = make_store(1, 80, page_size=4, slack_slots=5, sink_tokens=4, recent_tokens=4,
                                       token_budget=28, sticky_margin=0.0)
    ref = Reference(1)
    _prefill(store, request, ref, tokens=64)
    query = torch.randn(1, H, 1, D, generator=torch.Generator().manual_seed(3))
    predicted = _policy_pages(store, layer, query)
    before = set(layer.resident_pages(0))
    store.prefetcher.speculate(layer, query)
    issued = set(layer.inflight[0])
    assert issued == predicted - before and issued
    assert layer.counters.prefetch_issued_pages == len(issued)
    store.residency.complete_copies(layer)
    assert predicted <= set(layer.resident_pages(0))
    assert layer.slots_in_use(0) <= layer.rules.slots_per_seq
    store.prefetcher.speculate(layer, query)  # nothing new to bring: no copy
    assert not layer.inflight[0]


def test_stickiness_keeps_resident_pages_unless_clearly_beaten():
    # With a margin larger than any bound difference, the selection keeps what is on the device;
    # with none, it follows the bounds alone (and then differs for a query unlike the last).
    store, request, layer = make_store(1, 80, page_size=4, slack_slots=5, sink_tokens=4, recent_tokens=4,
                                       token_budget=28, sticky_margin=1e6)
    ref = Reference(1)
    _prefill(store, request, ref, tokens=64)
    on = layer.on_device_mask(layer.num_complete(0))[0]
    query = torch.randn(1, H, 1, D, generator=torch.Generator().manual_seed(5))
    sticky = _policy_pages(store, layer, query)
    chosen_on = {p for p in sticky if bool(on[p])}
    budget_pages = (28 - layer.length[0] % 4) // 4
    assert len(chosen_on) == min(budget_pages, int(on.sum()))
    store.policy.config.sticky_margin = 0.0
    free = _policy_pages(store, layer, query)
    view = view_of(layer, 0, layer.rules.token_budget, query[0], 0, 1, D ** -0.5)
    bound = store.policy.selector.score(query, view.key_min[None], view.key_max[None])[0]
    required = layer.required_pages(0)
    rest = sorted(set(range(layer.num_complete(0))) - required, key=lambda p: (-float(bound[p]), -p))
    assert free == required | set(rest[: len(free - required)])


def test_rebalance_keeps_the_pages_the_last_query_selected():
    store, request, layer = make_store(1, 80, page_size=4, slack_slots=2, sink_tokens=4, recent_tokens=4, score_decay=1.0)
    ref = Reference(1)
    _prefill(store, request, ref, tokens=64)
    required = layer.required_pages(0)
    others = [p for p in range(layer.num_complete(0)) if p not in required]
    # Criticality says the first two candidates; the last query selected the last two.
    layer.scores[0].zero_()
    layer.scores[0, others[:2]] = 10.0
    layer.last_needed[0, others[-2:]] = True
    for p in layer.resident_pages(0):  # start from no cached pages, so nothing has a resident bonus
        if p not in required:
            layer.device_pool.decref(int(layer.slots[0, p]))
            layer.slots[0, p] = -1
    store.residency.rebalance(layer, [0])
    store.residency.complete_copies(layer)
    assert set(others[-2:]) <= set(layer.resident_pages(0))
    assert set(layer.resident_pages(0)).isdisjoint(others[:2])
