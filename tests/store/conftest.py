"""Store tests on plain tensors: a one-layer `KVStore`, a naive reference, and a step helper."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig
from offload.store.budget import min_slots_per_seq
from offload.store.kv_store import KVStore
from offload.store.layout import KVLayout
from tests.reference import naive_attention

H, HKV, D = 4, 2, 8
SCALE = 0.35


@pytest.fixture(autouse=True, scope="module")
def _inference_mode():
    """The runtime runs under inference mode (its tensors can only be changed under it); so do these tests."""
    with torch.inference_mode():
        yield


def make_store(batch, max_tokens, page_size=4, slack_slots=0, num_layers=1, **cfg):
    """A store whose device budget holds exactly sinks + recent + tail (+ `slack_slots`) per
    sequence, and an open request of `batch` sequences. Returns (store, request, table of layer 0)."""
    cfg.setdefault("prefix_cache", False)
    config = OffloadConfig.from_env({}, page_size=page_size, sink_tokens=cfg.pop("sink_tokens", 4),
                                    recent_tokens=cfg.pop("recent_tokens", 8), cpu_kernel="torch", **cfg)
    layout = KVLayout(num_layers, HKV, D, page_size, torch.float32)
    slots = min_slots_per_seq(config, max_tokens) + slack_slots
    summaries = batch * layout.num_pages(max_tokens) * layout.summary_bytes
    config.device_budget = num_layers * (summaries + batch * slots * layout.page_bytes)
    store = KVStore(config, layout, "cpu")
    request, _ = store.open(batch, max_tokens)
    return store, request, request.tables[0]


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

    def crop(self, b, length):
        self.keys[b], self.values[b] = self.keys[b][:, :length], self.values[b][:, :length]


def step(store, request, ref, gen, batch, n_new, pad=None, layer=0):
    """One attend of `n_new` random tokens, checked against the reference and the budget."""
    query = torch.randn(batch, H, n_new, D, generator=gen)
    keys = torch.randn(batch, HKV, n_new, D, generator=gen)
    values = torch.randn(batch, HKV, n_new, D, generator=gen)
    valid = torch.ones(batch, n_new, dtype=torch.bool)
    if pad is not None:
        for b, p in enumerate(pad):
            valid[b, :p] = False
    expected = ref.attend(query, keys, values, valid, SCALE)
    out = store.attend(request, layer, query, keys, values, valid, SCALE)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert request.device_used_bytes() <= store.config.device_budget
    assert request.device_peak_bytes <= store.config.device_budget
    return out
