"""`kv_sharing=`: consumer layers attend their producer's stored KV, exactly as a transformers forward
that hands them the producer's K/V does; the store holds one copy per KV layer; bad maps are refused."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig, OffloadedModel
from offload.crosslayer.reference import shared_kv_attention
from offload.crosslayer.sharing import format_sharing, kv_layers, parse_sharing
from tests.conftest import make_batch
from tests.crosslayer.conftest import tiny_llama, token_ids
from tests.hf.families import tiny

GREEDY = dict(do_sample=False, pad_token_id=0)
SHARING = {1: 0, 3: 0}  # two consumers of one producer; layer 2 keeps its own


def _exact_against_reference(model, sharing, length, new_tokens=8, seed=5, **wrapper):
    """Batch 2, left padding, most pages on the host: logits within 1e-4 and greedy tokens identical
    to the unwrapped model run with the reference substitution."""
    ids, mask = make_batch(2, length, seed=seed)
    with torch.no_grad(), shared_kv_attention(model, sharing):
        logits = model(ids, attention_mask=mask).logits
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GREEDY)
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, kv_sharing=sharing, **wrapper) as om:
        om.config.device_budget = 2 * om.minimum_device_budget(2, length + new_tokens)
        got = om(ids, attention_mask=mask).logits
        assert om.stats.pages_resident < om.stats.pages_total  # the host part ran
        assert torch.equal(om.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GREEDY), expected)
    real = mask.bool()
    torch.testing.assert_close(got[real], logits[real], rtol=0, atol=1e-4)


def test_sharing_is_exact_against_the_reference_forward():
    model = tiny_llama()
    with torch.no_grad():  # the map really changes the model: the reference is not the model itself
        plain = model(token_ids(1, 40)).logits
        with shared_kv_attention(model, SHARING):
            shared = model(token_ids(1, 40)).logits
    assert (plain - shared).abs().max() > 1e-2
    _exact_against_reference(model, SHARING, 90, prefill_chunk=32)


def test_sharing_between_sliding_window_layers_is_exact():
    """Gemma 3: sliding layers past their window read a sliding producer, full ones a full one."""
    model = tiny("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=4, sliding_window=32,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"])
    _exact_against_reference(model, {1: 0, 3: 2}, 72, prefill_chunk=48)


def test_the_store_holds_one_copy_per_kv_layer():
    """Host bytes (home copies), the request's KV bytes and the device peak all scale with the number of
    KV layers: 2 of 4 here, so exactly half the unshared model's."""
    model = tiny_llama()
    ids = token_ids(1, 64)  # whole pages
    measured = {}
    for sharing in (None, SHARING):
        with OffloadedModel(model, page_size=16, device_budget="64MiB", prefix_cache=False, kv_sharing=sharing) as om:
            cache = om.new_cache(1, 64)
            om(ids, past_key_values=cache)
            stats = cache.stats()
            measured[bool(sharing)] = (om.store.layout.num_layers, om.store.host_used_bytes(), stats.kv_bytes,
                                       stats.device_peak_bytes)
            page_bytes = om.store.layout.page_bytes
            cache.release()
    layers, host, kv, device = measured[True]
    assert layers == len(kv_layers(4, SHARING)) == 2
    assert host == kv == layers * (64 // 16) * page_bytes
    assert measured[False][1:3] == (2 * host, 2 * kv)
    assert measured[False][3] == 2 * device > 0


@torch.inference_mode()
def test_consumers_attention_mass_joins_the_producers_page_scores():
    """A decode step: the producer's scores decay once and gain its own mass and each consumer's
    (every observed row's mass sums to one per query head), so residency serves every reader."""
    model = tiny_llama()
    with OffloadedModel(model, page_size=8, device_budget="64MiB", prefix_cache=False, kv_sharing=SHARING) as om:
        cache = om.new_cache(1, 64)
        ids = token_ids(1, 41)
        om(ids[:, :40], past_key_values=cache)
        scorer, calls = om.store.scorer, []
        update, add_readers = scorer.update, scorer.add_readers
        scorer.update = lambda scores, mass: calls.append(("own", mass.clone())) or update(scores, mass)
        scorer.add_readers = lambda scores, mass: calls.append(("reader", mass.clone())) or add_readers(scores, mass)
        table = cache.request.tables[0]
        before = table.scores.clone()
        om(ids[:, 40:], past_key_values=cache)
        del scorer.update, scorer.add_readers
        # layer 0 stores (its own update), layers 1 and 3 read it, layer 2 keeps its own KV
        assert [kind for kind, _ in calls] == ["own", "reader", "own", "reader"]
        own, first, _, second = (mass for _, mass in calls)
        heads = model.config.num_attention_heads
        for reader in (first, second):
            assert reader.sum().item() == pytest.approx(heads, abs=1e-4)
        torch.testing.assert_close(table.scores, before * scorer.decay + own + first + second)
        cache.release()


def test_a_shared_model_still_passes_the_probe_and_says_it_approximates(caplog):
    with caplog.at_level("WARNING", logger="offload"):
        OffloadedModel(tiny_llama(), kv_sharing="1:0").unwrap()
    assert any("approximation" in r.getMessage() and "kv_sharing" in r.getMessage() for r in caplog.records)


def test_env_var_sets_the_map():
    config = OffloadConfig.from_env({"OFFLOAD_KV_SHARING": " 3:2, 1:0 "})
    assert config.kv_sharing == {1: 0, 3: 2}
    assert format_sharing(config.kv_sharing) == "1:0,3:2"
    assert OffloadConfig.from_env({"OFFLOAD_KV_SHARING": "3:1"}, kv_sharing={2: 0}).kv_sharing == {2: 0}
    assert OffloadConfig(kv_sharing={}).kv_sharing is None and OffloadConfig(kv_sharing="").kv_sharing is None


@pytest.mark.parametrize("value, message", [
    ("1:1", "must be an earlier layer"),
    ({2: 3}, "must be an earlier layer"),
    ("1:0,1:0", "two producers"),
    ("2:1,1:0", "write 2:0"),
    ({1: True}, "not a layer index"),
    ({"1": 0}, "not a layer index"),
    ("1-0", "not a pair of layer indices"),
    (3, "not a sharing map"),
])
def test_bad_maps_are_refused_naming_the_setting(value, message):
    with pytest.raises(ValueError, match=message) as err:
        OffloadConfig(kv_sharing=value)
    assert "kv_sharing (OFFLOAD_KV_SHARING)" in str(err.value)


@pytest.mark.parametrize("sharing, message", [
    ("7:0", "has 4 decoder layers"),
    ("2:1", "same kind"),  # layer 2 is full attention, layer 1 sliding
])
def test_maps_the_model_cannot_run_are_refused_when_wrapping(sharing, message):
    model = tiny("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=4, sliding_window=32,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"])
    with pytest.raises(ValueError, match=message):
        OffloadedModel(model, kv_sharing=sharing)
    assert model.config._attn_implementation != "offload"


def test_a_model_that_declares_sharing_refuses_a_configured_map():
    model = tiny("gemma3n_text", "Gemma3nForCausalLM", num_hidden_layers=4, num_kv_shared_layers=2,
                 layer_types=["full_attention"] * 4)
    with pytest.raises(ValueError, match="declares its own cross-layer KV sharing"):
        OffloadedModel(model, kv_sharing="1:0")


def test_parse_sharing_sorts_and_accepts_dicts():
    assert parse_sharing({3: 0, 1: 0}) == {1: 0, 3: 0}
    assert list(parse_sharing("3:0,1:0")) == [1, 3]
    assert parse_sharing(None) is None
