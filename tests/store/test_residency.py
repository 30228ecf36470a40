"""One layer's step on plain tensors against a naive reference, with exact state assertions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.policies import EVICTION_ORDERS, SCORERS, SELECTORS, EvictionCandidates, keep_order
from offload.store.layout import page_tokens
from tests.store.conftest import HKV, D, Reference, make_store, step

POLICY_MATRIX = [(sel, sco, ev) for sel in SELECTORS for sco in SCORERS for ev in EVICTION_ORDERS]


@pytest.mark.parametrize("selector,scorer,device_eviction", POLICY_MATRIX)
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_every_policy_keeps_budgets_and_exact_mode_exact(selector, scorer, device_eviction, mode):
    """Policies decide residency (and, in sparse mode, what is attended); exact mode stays exact
    and no policy can make a tier exceed its budget."""
    gen = torch.Generator().manual_seed(11)
    extra = {"token_budget": 12} if mode == "sparse" else {}
    store, request, table = make_store(2, 200, page_size=4, slack_slots=3, selector=selector, scorer=scorer,
                                       device_eviction=device_eviction, mode=mode, **extra)
    ref = Reference(2)
    step(store, request, ref, gen, 2, 61, pad=[0, 7])
    for _ in range(12):
        if mode == "exact":
            step(store, request, ref, gen, 2, 1)
        else:
            query = torch.randn(2, 4, 1, D, generator=gen)
            kv = torch.randn(2, HKV, 1, D, generator=gen)
            store.attend(request, 0, query, kv, kv.clone(), torch.ones(2, 1, dtype=torch.bool), 0.35)
            assert request.device_used_bytes() <= store.config.device_budget
        store.prefetcher.speculate(table, torch.randn(2, 4, 1, D, generator=gen))
        for b in range(2):
            assert table.required_pages(b) <= set(table.resident_pages(b)) | set(table.inflight[b])
            assert table.slots_in_use(b) <= table.rules.slots_per_seq
    assert request.device_peak_bytes <= store.config.device_budget


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    page_size=st.sampled_from([1, 3, 4, 16]),
    batch=st.integers(1, 3),
    slack=st.integers(0, 4),
    steps=st.lists(st.integers(1, 23), min_size=1, max_size=8),
    sparse_budget=st.sampled_from([None, 10_000]),
)
def test_random_schedules_match_reference_and_hold_budget(seed, page_size, batch, slack, steps, sparse_budget):
    gen = torch.Generator().manual_seed(seed)
    extra = {} if sparse_budget is None else {"mode": "sparse", "token_budget": sparse_budget}
    store, request, table = make_store(batch, sum(steps) + 1, page_size, slack, **extra)
    ref = Reference(batch)
    pad = [min(steps[0] - 1, b * 2) for b in range(batch)]  # left padding in the first chunk
    for i, n in enumerate(steps):
        step(store, request, ref, gen, batch, n, pad if i == 0 else None)
    for b in range(batch):
        assert table.length[b] == ref.keys[b].shape[1]
        # Every complete page has a home copy; the host copy and its summary equal the stored tokens.
        n = table.num_complete(b)
        ids = table.page_ids[b, :n]
        assert bool((ids >= 0).all())
        host_k = page_tokens(table.home.read(ids)[0]).transpose(0, 1)
        torch.testing.assert_close(host_k, ref.keys[b][:, : n * page_size])
        torch.testing.assert_close(table.home.key_max[ids], table.home.read(ids)[0].amax(dim=2))  # over tokens
        torch.testing.assert_close(table.key_min[b, :n], table.home.key_min[ids])
        assert table.required_pages(b) <= set(table.resident_pages(b))
        assert table.slots_in_use(b) <= table.rules.slots_per_seq


def test_eviction_keeps_required_and_highest_scores_exactly():
    store, request, table = make_store(1, 64, page_size=4, slack_slots=2, sink_tokens=4, recent_tokens=4)
    gen = torch.Generator().manual_seed(0)
    step(store, request, Reference(1), gen, 1, 40)  # 10 complete pages; required: sink page 0 and recent page 9
    table.scores.zero_()
    table.scores[0, 3], table.scores[0, 6], table.scores[0, 5] = 5.0, 4.0, 4.0
    store.residency.rebalance(table, [0])
    # 2 slack slots: the top scores 3, then 6 (ties go to the newer page), promoted from the host,
    # asynchronously: in flight (slots held) until completed.
    assert sorted(table.inflight[0]) == [3, 6] and table.resident_pages(0) == [0, 9]
    assert table.slots_in_use(0) == 5
    store.residency.complete_copies(table)
    assert table.resident_pages(0) == [0, 3, 6, 9] and table.inflight[0] == {}
    assert store.transfer.counters.h2d_pages == 2


def test_lru_device_eviction_keeps_the_most_recently_selected_pages():
    store, request, table = make_store(1, 64, page_size=4, slack_slots=2, sink_tokens=4, recent_tokens=4,
                                       device_eviction="lru")
    step(store, request, Reference(1), torch.Generator().manual_seed(0), 1, 40)
    table.scores.zero_()
    table.scores[0, 3] = 100.0  # criticality would keep page 3; LRU looks only at last use
    table.last_used[0, 5], table.last_used[0, 7] = 9.0, 8.0
    store.residency.rebalance(table, [0])
    store.residency.complete_copies(table)
    assert table.resident_pages(0) == [0, 5, 7, 9]


def test_select_shares_pages_and_copies_tails():
    store, request, table = make_store(2, 32, page_size=4, slack_slots=1)
    gen = torch.Generator().manual_seed(1)
    ref = Reference(2)
    step(store, request, ref, gen, 2, 10)
    host_before = table.home.num_used
    store.residency.complete_copies(table)
    table.select(torch.tensor([1, 1]))
    assert table.home.num_used == host_before // 2  # sequence 0's pages are gone, 1's are shared
    for p in range(2):
        assert table.page_ids[0, p] == table.page_ids[1, p]
        assert table.home.refcount[int(table.page_ids[0, p])] == 2
    assert table.tail_slot[0] != table.tail_slot[1]
    torch.testing.assert_close(table.device_pool.keys[table.tail_slot[0]], table.device_pool.keys[table.tail_slot[1]])
    ref.keys = [ref.keys[1], ref.keys[1]]
    ref.values = [ref.values[1], ref.values[1]]
    step(store, request, ref, gen, 2, 3)
    device_pool = table.device_pool
    request.release()
    assert table.home.num_used == 0 and device_pool.num_used == 0


def test_default_token_budget_is_what_the_device_holds():
    store, _, table = make_store(2, 64, page_size=4, slack_slots=3)  # token_budget left at its default (None)
    assert store.config.token_budget is None
    assert table.rules.token_budget == (table.rules.slots_per_seq - 1) * 4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), page_size=st.sampled_from([1, 3, 4]), first=st.integers(1, 30),
       cut=st.integers(0, 30), more=st.integers(1, 9))
def test_crop_then_continue_matches_reference(seed, page_size, first, cut, more):
    """crop keeps the first tokens exactly: a page cut in two becomes a private tail, shared pages stay."""
    gen = torch.Generator().manual_seed(seed)
    store, request, table = make_store(1, first + more + 1, page_size, slack_slots=1)
    ref = Reference(1)
    step(store, request, ref, gen, 1, first)
    keep = max(0, first - cut)
    store.residency.complete_copies(table)
    host_pages_before = table.num_complete(0)
    table.crop(0, keep)
    ref.crop(0, keep)
    assert table.length[0] == keep
    assert table.home.num_used == keep // page_size <= host_pages_before
    assert bool((table.page_ids[0, keep // page_size :] < 0).all())
    step(store, request, ref, gen, 1, more)
    request.release()
    assert table.home.num_used == 0


def test_park_and_resume_keep_every_token():
    store, request, table = make_store(2, 60, page_size=4, slack_slots=2)
    gen = torch.Generator().manual_seed(3)
    ref = Reference(2)
    step(store, request, ref, gen, 2, 23, pad=[0, 5])
    store.park(request)
    assert not request.on_device and store.active is None
    assert table.parked_tails[0][0].shape[0] == 23 % 4
    # Another request takes the device; the first resumes afterwards, for more tokens than before.
    other, _ = store.open(1, 8)
    step(store, other, Reference(1), gen, 1, 5)
    store.activate(request, 60)
    assert not other.on_device
    step(store, request, ref, gen, 2, 1)
    step(store, request, ref, gen, 2, 9)


def _rebalance_reference(table, order, b):
    """The per-sequence rule, written plainly: (pages kept resident, pages promoted) for sequence b."""
    rules, n = table.rules, table.num_complete(b)
    required = table.required_pages(b)
    inflight = set(table.inflight[b])
    room = 0 if rules.local else rules.slots_per_seq - 1 - len(required) - len(inflight)
    resident = set(table.resident_pages(b))
    others = [p for p in range(n) if table.page_ids[b, p] >= 0 and p not in required and p not in inflight]
    wanted = set(required)
    if room >= len(others):
        wanted.update(others)
    elif room > 0:
        idx = torch.tensor(others)
        candidates = EvictionCandidates.of(
            len(others), score=table.scores[b, idx], last_access=table.last_used[b, idx],
            resident=torch.tensor([p in resident for p in others]),
            recently_needed=table.last_needed[b, idx], position=idx)
        wanted.update(others[i] for i in keep_order(order, candidates)[:room])
    score = table.scores[b].tolist()
    promote = sorted((p for p in wanted if p not in resident and p not in inflight),
                     key=lambda p: (p not in required, -score[p], -p))
    chosen = [p for p in promote if p in required] + [p for p in promote if p not in required][: rules.promote_pages]
    return resident & wanted, set(chosen)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), slack=st.integers(0, 6),
       promote=st.integers(1, 4), device_eviction=st.sampled_from(sorted(EVICTION_ORDERS)))
def test_batched_rebalance_matches_the_per_sequence_rule(seed, batch, slack, promote, device_eviction):
    """Random scores (with ties), last uses, last selections and residency: the batched rebalance
    keeps and promotes exactly the pages the plain per-sequence rule names."""
    gen = torch.Generator().manual_seed(seed)
    store, request, table = make_store(batch, 120, page_size=4, slack_slots=slack, promote_pages=promote,
                                       device_eviction=device_eviction)
    step(store, request, Reference(batch), gen, batch, int(torch.randint(20, 100, (1,), generator=gen)))
    store.residency.complete_copies(table)
    table.scores[:] = torch.randint(0, 4, table.scores.shape, generator=gen).float()  # ties on purpose
    table.last_used[:] = torch.randint(0, 5, table.last_used.shape, generator=gen).double()
    for b in range(batch):
        n = table.num_complete(b)
        table.last_needed[b, torch.randperm(n, generator=gen)[: n // 3]] = True
        required = table.required_pages(b)
        for p in table.resident_pages(b):  # a random part of the optional pages leaves the device
            if p not in required and bool(torch.rand(1, generator=gen) < 0.5):
                table.device_pool.decref(int(table.slots[b, p]))
                table.slots[b, p] = -1
    expected = [_rebalance_reference(table, store.residency.order, b) for b in range(batch)]
    store.residency.rebalance(table, list(range(batch)))
    for b, (kept, promoted) in enumerate(expected):
        assert set(table.resident_pages(b)) == kept
        assert set(table.inflight[b]) == promoted
        assert table.slots_in_use(b) <= table.rules.slots_per_seq


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), slack=st.integers(0, 6),
       device_eviction=st.sampled_from(sorted(EVICTION_ORDERS)))
def test_batched_make_room_evicts_what_the_per_sequence_rule_names(seed, batch, slack, device_eviction):
    """Random scores (with ties), protected pages and wanted counts: the batched make_room evicts
    exactly the lowest-priority unprotected, unrequired resident pages the plain rule names."""
    gen = torch.Generator().manual_seed(seed)
    store, request, table = make_store(batch, 120, page_size=4, slack_slots=slack, device_eviction=device_eviction)
    step(store, request, Reference(batch), gen, batch, int(torch.randint(20, 100, (1,), generator=gen)))
    store.residency.complete_copies(table)
    table.scores[:] = torch.randint(0, 4, table.scores.shape, generator=gen).float()
    table.last_used[:] = torch.randint(0, 5, table.last_used.shape, generator=gen).double()
    keep = torch.rand(batch, table.max_pages, generator=gen) < 0.3
    wanted = torch.randint(0, 6, (batch,), generator=gen)
    expected = []
    for b in range(batch):  # the plain rule
        free = table.rules.slots_per_seq - table.slots_in_use(b)
        resident = set(table.resident_pages(b))
        if free >= int(wanted[b]):
            expected.append(resident)
            continue
        victims = [p for p in sorted(resident) if p not in table.required_pages(b) and not keep[b, p]]
        idx = torch.tensor(victims, dtype=torch.long)
        candidates = EvictionCandidates.of(len(victims), score=table.scores[b, idx], last_access=table.last_used[b, idx],
                                           resident=torch.ones(len(victims), dtype=torch.bool), position=idx)
        order = keep_order(store.residency.order, candidates) if victims else []
        evicted = {victims[i] for i in order[::-1][: int(wanted[b]) - free]}
        expected.append(resident - evicted)
    room = store.residency.make_room(table, list(range(batch)), keep, wanted)
    for b in range(batch):
        assert set(table.resident_pages(b)) == expected[b]
        assert room[b] == table.rules.slots_per_seq - table.slots_in_use(b)


def test_batch_lengths_follow_appends_crops_and_reorders():
    """`lengths_of` (made once per change of the lengths, read by every layer step) and the masks
    built on it follow each change: appends, a crop, a beam reorder; `mark_pages` marks in-flight pages."""
    from offload.store.page_table import mark_pages

    gen = torch.Generator().manual_seed(3)
    store, request, table = make_store(3, 120, page_size=4, slack_slots=2)
    ref = Reference(3)
    step(store, request, ref, gen, 3, 37, pad=[0, 5, 2])

    def check():
        assert table.lengths_of().tolist() == table.length
        assert table.lengths_of([2, 0]).tolist() == [table.length[2], table.length[0]]
        complete = table.complete_mask([0, 1, 2], table.max_pages)
        assert complete.sum(dim=1).tolist() == [n // 4 for n in table.length]

    check()
    step(store, request, ref, gen, 3, 1)
    check()
    store.residency.complete_copies(table)
    table.crop(1, 21)
    check()
    table.select(torch.tensor([1, 1, 0]))
    check()
    marked = mark_pages(torch.zeros(3, 5, dtype=torch.bool), [{0: 7, 6: 1}, set(), [4, 2]])
    assert marked.nonzero().tolist() == [[0, 0], [2, 2], [2, 4]]  # (page 6 is past the 5 asked for)
