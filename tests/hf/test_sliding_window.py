"""Sliding-window layers far beyond their window: exact against the unwrapped model, within a
device budget sized for the window, and with the bytes a sliding layer stores bounded by it."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.hf.layers import layer_windows
from offload.store.page_table import CROP_MARGIN
from tests.conftest import make_batch
from tests.hf.families import tiny

WINDOW = 32
GREEDY = dict(do_sample=False, pad_token_id=0)


def _check_sliding_tables_bounded(om, cache, page_size):
    """Host pages a sliding layer holds never exceed its window (+ crop margin) per sequence."""
    bound = (WINDOW - 1 + CROP_MARGIN) // page_size + 2
    for layer, window in enumerate(om.store.windows):
        table = cache.request.tables[layer]
        held = (table.page_ids >= 0).sum(dim=1)
        if window is not None:
            assert int(held.max()) <= bound, (layer, held.tolist(), bound)


@pytest.mark.parametrize("family,model_class,extra", [
    ("mistral", "MistralForCausalLM", {}),  # every layer sliding
    ("gemma3_text", "Gemma3ForCausalLM",  # 2 sliding : 1 global
     {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    ("gpt_oss", "GptOssForCausalLM", {}),  # alternating, with learned sinks
])
def test_eight_windows_of_context_are_exact_in_a_window_sized_budget(family, model_class, extra):
    model = tiny(family, model_class, sliding_window=WINDOW, **extra)
    windows = layer_windows(model.config)
    assert WINDOW in windows and (family == "mistral" or None in windows)  # hybrids are hybrid
    if family == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    length, new = 8 * WINDOW, 16
    ids, mask = make_batch(2, length, seed=5)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, **GREEDY)
        logits = model(ids, attention_mask=mask).logits
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, prefill_chunk=48) as om:
        om.config.device_budget = om.minimum_device_budget(2, length + new)
        got = om(ids, attention_mask=mask)
        _check_sliding_tables_bounded(om, got.past_key_values, 8)
        out = om.generate(ids, attention_mask=mask, max_new_tokens=new, **GREEDY, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected)
        stats = om.stats
        assert stats.device_peak_bytes <= stats.device_budget_bytes
        _check_sliding_tables_bounded(om, out.past_key_values, 8)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], logits[real], rtol=0, atol=1e-4)


def test_an_all_sliding_models_budget_does_not_grow_with_the_context():
    model = tiny("mistral", "MistralForCausalLM", sliding_window=WINDOW)
    with OffloadedModel(model, page_size=8) as om:
        budgets = {n: om.minimum_device_budget(1, n) for n in (8 * WINDOW, 64 * WINDOW, 512 * WINDOW)}
    assert len(set(budgets.values())) == 1, budgets


def test_prompt_lookup_crops_within_the_window_margin():
    model = tiny("mistral", "MistralForCausalLM", sliding_window=WINDOW)
    prompt = torch.randint(3, 12, (1, 6 * WINDOW), generator=torch.Generator().manual_seed(2))  # repetitive
    kwargs = dict(max_new_tokens=30, prompt_lookup_num_tokens=6, **GREEDY)
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)
    with OffloadedModel(model, page_size=8) as om:
        assert torch.equal(om.generate(prompt, **kwargs), expected)


def test_beam_search_with_sliding_layers_matches():
    model = tiny("cohere2", "Cohere2ForCausalLM", sliding_window=WINDOW,
                 layer_types=["sliding_attention", "full_attention"])
    ids, mask = make_batch(2, 5 * WINDOW, seed=9)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, **GREEDY)
    with OffloadedModel(model, page_size=8) as om:
        assert torch.equal(om.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, **GREEDY), expected)


def test_prompt_lookup_with_a_lookahead_past_the_crop_margin_is_exact():
    """A long lookahead raises what sliding layers keep for crop, so a rejected candidate run can be undone."""
    model = tiny("mistral", "MistralForCausalLM", sliding_window=WINDOW)
    ids = torch.randint(3, 128, (1, 13), generator=torch.Generator().manual_seed(0)).repeat(1, 24)[:, :300]
    kwargs = dict(max_new_tokens=60, prompt_lookup_num_tokens=100, **GREEDY)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, prefill_chunk=48) as om:
        om.config.device_budget = 4 * om.minimum_device_budget(1, 500)
        assert torch.equal(om.generate(ids, **kwargs), expected)
