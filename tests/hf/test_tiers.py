"""Tiers below the host through the whole model: with the host budget at a quarter of the KV and
the rest on disk, exact mode gives the unwrapped model's tokens, the host never exceeds its
budget, and disk reads that fail are recomputed from token ids without changing a token."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.store import residency
from offload.store.disk import DiskTier
from offload.store.home import PageHome
from tests.conftest import make_batch, tiny_model

NEW = 10
PAGE = 8
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _kv_bytes(om, batch: int, tokens: int) -> int:
    layout = om._store().layout
    return layout.num_layers * batch * layout.num_pages(tokens) * layout.page_bytes


def _wrap(model, ids, tmp_path, host_fraction=0.25, **kw):
    """A wrapper whose host budget holds `host_fraction` of the batch's KV, the rest on disk."""
    probe = OffloadedModel(model, page_size=PAGE)
    kv = _kv_bytes(probe, ids.shape[0], ids.shape[1] + NEW)
    probe.unwrap()
    om = OffloadedModel(model, page_size=PAGE, sink_tokens=8, recent_tokens=16, disk_dir=str(tmp_path),
                        host_budget=int(kv * host_fraction), **kw)
    om.config.device_budget = 3 * om.minimum_device_budget(ids.shape[0], ids.shape[1] + NEW)
    return om


@pytest.fixture
def host_watch(monkeypatch):
    """Assert, at every new page, that no layer's host tier exceeds its budget; return the peak."""
    peak = {"bytes": 0}
    real = PageHome.add

    def add(self, num):
        pages = real(self, num)
        assert self.host.num_used <= self.host.max_capacity
        peak["bytes"] = max(peak["bytes"], self.host.used_bytes)
        return pages

    monkeypatch.setattr(PageHome, "add", add)
    return peak


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha", "qwen2"])
def test_exact_with_a_quarter_of_the_kv_on_the_host(family, tmp_path, host_watch):
    model = tiny_model(family)
    ids, mask = make_batch(2, 300, seed=3)  # batch 2, left padding; 300 is no multiple of the page
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **GREEDY)
    om = _wrap(model, ids, tmp_path)
    try:
        out = om.generate(ids, attention_mask=mask, **GREEDY)
        stats = om.stats
    finally:
        om.unwrap()
    assert torch.equal(out, ref)
    layers = om._store().layout.num_layers if om.store else 2
    assert host_watch["bytes"] * layers <= om.config.host_budget
    assert stats.spilled_pages > 0 and stats.disk_write_bytes > 0 and stats.disk_read_bytes > 0
    assert stats.lower_bytes > 0 and stats.recomputed_pages == 0


def test_sparse_mode_over_disk_matches_the_two_tier_store(tmp_path):
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 300, seed=4)
    kw = dict(mode="sparse", token_budget=64, prefetch=False)
    om = _wrap(model, ids, tmp_path, **kw)
    two_tier = OffloadedModel(model, page_size=PAGE, sink_tokens=8, recent_tokens=16,
                              device_budget=om.config.device_budget, **kw)
    try:
        want = two_tier.generate(ids, attention_mask=mask, **GREEDY)
        got = om.generate(ids, attention_mask=mask, **GREEDY)
    finally:
        two_tier.unwrap()
        om.unwrap()
    assert torch.equal(got, want)


def test_failed_disk_reads_are_recomputed_and_change_no_token(tmp_path, monkeypatch, caplog):
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 300, seed=5)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **GREEDY)
    calls = {"n": 0}

    def some_reads_fail(slots):  # in prefill, in decode, and in a recovery's own forward
        calls["n"] += 1
        if calls["n"] in (3, 4, 40, 90):
            raise OSError("injected disk read failure")

    monkeypatch.setattr(DiskTier, "fault_hook", staticmethod(some_reads_fail))
    monkeypatch.setattr(residency, "_logged_once", set())
    om = _wrap(model, ids, tmp_path)
    try:
        with caplog.at_level("WARNING", logger="offload"):
            out = om.generate(ids, attention_mask=mask, **GREEDY)
        stats = om.stats
    finally:
        om.unwrap()
    assert torch.equal(out, ref)
    assert stats.recomputed_pages > 0 and stats.recoveries > 0
    assert sum("recomputing them from their token ids" in r.getMessage() for r in caplog.records) == 1


def test_a_context_larger_than_host_and_disk_is_refused_up_front(tmp_path):
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(1, 300)
    om = _wrap(model, ids, tmp_path, disk_budget=4096)
    try:
        with pytest.raises(ValueError, match="OFFLOAD_HOST_BUDGET.*tiers below the host"):
            om.generate(ids, attention_mask=mask, **GREEDY)
    finally:
        om.unwrap()


def test_models_with_recurrent_layers_refuse_lower_tiers(tmp_path):
    from tests.hf.families import tiny

    model = tiny("jamba", "JambaForCausalLM")
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="recomputed from their token ids"):
        OffloadedModel(model, disk_dir=str(tmp_path))  # refused when wrapped, before any change
    assert model.config._attn_implementation == before
