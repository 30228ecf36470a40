"""Wrapping is reversible; misuse gives clear errors before any token is generated."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from offload import OffloadedModel
from tests.conftest import make_batch, tiny_model


def test_unwrap_restores_model_and_registries():
    model = tiny_model("llama-gqa")
    before = model.config._attn_implementation
    ids, mask = make_batch(1, 20)
    with torch.no_grad():
        ref = model(ids).logits
    with OffloadedModel(model) as om:
        assert model.config._attn_implementation == "offload"
        assert "offload" in AttentionInterface._global_mapping
        assert "offload" in AttentionMaskInterface._global_mapping
        om(ids)
    assert model.config._attn_implementation == before
    assert "offload" not in AttentionInterface._global_mapping
    assert "offload" not in AttentionMaskInterface._global_mapping
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_two_wrappers_keep_registration_until_the_last_unwraps():
    a, b = OffloadedModel(tiny_model("llama-gqa")), OffloadedModel(tiny_model("qwen2"))
    a.unwrap()
    assert "offload" in AttentionInterface._global_mapping
    b.unwrap()
    assert "offload" not in AttentionInterface._global_mapping


def test_unwrapped_wrapper_refuses_to_run():
    om = OffloadedModel(tiny_model("llama-gqa"))
    om.unwrap()
    with pytest.raises(RuntimeError, match="unwrapped"):
        om(torch.ones(1, 4, dtype=torch.long))


def test_too_small_device_budget_fails_before_generation():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(3, 200)
    calls = []
    with OffloadedModel(model, device_budget="4KiB") as om:  # (wrapping probes the model once)
        hook = model.register_forward_hook(lambda *a: calls.append(1))
        try:
            with pytest.raises(ValueError, match="OFFLOAD_DEVICE_BUDGET"):
                om.generate(ids, attention_mask=mask, max_new_tokens=4)
        finally:
            hook.remove()
    assert calls == []


def test_minimum_budget_is_accepted_and_one_byte_less_is_not():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 100)
    with OffloadedModel(model) as om:
        minimum = om.minimum_device_budget(2, 104)
        om.config.device_budget = minimum - 1
        with pytest.raises(ValueError, match=str(minimum)):
            om.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
        om.config.device_budget = minimum
        om.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
        assert om.stats.device_peak_bytes <= minimum


def test_host_budget_too_small_names_the_variable():
    with OffloadedModel(tiny_model("llama-gqa"), host_budget="1KiB") as om:
        with pytest.raises(ValueError, match="OFFLOAD_HOST_BUDGET"):
            om(torch.ones(1, 64, dtype=torch.long))


def test_right_padding_is_rejected():
    ids, mask = make_batch(2, 20)
    mask[0, -3:] = 0
    with OffloadedModel(tiny_model("llama-gqa")) as om:
        with pytest.raises(ValueError, match="left padding"):
            om(ids, attention_mask=mask)


def test_sliding_window_beyond_the_window_is_exact():
    import transformers

    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        expected = model(ids).logits
    with OffloadedModel(model, page_size=4) as om:
        torch.testing.assert_close(om(ids).logits, expected, rtol=0, atol=1e-4)


def test_forward_one_token_and_stats_string():
    with OffloadedModel(tiny_model("llama-gqa")) as om:
        out = om(torch.ones(1, 1, dtype=torch.long))
        assert out.logits.shape == (1, 1, 128)
        text = str(om.stats)
    assert "device tier" in text and "budget" in text


def test_from_pretrained_splits_config_and_model_kwargs(tmp_path):
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path)
    om = OffloadedModel.from_pretrained(str(tmp_path), page_size=8, dtype=torch.float32)
    try:
        assert om.config.page_size == 8
        ids, _ = make_batch(1, 30)
        with torch.no_grad():
            ref = model(ids).logits
        torch.testing.assert_close(om(ids).logits, ref, rtol=0, atol=1e-4)
    finally:
        om.unwrap()
