"""Attention features of current checkpoints: implemented ones are exact against the unwrapped
model; the others are refused before any token, naming the feature."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.hf.compat import UnsupportedModel
from tests.conftest import make_batch
from tests.hf.families import tiny

GREEDY = dict(do_sample=False, pad_token_id=0)


def assert_exact_with_most_pages_on_the_host(model, length, seed, **wrapper_kwargs):
    """Batch 2 with left padding: logits within 1e-4 and 12 greedy tokens identical to the
    unwrapped model, with the device holding twice its minimum (the host part is exercised)."""
    ids, mask = make_batch(2, length, seed=seed)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY)
        logits = model(ids, attention_mask=mask).logits
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, **wrapper_kwargs) as om:
        om.config.device_budget = 2 * om.minimum_device_budget(2, length + 12)
        got = om(ids, attention_mask=mask).logits
        assert om.stats.pages_resident < om.stats.pages_total
        assert torch.equal(om.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY), expected)
    real = mask.bool()
    torch.testing.assert_close(got[real], logits[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("prefetch", [False, True])
def test_learned_attention_sinks_are_exact(prefetch):
    model = tiny("gpt_oss", "GptOssForCausalLM", sliding_window=4096)  # the window raised past the context
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that matter
    assert_exact_with_most_pages_on_the_host(model, 150, seed=3, prefetch=prefetch)


@pytest.mark.parametrize("cpu_kernel", ["torch", "auto"])
def test_attention_logit_soft_capping_is_exact(cpu_kernel):
    """Gemma 2 with soft-capping that matters (1.0), its sliding layers past their window too."""
    model = tiny("gemma2", "Gemma2ForCausalLM", attn_logit_softcapping=1.0, sliding_window=64)
    assert_exact_with_most_pages_on_the_host(model, 200, seed=6, cpu_kernel=cpu_kernel)


@pytest.mark.parametrize("length", [40, 300])  # within one chunk, and across five
def test_chunked_attention_is_exact(length):
    model = tiny("llama4_text", "Llama4ForCausalLM", attention_chunk_size=64)
    ids, mask = make_batch(2, length, seed=4)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
        logits = model(ids, attention_mask=mask).logits
    with OffloadedModel(model, page_size=8, prefill_chunk=48) as om:
        om.config.device_budget = om.minimum_device_budget(2, length + 10)  # chunk-sized for chunked layers
        got = om(ids, attention_mask=mask)
        assert torch.equal(om.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY), expected)
        held = (got.past_key_values.request.tables[0].page_ids >= 0).sum(dim=1)
        assert int(held.max()) <= (64 + 64) // 8 + 2  # the chunk and the crop margin, whatever the context
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], logits[real], rtol=0, atol=1e-4)


def test_the_wrap_probe_refuses_a_divergence_the_config_does_not_declare():
    model = tiny("llama", "LlamaForCausalLM")

    def differs_under_offload(module, args, kwargs):
        # Stands in for an attention modifier offload does not know: it acts only when offload attends.
        if module.config._attn_implementation == "offload":
            kwargs["hidden_states"] = kwargs["hidden_states"] * 1.5
        return args, kwargs

    hook = model.model.layers[1].self_attn.register_forward_pre_hook(differs_under_offload, with_kwargs=True)
    try:
        with pytest.raises(UnsupportedModel, match="differ from the model's own"):
            OffloadedModel(model)
    finally:
        hook.remove()
    assert model.config._attn_implementation != "offload"
    OffloadedModel(model).unwrap()  # without the modifier it wraps


@pytest.mark.parametrize("family,model_class", [("deepseek_v3", "DeepseekV3ForCausalLM"),
                                                ("deepseek_v2", "DeepseekV2ForCausalLM")])
def test_multi_head_latent_attention_is_exact(family, model_class):
    """Keys (nope + rope) and values of different head sizes: the store keeps them padded to one size."""
    model = tiny(family, model_class, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                 num_key_value_heads=4)  # keys 24, values 12
    from offload.hf.layers import layout_from_model_config

    text = model.config
    layout = layout_from_model_config(text, 8, torch.float32)
    assert text.qk_nope_head_dim + text.qk_rope_head_dim != text.v_head_dim
    assert layout.num_kv_heads == text.num_attention_heads
    assert layout.head_dim == max(text.qk_nope_head_dim + text.qk_rope_head_dim, text.v_head_dim)
    assert_exact_with_most_pages_on_the_host(model, 150, seed=8)


@pytest.mark.parametrize("layer_types", [
    ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],  # windows past the context
    ["full_attention"] * 4,
])
def test_cross_layer_kv_sharing_keeps_one_copy_and_is_exact(layer_types):
    """Gemma 3n: the last two layers read the KV of the last earlier layer of their type."""
    model = tiny("gemma3n_text", "Gemma3nForCausalLM", num_hidden_layers=4, num_kv_shared_layers=2,
                 layer_types=layer_types, sliding_window=32)
    assert model.config.kv_sharing_modes[2:] == ["reuse", "reuse"]
    with OffloadedModel(model, page_size=8) as om:
        assert om._store().layout.num_layers == 2  # the readers store nothing
    assert_exact_with_most_pages_on_the_host(model, 150, seed=9, prefill_chunk=48)
