"""The remote tier through the whole model, on a local Ray session with two lenders: with the host
budget at a quarter of the KV, exact mode gives the unwrapped model's tokens whether remote pages
are pulled or attended where they live, and a lender killed mid-generation loses no token."""

from __future__ import annotations

import pytest
import ray  # the `distributed` extra, installed by `make`
import torch

from offload import OffloadedModel
from offload.store import residency
from offload.store.home import PageHome
from offload.store.remote import RemoteTier
from tests.conftest import make_batch, tiny_model

NEW = 8
PAGE = 8
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def case():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 250, seed=7)  # batch 2 with left padding
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **GREEDY)
    return model, ids, mask, ref


def _wrap(model, ids, **kw) -> OffloadedModel:
    probe = OffloadedModel(model, page_size=PAGE)
    layout = probe._store().layout
    kv = layout.num_layers * ids.shape[0] * layout.num_pages(ids.shape[1] + NEW) * layout.page_bytes
    probe.unwrap()
    om = OffloadedModel(model, page_size=PAGE, sink_tokens=8, recent_tokens=16, host_budget=kv // 4,
                        remote_lenders=2, remote_budget=2 * kv, **kw)
    om.config.device_budget = 3 * om.minimum_device_budget(ids.shape[0], ids.shape[1] + NEW)
    return om


@pytest.mark.parametrize("remote_attention", ["pull", "remote"])
def test_exact_over_two_lenders(ray_session, case, remote_attention, monkeypatch):
    model, ids, mask, ref = case
    peak = {"pages": 0}
    real = PageHome.add

    def add(self, num):
        pages = real(self, num)
        assert self.host.num_used <= self.host.max_capacity  # the host budget, at every new page
        peak["pages"] = max(peak["pages"], self.host.num_used)
        return pages

    monkeypatch.setattr(PageHome, "add", add)
    om = _wrap(model, ids, remote_attention=remote_attention)
    try:
        out = om.generate(ids, attention_mask=mask, **GREEDY)
        stats = om.stats
        on_lenders = {name: sum(t.num_on(name) for t in om.store.remote._tiers.values())
                      for name in om.store.remote.lender_handles}
    finally:
        om.unwrap()
    assert torch.equal(out, ref)
    assert stats.spilled_pages > 0 and stats.lower_bytes > 0
    assert all(n > 0 for n in on_lenders.values()), on_lenders  # both lenders hold pages
    if remote_attention == "pull":
        assert stats.wire_pull_bytes > 0 and stats.wire_attend_bytes == 0
    else:  # (pages promoted to the device or the host are still pulled)
        assert stats.wire_attend_bytes > 0 and stats.remote_attend_s > 0


def test_a_lender_killed_mid_generation_loses_no_token(ray_session, case, monkeypatch, caplog):
    model, ids, mask, ref = case
    om = _wrap(model, ids, remote_attention="remote")
    cluster = om._store().remote
    victim = next(iter(cluster.lender_handles))
    calls = {"n": 0}
    real = RemoteTier.attend

    def attend(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # a few decode steps in: the lender's process dies
            ray.kill(cluster.lender_handles[victim])
            while True:
                try:
                    ray.get(cluster.lender_handles[victim].ping.remote())
                except ray.exceptions.RayActorError:
                    break
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RemoteTier, "attend", attend)
    monkeypatch.setattr(residency, "_logged_once", set())
    try:
        with caplog.at_level("WARNING", logger="offload"):
            out = om.generate(ids, attention_mask=mask, **GREEDY)
        stats = om.stats
    finally:
        om.unwrap()
    assert calls["n"] > 6
    assert torch.equal(out, ref)
    assert stats.recomputed_pages > 0 and stats.recoveries >= 1
    assert victim in cluster.dead
    assert sum("recomputing them from their token ids" in r.getMessage() for r in caplog.records) == 1
