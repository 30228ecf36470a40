"""LayerStore on plain tensors against a naive reference, with exact state assertions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import OffloadConfig
from offload.store.layout import KVLayout
from offload.store.tiered import TieredStore, min_slots_per_seq
from tests.reference import naive_attention

H, HKV, D = 4, 2, 8


def _store(batch, max_tokens, page_size=4, slack_slots=0, **cfg):
    config = OffloadConfig.from_env({}, page_size=page_size, sink_tokens=cfg.pop("sink_tokens", 4),
                                    recent_tokens=cfg.pop("recent_tokens", 8), cpu_kernel="torch", **cfg)
    layout = KVLayout(1, HKV, D, page_size, torch.float32)
    slots = min_slots_per_seq(config, max_tokens) + slack_slots
    summaries = batch * layout.num_pages(max_tokens) * layout.summary_bytes
    config.device_budget = summaries + batch * slots * layout.page_bytes
    store = TieredStore(config, layout)
    store.reserve(batch, max_tokens, "cpu")
    return store


class Reference:
    """Every token ever stored, per sequence, for naive attention."""

    def __init__(self, batch):
        self.keys = [torch.zeros(HKV, 0, D) for _ in range(batch)]
        self.values = [torch.zeros(HKV, 0, D) for _ in range(batch)]

    def attend(self, query, keys, values, valid, scale):
        out = torch.zeros(query.shape, dtype=torch.float64)
        for b in range(query.shape[0]):
            k_new, v_new = keys[b][:, valid[b]], values[b][:, valid[b]]
            old = self.keys[b].shape[1]
            k = torch.cat([self.keys[b], k_new], dim=1)
            v = torch.cat([self.values[b], v_new], dim=1)
            q_rows = valid[b].nonzero().flatten()
            visible = torch.arange(k.shape[1])[None, :] <= (old + torch.arange(len(q_rows)))[:, None]
            if len(q_rows):
                res = naive_attention(query[b : b + 1, :, q_rows], k[None], v[None], visible[None], scale)
                out[b, :, q_rows] = res[0]
            self.keys[b], self.values[b] = k, v
        return out


def _step(store, ref, gen, batch, n_new, pad=None):
    query = torch.randn(batch, H, n_new, D, generator=gen)
    keys = torch.randn(batch, HKV, n_new, D, generator=gen)
    values = torch.randn(batch, HKV, n_new, D, generator=gen)
    valid = torch.ones(batch, n_new, dtype=torch.bool)
    if pad is not None:
        for b, p in enumerate(pad):
            valid[b, :p] = False
    expected = ref.attend(query, keys, values, valid, 0.35)
    out = store.layers[0].attend(query, keys, values, valid, 0.35)
    store.track_peak()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert store.device_used_bytes() <= store.config.device_budget
    assert store.device_peak_bytes <= store.config.device_budget


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
    store = _store(batch, sum(steps) + 1, page_size, slack, **extra)
    ref = Reference(batch)
    pad = [min(steps[0] - 1, b * 2) for b in range(batch)]  # left padding in the first chunk
    for i, n in enumerate(steps):
        _step(store, ref, gen, batch, n, pad if i == 0 else None)
    layer = store.layers[0]
    for b in range(batch):
        assert layer.length[b] == ref.keys[b].shape[1]
        # Every complete page has a home copy; the host copy equals the stored tokens.
        n = layer.num_complete(b)
        ids = layer.host_ids[b, :n]
        assert bool((ids >= 0).all())
        host_k = layer.host_pool.keys[ids].reshape(-1, HKV, D).transpose(0, 1)
        torch.testing.assert_close(host_k, ref.keys[b][:, : n * page_size])
        assert layer.required_pages(b) <= set(layer.resident_pages(b))
        assert layer.slots_in_use(b) <= layer.rules.slots_per_seq


def test_eviction_keeps_required_and_highest_scores_exactly():
    store = _store(1, 64, page_size=4, slack_slots=2, sink_tokens=4, recent_tokens=4)
    layer = store.layers[0]
    gen = torch.Generator().manual_seed(0)
    ref = Reference(1)
    _step(store, ref, gen, 1, 40)  # 10 complete pages; required: sink page 0 and recent page 9
    layer.scores.zero_()
    layer.scores[0, 3], layer.scores[0, 6], layer.scores[0, 5] = 5.0, 4.0, 4.0
    layer._rebalance(0, {})
    # 2 slack slots: the top scores 3, then 6 (ties go to the newer page), promoted from the host,
    # asynchronously: in flight (slots held) until completed.
    assert sorted(layer.inflight[0]) == [3, 6] and layer.resident_pages(0) == [0, 9]
    assert layer.slots_in_use(0) == 5
    layer.finish_inflight()
    assert layer.resident_pages(0) == [0, 3, 6, 9] and layer.inflight[0] == {}
    assert store.transfer.counters.h2d_pages == 2


def test_select_shares_pages_and_copies_tails():
    store = _store(2, 32, page_size=4, slack_slots=1)
    layer = store.layers[0]
    gen = torch.Generator().manual_seed(1)
    ref = Reference(2)
    _step(store, ref, gen, 2, 10)
    host_before = layer.host_pool.num_used
    layer.select(torch.tensor([1, 1]))
    assert layer.host_pool.num_used == host_before // 2  # sequence 0's pages are gone, 1's are shared
    for b in range(2):
        assert layer.host_ids[0, b] == layer.host_ids[1, b]
    assert layer.tail_slot[0] != layer.tail_slot[1]
    torch.testing.assert_close(layer.device_pool.keys[layer.tail_slot[0]], layer.device_pool.keys[layer.tail_slot[1]])
    ref.keys = [ref.keys[1], ref.keys[1]]
    ref.values = [ref.values[1], ref.values[1]]
    _step(store, ref, gen, 2, 3)
    layer.release()
    assert layer.host_pool.num_used == 0 and layer.device_pool.num_used == 0


def test_default_token_budget_is_what_the_device_holds():
    store = _store(2, 64, page_size=4, slack_slots=3)  # token_budget left at its default (None)
    rules = store.layers[0].rules
    assert store.config.token_budget is None
    assert rules.token_budget == (rules.slots_per_seq - 1) * 4
