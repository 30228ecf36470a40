"""Prefetch through the whole model: exact with it on or off, exact under injected failures."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.store import residency, tiers
from offload.store.transfer import TransferEngine
from tests.conftest import make_batch, tiny_model

NEW = 12


def _run(model, ids, mask, **kw):
    # No stickiness: random weights give bounds so close that any margin freezes the selection,
    # and these tests need speculative copies to happen.
    kw.setdefault("sticky_margin", 0.0)
    om = OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, token_budget=64, **kw)
    om.config.device_budget = 3 * om.minimum_device_budget(ids.shape[0], ids.shape[1] + NEW)
    try:
        out = om.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return out, om.stats
    finally:
        om.unwrap()


@pytest.fixture(scope="module")
def case():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 400, seed=11)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return model, ids, mask, ref


@pytest.mark.parametrize("prefetch", [False, True])
def test_exact_with_and_without_prefetch(case, prefetch):
    model, ids, mask, ref = case
    out, stats = _run(model, ids, mask, prefetch=prefetch, emulate_link_gbps=2.0)
    assert torch.equal(out, ref)
    assert stats.device_peak_bytes <= stats.device_budget_bytes
    assert stats.needed_pages > 0
    if prefetch:
        assert stats.prefetch_issued_pages > 0
        assert 0.0 < stats.prefetch_recall <= 1.0 and 0.0 < stats.prefetch_precision <= 1.0
    else:
        assert stats.prefetch_issued_pages == 0
    assert 0.0 < stats.mass_coverage <= 1.0 + 1e-6


def test_injected_copy_failures_keep_exact_outputs(case, monkeypatch, caplog):
    model, ids, mask, ref = case
    calls = {"n": 0}

    def every_other_copy_fails(batch):
        calls["n"] += 1
        if calls["n"] % 2:
            raise OSError("injected copy failure")

    monkeypatch.setattr(TransferEngine, "fault_hook", staticmethod(every_other_copy_fails))
    monkeypatch.setattr(residency, "_logged_once", set())
    with caplog.at_level("WARNING", logger="offload"):
        out, stats = _run(model, ids, mask, prefetch=True)
    assert torch.equal(out, ref)
    assert stats.failed_copies > 0
    messages = [r.getMessage() for r in caplog.records if "copy failed" in r.getMessage()]
    assert len(messages) == 1 and "injected copy failure" in messages[0]  # logged once, with its cause


def test_injected_kernel_failure_keeps_exact_outputs(case, monkeypatch, caplog):
    model, ids, mask, ref = case
    real = tiers.paged_attention

    def failing_fast_kernel(*args, **kwargs):
        if kwargs.get("kernel") != "torch":
            raise RuntimeError("injected kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiers, "paged_attention", failing_fast_kernel)
    monkeypatch.setattr(residency, "_logged_once", set())
    with caplog.at_level("WARNING", logger="offload"):
        out, stats = _run(model, ids, mask, prefetch=True, cpu_kernel="numba")
    assert torch.equal(out, ref)
    assert stats.failed_kernels > 0
    assert sum("kernel failed" in r.getMessage() for r in caplog.records) == 1


def test_sparse_skip_counts_skipped_pages(case):
    model, ids, mask, _ = case
    out, stats = _run(model, ids, mask, mode="sparse", sparse_misses="skip", prefetch=False)
    assert out.shape[1] == ids.shape[1] + NEW or out.shape[1] < ids.shape[1] + NEW
    assert stats.skipped_pages > 0
    assert stats.mass_coverage == pytest.approx(1.0, abs=1e-5)  # nothing read on the host


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_by_default_only_sparse_mode_speculates(case, mode):
    model, ids, mask, ref = case
    out, stats = _run(model, ids, mask, mode=mode)  # prefetch left at its default
    if mode == "exact":
        assert torch.equal(out, ref)
        assert stats.prefetch_issued_pages == 0
    else:
        assert stats.prefetch_issued_pages > 0


def test_stats_report_the_achieved_link_bandwidth(case):
    model, ids, mask, _ = case
    _, stats = _run(model, ids, mask, prefetch=True, emulate_link_gbps=2.0)
    assert stats.link_s > 0
    assert 0 < stats.link_gbps <= 2.0 + 1e-6  # never above the emulated link (a copy waits bytes / bandwidth)
    assert "GB/s achieved" in str(stats) and stats.as_dict()["link_gbps"] == stats.link_gbps
    # Per direction, never above the emulated link either; every transfer counted, coalesced runs of pages.
    assert 0 < stats.h2d_gbps <= 2.0 + 1e-6 and 0 < stats.d2h_gbps <= 2.0 + 1e-6
    assert stats.link_s == pytest.approx(stats.h2d_link_s + stats.d2h_link_s)
    assert stats.h2d_transfers > 0 and stats.d2h_transfers > 0
    assert stats.bytes_per_transfer == (stats.h2d_bytes + stats.d2h_bytes) / stats.transfers
    assert stats.as_dict()["bytes_per_transfer"] == stats.bytes_per_transfer


def test_injected_home_copy_failures_keep_exact_outputs(case, monkeypatch):
    model, ids, mask, ref = case
    calls = {"n": 0}

    def every_third_home_copy_fails(copy):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise OSError("injected home copy failure")

    monkeypatch.setattr(TransferEngine, "home_fault_hook", staticmethod(every_third_home_copy_fails))
    out, stats = _run(model, ids, mask, prefetch=True)
    assert torch.equal(out, ref)
    assert stats.failed_home_copies > 0
