"""Exact mode equals full attention: forward logits within 1e-4, identical greedy tokens."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from tests.conftest import FAMILIES, make_batch, tiny_model

LENGTHS = [1, 15, 16, 17, 300, 1000]
PAGE_SIZES = [1, 16, 64]
BUDGETS = ["min", "mid", "all"]
NEW_TOKENS = 6


def _wrap(model, page_size, budget, batch_size, max_tokens, **kw):
    om = OffloadedModel(model, page_size=page_size, prefill_chunk=128, sink_tokens=4, recent_tokens=32, **kw)
    minimum = om.minimum_device_budget(batch_size, max_tokens)
    om.config.device_budget = {"min": minimum, "mid": 3 * minimum, "all": 64 * minimum}[budget]
    return om


def _check_budget(om):
    stats = om.stats
    assert 0 < stats.device_peak_bytes <= stats.device_budget_bytes
    assert stats.device_reserved_bytes <= stats.device_budget_bytes


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_forward_logits_match(family, length, page_size, budget, batch_size):
    model = tiny_model(family)
    ids, mask = make_batch(batch_size, length)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    with _wrap(model, page_size, budget, batch_size, length) as om:
        out = om(ids, attention_mask=mask).logits
        _check_budget(om)
        if budget == "min" and length >= 300:
            stats = om.stats
            assert stats.pages_resident < stats.pages_total, "the host part must be exercised"
    real = mask.bool()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-4)


def _greedy(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_tokens_match(family, length, batch_size):
    model = tiny_model(family)
    ids, mask = make_batch(batch_size, length, seed=1)
    ref = _greedy(model, ids, mask)
    with _wrap(model, 16, "min", batch_size, length + NEW_TOKENS) as om:
        out = om.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        _check_budget(om)
        assert om.stats.tokens_generated == out.shape[0] * (out.shape[1] - length)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_tokens_match_budgets(page_size, budget):
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(3, 300, seed=2)
    ref = _greedy(model, ids, mask)
    with _wrap(model, page_size, budget, 3, 300 + NEW_TOKENS) as om:
        out = om.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        _check_budget(om)
    assert torch.equal(out, ref)


def test_beam_search_matches():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 40, seed=3)
    ref = _greedy(model, ids, mask, num_beams=3)
    with _wrap(model, 16, "min", 6, 40 + NEW_TOKENS) as om:
        out = om.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=3,
                          pad_token_id=0)
        _check_budget(om)
    assert torch.equal(out, ref)


def test_sampling_matches_with_same_seed():
    model = tiny_model("qwen2")
    ids, mask = make_batch(3, 50, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(7)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
    with _wrap(model, 16, "min", 3, 50 + NEW_TOKENS) as om:
        torch.manual_seed(7)
        out = om.generate(ids, **kwargs)
    assert torch.equal(out, ref)


def test_bf16_tokens_agree():
    """bf16: the offloaded model (fp32 accumulation) agrees with the unwrapped one on >= 99% of positions."""
    model = tiny_model("llama-gqa", torch.bfloat16)
    ids, mask = make_batch(3, 300, seed=5)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.argmax(-1)
    with _wrap(model, 16, "min", 3, 300) as om:
        out = om(ids, attention_mask=mask).logits.argmax(-1)
        _check_budget(om)
    real = mask.bool()
    agreement = (out[real] == ref[real]).float().mean().item()
    assert agreement >= 0.99, agreement


def test_sparse_with_full_token_budget_equals_exact():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(3, 300, seed=6)
    with _wrap(model, 16, "min", 3, 300 + NEW_TOKENS) as om:
        exact = om.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with _wrap(model, 16, "min", 3, 300 + NEW_TOKENS, mode="sparse", token_budget=400) as om:
        sparse = om.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        _check_budget(om)
    assert torch.equal(sparse, exact)


def test_sparse_small_budget_attends_fewer_pages_and_stays_in_budget():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(1, 600, seed=8)
    with _wrap(model, 16, "min", 1, 600 + NEW_TOKENS, mode="sparse", token_budget=64) as om:
        out = om.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        _check_budget(om)
    assert out.shape == (1, 600 + NEW_TOKENS)
