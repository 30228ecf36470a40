"""Hybrid models: recurrent, conv and attention-free layers keep their state in the cache as
transformers' own cache does; the attention layers are offloaded; outputs are exact."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from offload import OffloadedModel
from offload.hf.layers import cache_layer_types
from tests.conftest import make_batch
from tests.hf.families import tiny

GREEDY = dict(do_sample=False, pad_token_id=0)
HYBRIDS = [
    ("jamba", "JambaForCausalLM", {}),  # mamba + attention
    ("lfm2", "Lfm2ForCausalLM", {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"]}),
    ("nemotron_h", "NemotronHForCausalLM", {}),  # mamba + attention + MLP-only layers
    ("qwen3_next", "Qwen3NextForCausalLM",  # gated delta-net + attention
     {"num_hidden_layers": 4, "layer_types": ["linear_attention", "full_attention"] * 2}),
    ("qwen3_5_text", "Qwen3_5ForCausalLM",
     {"num_hidden_layers": 4, "layer_types": ["linear_attention", "full_attention"] * 2}),
]


@pytest.mark.parametrize("family,model_class,extra", HYBRIDS)
def test_hybrid_models_are_exact_with_their_attention_offloaded(family, model_class, extra):
    model = tiny(family, model_class, **extra)
    kinds = cache_layer_types(model.config)[0]
    assert "full_attention" in kinds and any(k in ("conv", "linear_attention") for k in kinds), kinds
    ids, mask = make_batch(2, 120, seed=2)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16) as om:
        om.config.device_budget = 2 * om.minimum_device_budget(2, 130)
        for _ in range(2):  # the second time, nothing may be reused: a recurrent state needs the whole prefix
            out = om.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
            assert torch.equal(out, expected)
            assert om.stats.prefix_hit_tokens == 0
        assert om.store.layout.num_layers == sum(k == "full_attention" for k in kinds)  # only attention is stored
        assert om.stats.pages_resident < om.stats.pages_total or om.stats.pages_total == 0


def test_hybrid_multi_turn_continues_its_state():
    model = tiny("jamba", "JambaForCausalLM")
    first = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    more = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    with torch.no_grad():
        a = model.generate(first, past_key_values=DynamicCache(config=model.config), **kwargs)
        b = model.generate(torch.cat([a.sequences, more], 1), past_key_values=a.past_key_values, **kwargs)
    with OffloadedModel(model, page_size=8) as om:
        x = om.generate(first, **kwargs)
        y = om.generate(torch.cat([x.sequences, more], 1), past_key_values=x.past_key_values, **kwargs)
    assert torch.equal(x.sequences, a.sequences) and torch.equal(y.sequences, b.sequences)
