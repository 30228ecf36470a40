"""The remote tier on a local Ray session: lenders, placement, pull vs remote attention, dead lenders.

One Ray session for the module. Clusters are few because each lender is a process that imports
offload (a few seconds on two cores): `cluster` (float32, ample budget) for round trips and
attention, `small` (bfloat16, three slots per layer per lender) for the budget, and one made
inside the dead-lender test, which kills one of its lenders.
"""

from __future__ import annotations

import time

import pytest
import ray  # the `distributed` extra, installed by `make`
import torch

from offload.store.layout import KVLayout
from offload.store.remote import LEASE_PAGES, LenderActor, PlacementActor, RemoteCluster, from_wire, to_wire
from offload.store.tiers import PagesLost, TierFull, Tier, attend_pages

PAGE, HKV, D = 16, 2, 8
F32 = KVLayout(2, HKV, D, PAGE, torch.float32)  # page_bytes 2048
BF16 = KVLayout(2, HKV, D, PAGE, torch.bfloat16)
SMALL_SLOTS = 3


@pytest.fixture(scope="module")
def cluster(ray_session):
    c = RemoteCluster(F32, lenders=2, budget=F32.num_layers * 2048 * F32.page_bytes)
    yield c
    c.close()


@pytest.fixture(scope="module")
def small(ray_session):
    c = RemoteCluster(BF16, lenders=2, budget=BF16.num_layers * SMALL_SLOTS * BF16.page_bytes)
    yield c
    c.close()


def pages(n, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *layout.page_shape)
    return torch.randn(shape, generator=gen).to(layout.dtype), torch.randn(shape, generator=gen).to(layout.dtype)


def settle(cluster):
    """Wait until the placement actor's estimates are the lenders' own counts (lenders report
    asynchronously), so where the next pages go does not depend on timing."""
    while True:
        truth = {name: s["free_pages"] for name, s in cluster.lender_stats().items()}
        if {name: row["free_pages"] for name, row in cluster.view().items() if name in truth} == truth:
            return
        time.sleep(0.01)


def store_spread(tier, keys, values, chunk=LEASE_PAGES):
    """Store in chunks of whole leases: with every lender equally free, consecutive chunks go to
    different lenders."""
    settle(tier.cluster)
    slots = []
    for first in range(0, keys.shape[0], chunk):
        slots += tier.store(keys[first : first + chunk], values[first : first + chunk])
    return slots


def wait_dead(handle):
    while True:
        try:
            ray.get(handle.ping.remote())
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)


def used(cluster, layer):
    return {name: s["used"][layer] for name, s in cluster.lender_stats().items()}


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ---------------------------------------------------------------------- no Ray needed
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wire_round_trip_is_bit_exact(dtype):
    x = torch.randn(3, 5, 2, 4).to(dtype)
    x.view(-1)[:4] = torch.tensor([-0.0, float("inf"), float("nan"), 1e-40]).to(dtype)
    back = from_wire(to_wire(x), dtype)
    assert back.dtype == dtype and torch.equal(bits(back), bits(x))


def test_placement_chooses_the_live_lender_with_most_free_pages():
    now = [0.0]
    placement = PlacementActor(timeout_s=1.0, clock=lambda: now[0])
    placement.report("a", 10, 1)
    placement.report("b", 6, 1)
    assert placement.choose(4) == "a"  # debits a: 6 left, a tie with b broken by name
    assert placement.choose(4) == "a"
    assert placement.choose(1) == "b"
    placement.report("a", 3, 0)  # older than what it already applied: ignored, except as a heartbeat
    assert placement.view()["a"]["free_pages"] == 2
    assert placement.choose(1, exclude=["b"]) == "a"
    now[0] = 1.5
    placement.report("b", 6, 2)  # only b still beats
    assert placement.choose(1) == "b"
    assert placement.view()["a"]["live"] is False
    placement.forget("b")
    assert placement.choose(1) is None


def test_lender_pool_grows_by_doubling_within_its_capacity():
    lender = LenderActor("a", F32, capacity=5)
    keys, values = pages(5, F32)
    assert lender.put(0, to_wire(keys[:1]), to_wire(values[:1])) == [0]
    assert lender.stats()["allocated"] == [1, 0]
    assert lender.put(0, to_wire(keys[1:3]), to_wire(values[1:3])) == [1, 2]
    assert lender.stats()["allocated"] == [3, 0]
    lender.free(0, [1])
    assert lender.put(0, to_wire(keys[3:5]), to_wire(values[3:5])) == [1, 3]  # lowest free slot first
    assert lender.stats()["allocated"] == [5, 0]
    with pytest.raises(TierFull, match="layer 0 has 1 free slot"):
        lender.put(0, to_wire(keys[:2]), to_wire(values[:2]))
    assert lender.stats()["used"] == [4, 0] and lender.free_pages() == 6
    k, _ = lender.get(0, [3, 0])
    assert torch.equal(from_wire(k, F32.dtype), keys[[4, 0]])
    with pytest.raises(ValueError, match="holds no page in slot"):
        lender.get(0, [4])


def test_bad_settings_name_the_variable():
    with pytest.raises(ValueError, match=r"OFFLOAD_REMOTE_BUDGET=4095 bytes per lender .* at least 4096 bytes"):
        RemoteCluster(F32, lenders=2, budget=2 * F32.page_bytes - 1)
    with pytest.raises(ValueError, match="OFFLOAD_REMOTE_BUDGET=0"):
        RemoteCluster(F32, lenders=2, budget=0)
    with pytest.raises(ValueError, match="OFFLOAD_REMOTE_LENDERS=0"):
        RemoteCluster(F32, lenders=0, budget=1 << 20)


# ---------------------------------------------------------------------- on Ray
@pytest.mark.parametrize("which", ["cluster", "small"])
def test_store_load_round_trip_is_bit_exact(request, which):
    c = request.getfixturevalue(which)
    tier = c.tier(1)
    assert isinstance(tier, Tier)
    keys, values = pages(4, c.layout, seed=1)
    slots = tier.store(keys, values)
    assert tier.num_used == 4
    order = [slots[2], slots[0], slots[3]]
    k, v = tier.load(order)
    assert k.dtype == c.layout.dtype
    assert torch.equal(bits(k), bits(keys[[2, 0, 3]])) and torch.equal(bits(v), bits(values[[2, 0, 3]]))
    k[:] = 0  # the caller owns what load returns
    tier.release(slots)
    assert tier.num_used == 0 and sum(used(c, 1).values()) == 0


def test_pages_spread_over_both_lenders(cluster):
    tier = cluster.tier(1)
    keys, values = pages(4 * LEASE_PAGES, F32, seed=2)
    slots = store_spread(tier, keys, values)
    per_lender = used(cluster, 1)
    assert sum(per_lender.values()) == len(slots) == tier.num_used
    assert all(n > 0 for n in per_lender.values()), per_lender
    assert {tier.location(s)[0] for s in slots} == set(cluster.lender_handles)
    k, v = tier.load(slots)
    assert torch.equal(k, keys) and torch.equal(v, values)
    tier.release(slots)


CASES = {  # name: (heads, q_rows, observe, counts, softcap)
    "decode": (4, 1, 1, [13], None),
    "block": (4, 5, 2, [9], None),
    "batch": (4, 1, 1, [7, 12], None),
    "mha-softcap": (2, 3, 3, [5, 11], 20.0),
    "empty-row": (4, 2, 1, [0, 6], None),
    "all-empty": (4, 1, 1, [0, 0], None),
}


@pytest.mark.parametrize("case", CASES)
def test_remote_attention_equals_local(cluster, case):
    heads, q_rows, observe, counts, softcap = CASES[case]
    gen = torch.Generator().manual_seed(3)
    bsz, width = len(counts), max(max(counts), 1) + 2
    keys, values = pages(3 * LEASE_PAGES, F32, seed=4)
    tier = cluster.tier(0)
    slots = torch.tensor(store_spread(tier, keys, values))
    # Each sequence attends random pages in a random order (page 5 shared by both when present).
    local = torch.full((bsz, width), -1, dtype=torch.long)
    for b, n in enumerate(counts):
        local[b, :n] = torch.randperm(keys.shape[0], generator=gen)[:n]
        local[b, : min(n, 1)] = 5
    remote = torch.where(local >= 0, slots[local.clamp(min=0)], -1)
    counts = torch.tensor(counts)
    wanted = {tier.location(int(s))[0] for s in remote[remote >= 0]}
    assert len(wanted) == (2 if counts.sum() else 0)
    query = torch.randn(bsz, heads, q_rows, D, generator=gen)
    before = cluster.counters.attend_bytes
    got = tier.attend(query, remote, counts, 0.35, observe, softcap)
    want = attend_pages(query, keys, values, local, counts, 0.35, observe, softcap, kernel="torch")
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.out, want.out, **tol)
    torch.testing.assert_close(got.lse, want.lse, **tol)
    torch.testing.assert_close(got.page_lse, want.page_lse, **tol)
    assert got.page_lse.shape == (bsz, heads, observe, width)
    assert (cluster.counters.attend_bytes > before) == bool(counts.sum())
    tier.release(slots.tolist())


def test_remote_attention_moves_far_fewer_bytes_than_a_pull(cluster):
    """A 32k-token context of one layer: decode attends it remotely for < 1/10 of pulling it."""
    tier = cluster.tier(0)
    n = 32768 // PAGE
    keys, values = pages(n, F32, seed=5)
    slots = store_spread(tier, keys, values, chunk=n // 8)
    assert {tier.location(s)[0] for s in slots} == set(cluster.lender_handles)
    table, counts = torch.tensor([slots]), torch.tensor([n])
    query = torch.randn(1, 4, 1, D, generator=torch.Generator().manual_seed(6))

    before = cluster.counters.attend_bytes, cluster.counters.pull_bytes
    got = tier.attend(query, table, counts, 0.35, 1, None)
    attend_bytes = cluster.counters.attend_bytes - before[0]
    k, v = tier.load(slots)
    pull_bytes = cluster.counters.pull_bytes - before[1]

    assert pull_bytes == n * F32.page_bytes == tier.wire_bytes_pull(n)
    assert attend_bytes == tier.wire_bytes_attend(1, 4, 1, D, 1, n, num_lenders=2)
    assert 10 * attend_bytes <= pull_bytes, (attend_bytes, pull_bytes)
    want = attend_pages(query, k, v, torch.arange(n)[None], counts, 0.35, 1)
    torch.testing.assert_close(got.out, want.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse, want.lse, atol=1e-5, rtol=1e-5)
    tier.release(slots)


def test_budget_is_a_hard_limit(small):
    tier = small.tier(0)
    assert tier.capacity == 2 * SMALL_SLOTS
    keys, values = pages(8, BF16, seed=7)
    slots = tier.store(keys[:4], values[:4])  # no lender takes 4: split over both
    assert sorted(used(small, 0).values()) == [2, 2]
    with pytest.raises(TierFull, match="OFFLOAD_REMOTE_BUDGET"):
        tier.store(keys[4:7], values[4:7])  # 2 free slots: nothing of the 3 stays
    assert tier.num_used == 4 and sorted(used(small, 0).values()) == [2, 2]
    slots += tier.store(keys[4:6], values[4:6])
    with pytest.raises(TierFull):
        tier.store(keys[6:7], values[6:7])
    assert used(small, 0) == {"lender-0": SMALL_SLOTS, "lender-1": SMALL_SLOTS}
    k, _ = tier.load(slots)
    assert torch.equal(bits(k), bits(keys[:6]))
    tier.release(slots)
    assert sum(used(small, 0).values()) == 0
    assert small.counters.lost_pages == 0


def test_a_dead_lender_loses_exactly_its_pages(ray_session):
    c = RemoteCluster(F32, lenders=2, budget=F32.num_layers * 256 * F32.page_bytes)
    try:
        keys, values = pages(2 * LEASE_PAGES, F32, seed=8)
        tiers = [c.tier(0), c.tier(1)]
        slots = [store_spread(t, keys, values) for t in tiers]
        victim = c.tier(0).location(slots[0][0])[0]
        on_victim = [[s for s in layer_slots if t.location(s)[0] == victim] for t, layer_slots in zip(tiers, slots)]
        survivors = [s for s in slots[0] if s not in on_victim[0]]
        assert on_victim[0] and on_victim[1] and survivors

        ray.kill(c.lender_handles[victim])
        wait_dead(c.lender_handles[victim])  # kill is asynchronous: wait until calls find it dead
        with pytest.raises(PagesLost) as lost:
            tiers[0].load(slots[0])
        assert lost.value.tier == "remote" and sorted(lost.value.slots) == sorted(on_victim[0])
        assert victim in c.dead and c.counters.lost_pages == len(on_victim[0]) + len(on_victim[1])
        assert tiers[1].lost_slots() == sorted(on_victim[1])  # dead for every layer
        assert tiers[0].lost_slots() == sorted(on_victim[0])

        table = torch.tensor([slots[0]])
        with pytest.raises(PagesLost) as lost:
            tiers[0].attend(torch.randn(1, 4, 1, D), table, torch.tensor([table.shape[1]]), 0.35, 1, None)
        assert sorted(lost.value.slots) == sorted(on_victim[0])

        k, v = tiers[0].load(survivors)  # the other lender's pages are intact
        index = [slots[0].index(s) for s in survivors]
        assert torch.equal(k, keys[index]) and torch.equal(v, values[index])

        new = store_spread(tiers[0], keys, values)  # everything new goes to the live lender
        assert {tiers[0].location(s)[0] for s in new} == set(c.lender_handles) - {victim}
        assert tiers[0].capacity == 256
        for t, layer_slots in zip(tiers, slots):
            t.release(layer_slots)  # lost pages included: never raises
        tiers[0].release(new)
        assert tiers[0].num_used == tiers[1].num_used == 0
    finally:
        c.close()
        c.close()  # idempotent
