"""The query predictor mirrors each family's query computation: predicting layer l from layer l's
own input gives exactly the query layer l's attention receives (partial rotary, q-norms, half-width
rotary included); a layout it cannot mirror disables prediction without touching outputs."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.hf import attention as hf_attention
from tests.hf.families import tiny

CASES = [
    ("llama", "LlamaForCausalLM", {}),
    ("qwen3", "Qwen3ForCausalLM", {}),  # per-head q_norm
    ("olmoe", "OlmoeForCausalLM", {}),  # q_norm over the whole projection
    ("phi", "PhiForCausalLM", {}),  # partial rotary
    ("stablelm", "StableLmForCausalLM", {}),  # partial rotary
    ("gpt_oss", "GptOssForCausalLM", {"sliding_window": 4096}),  # half-width cos in its own rotary
]


@pytest.mark.parametrize("family,model_class,overrides", CASES)
def test_prediction_from_a_layers_own_input_is_its_query(family, model_class, overrides, monkeypatch):
    model = tiny(family, model_class, **overrides)
    queries = {}
    real = hf_attention.offload_attention

    def recording(module, query, *args, **kwargs):
        queries[module.layer_idx] = query.detach().clone()
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "offload_attention", recording)
    from transformers import AttentionInterface

    with OffloadedModel(model, page_size=4) as om:
        AttentionInterface.register(hf_attention.ATTN_NAME, recording)
        ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
        out = om(ids)
        om(ids[:, :1], past_key_values=out.past_key_values)  # a decode step: inputs are captured
        for layer in range(model.config.num_hidden_layers):
            predicted = om._predictor.predict(layer, layer, after_attention=False)
            assert om._predictor.failed is None
            torch.testing.assert_close(predicted, queries[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,model_class,module", [
    ("llama", "LlamaForCausalLM", "post_attention_layernorm"),
    ("gemma2", "Gemma2ForCausalLM", "pre_feedforward_layernorm"),  # its post-attention norm acts on attention's output
])
def test_the_residual_after_attention_is_captured_where_the_mlp_branch_starts(family, model_class, module):
    model = tiny(family, model_class)
    inputs, outputs = {}, {}
    hooks = []
    for idx, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, idx=idx: inputs.__setitem__(idx, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        hooks.append(getattr(layer, module).register_forward_pre_hook(lambda m, a, idx=idx: outputs.__setitem__(idx, a[0].clone())))
    with OffloadedModel(model, page_size=4) as om:
        ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
        out = om(ids)
        om(ids[:, :1], past_key_values=out.past_key_values)
        captured = om._layer_inputs
        assert captured.has_after
        for idx in range(model.config.num_hidden_layers):
            torch.testing.assert_close(captured.after[idx], outputs[idx])
            assert not torch.equal(captured.after[idx], inputs[idx])  # (attention changed the residual)
    for hook in hooks:
        hook.remove()


def test_a_norm_that_runs_before_attention_is_not_taken_for_the_residual_after_it():
    # A parallel-residual layer normalises its input for the MLP beside attention: that is not the
    # residual after attention, and capturing stops for good (prediction falls back to inputs).
    model = tiny("llama", "LlamaForCausalLM")
    for layer in model.model.layers:
        original = type(layer).forward

        def parallel(self, hidden_states, *args, _original=original, **kwargs):
            self.post_attention_layernorm(hidden_states)  # before attention, as a parallel block would
            return _original(self, hidden_states, *args, **kwargs)

        layer.forward = parallel.__get__(layer)
    with OffloadedModel(model, page_size=4) as om:
        ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
        out = om(ids)
        om(ids[:, :1], past_key_values=out.past_key_values)
        assert not om._layer_inputs.has_after and not om._predictor.after_attention
        assert om._predictor.predict(0, 1) is not None  # from the layer input instead


def test_a_layout_the_predictor_cannot_mirror_disables_prediction_only(caplog):
    model = tiny("llama", "LlamaForCausalLM")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with OffloadedModel(model, page_size=4, sink_tokens=4, recent_tokens=8, token_budget=16, prefetch=True) as om:
        om.config.device_budget = 2 * om.minimum_device_budget(1, 46)
        om._predictor.layers = [None] * len(om._predictor.layers)  # nothing it can call
        with caplog.at_level("WARNING", logger="offload"):
            out = om.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert om._predictor.failed is not None
    assert torch.equal(out, expected)
    assert sum("query prediction failed" in r.getMessage() for r in caplog.records) == 1
