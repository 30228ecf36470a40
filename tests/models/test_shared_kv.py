"""`offload.models.shared_kv`: the cross-layer sharing framework's maps, the model's two ways of
computing (iterative prompt, one token at a time) against each other, and OffloadedModel running
the bottom configurations exactly with one stored copy per KV layer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from offload import OffloadedModel
from offload.models.shared_kv import (
    PARTITIONS,
    TARGETS,
    SharedKVLlamaConfig,
    SharedKVLlamaForCausalLM,
    framework_map,
    parse_configuration,
)
from tests.conftest import make_batch

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GREEDY = dict(do_sample=False, pad_token_id=0)
CONFIGURATIONS = [f"{p}-{t}" for p in PARTITIONS for t in TARGETS]


def model_for(name: str | None, kv_layers: int = 3, seed: int = 0, **config) -> SharedKVLlamaForCausalLM:
    torch.manual_seed(seed)
    sources = None if name is None else framework_map(6, *parse_configuration(name), kv_layers)
    return SharedKVLlamaForCausalLM(SharedKVLlamaConfig(**SMALL, kv_source_layers=sources, **config)).eval()


@pytest.mark.parametrize("partition, target, layers, kv, expected", [
    ("pizza", "bottom", 6, 3, [0, 1, 2, 2, 2, 2]),
    ("pizza", "top", 6, 3, [0, 1, 5, 5, 5, 5]),
    ("pizza", "middle", 6, 3, [0, 1, 3, 3, 3, 3]),
    ("sandwich", "bottom", 6, 3, [0, 1, 1, 1, 1, 5]),
    ("sandwich", "top", 6, 3, [0, 4, 4, 4, 4, 5]),
    ("sandwich", "middle", 6, 3, [0, 2, 2, 2, 2, 5]),
    ("lasagna", "bottom", 6, 3, [0, 0, 2, 2, 4, 4]),
    ("lasagna", "top", 6, 3, [1, 1, 3, 3, 5, 5]),
    ("lasagna", "middle", 6, 3, [0, 0, 2, 2, 4, 4]),  # pairs have no middle: the lower one
    ("lasagna", "middle", 8, 2, [1, 1, 1, 1, 5, 5, 5, 5]),
    ("lasagna", "top", 7, 3, [2, 2, 2, 4, 4, 6, 6]),  # uneven: the larger groups first
    ("sandwich", "top", 8, 4, [0, 1, 6, 6, 6, 6, 6, 7]),  # two layers below the group, one above
    ("sandwich", "middle", 22, 3, [0] + [10] * 20 + [21]),  # LCKV's README: the sandwich-middle map
    ("pizza", "bottom", 6, 6, list(range(6))),  # as many KV layers as layers: the standard model
])
def test_framework_maps(partition, target, layers, kv, expected):
    assert framework_map(layers, partition, target, kv) == expected


@pytest.mark.parametrize("args, message", [
    ((6, "pita", "top", 3), "partition='pita'"),
    ((6, "pizza", "left", 3), "target='left'"),
    ((6, "pizza", "top", 0), "kv_layers=0 with 6 layers"),
    ((6, "pizza", "top", 7), "kv_layers=7 with 6 layers"),
    ((6, "sandwich", "top", 2), "needs at least 3 KV layers"),
])
def test_bad_framework_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        framework_map(*args)


@pytest.mark.parametrize("sources, message", [
    ([0, 0, 1, 2, 2, 2], r"kv_source_layers\[2\]=1, but layer 1 attends layer 0"),
    ([0, 0, 0], "3 entries for 6 layers"),
    ([0, 0, 0, 0, 0, 9], r"kv_source_layers\[5\]=9"),
])
def test_bad_maps_are_refused(sources, message):
    with pytest.raises(ValueError, match=message):
        SharedKVLlamaConfig(**SMALL, kv_source_layers=sources)


def test_configuration_names():
    assert parse_configuration("sandwich-middle") == ("sandwich", "middle")
    with pytest.raises(ValueError, match="PARTITION-TARGET"):
        parse_configuration("sandwich")


def test_without_sharing_it_is_llama():
    model = model_for(None)
    llama = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    llama.load_state_dict(model.state_dict())
    ids, mask = make_batch(2, 24, seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits)


def test_only_kv_layers_have_key_and_value_projections():
    model = model_for("sandwich-middle")
    with_kv = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "k_proj")]
    assert with_kv == [0, 2, 5]
    assert model.config.kv_sharing_modes == ["store", "reuse", "store", "reuse", "reuse", "store"]


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_the_iterative_prompt_converges_to_token_by_token_decoding(name):
    """With as many passes as tokens, the prompt's iteration is exact: the logits equal decoding one
    token at a time (where a later layer's KV of every earlier token is in the cache)."""
    length = 10
    model = model_for(name, forward_passes=length)
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                           for t in range(length)], dim=1)
    torch.testing.assert_close(whole, steps, rtol=0, atol=1e-5)


def test_few_passes_are_an_approximation_for_upward_targets_only():
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    for name, exact in (("pizza-bottom", True), ("pizza-top", False)):
        model = model_for(name, forward_passes=1)
        with torch.no_grad():
            whole = model(ids).logits
            cache = DynamicCache(config=model.config)
            steps = torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                               for t in range(16)], dim=1)
        assert torch.allclose(whole, steps, atol=1e-5) == exact


def test_a_chunked_prompt_attends_the_cached_part():
    """A prompt in two chunks (the second with a cache) converges to the same logits as one chunk."""
    model = model_for("sandwich-top", forward_passes=12)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :5], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["lasagna-top", "pizza-bottom"])
def test_left_padding_does_not_change_a_row(name):
    model = model_for(name)
    ids, mask = make_batch(2, 20, seed=6)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, **GREEDY)
        real = mask[1].bool()
        alone = model.generate(ids[1:, real], max_new_tokens=6, eos_token_id=None, **GREEDY)
    assert torch.equal(batch[1, 20:], alone[0, int(real.sum()):])


def test_training_backpropagates_through_the_last_passes():
    model = model_for("sandwich-middle", backward_passes=2).train()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.2.self_attn.k_proj.weight"].abs().sum() > 0  # read from below and above


def test_saved_models_load_through_the_auto_classes(tmp_path):
    model = model_for("pizza-top")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SharedKVLlamaForCausalLM)
    assert loaded.config.kv_source_layers == [0, 1, 5, 5, 5, 5]
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_offload_runs_every_configuration_exactly(name):
    """Batch 2 with left padding, most pages on the host: the same greedy tokens as the model's own
    generate, logits within float rounding. Top and middle targets too: the prompt's iteration reads
    the stored KV and this forward's unstored keys, merged by log-sum-exp."""
    model = model_for(name)
    ids, mask = make_batch(2, 96, seed=8)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16) as om:
        om.config.device_budget = om.minimum_device_budget(2, 104)
        got = om(ids, attention_mask=mask).logits
        assert om.stats.pages_resident < om.stats.pages_total  # the host part ran
        assert torch.equal(om.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY), expected)
    real = mask.bool()
    torch.testing.assert_close(got[real], logits[real], rtol=0, atol=1e-4)


def test_offload_stores_one_copy_per_kv_layer():
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(9))
    measured = {}
    for name in (None, "pizza-bottom"):
        with OffloadedModel(model_for(name), page_size=16, device_budget="64MiB", prefix_cache=False) as om:
            cache = om.new_cache(1, 64)
            om(ids, past_key_values=cache)
            stats = cache.stats()
            measured[name] = (om.store.layout.num_layers, om.store.host_used_bytes(), stats.kv_bytes)
            page_bytes = om.store.layout.page_bytes
            cache.release()
    layers, host, kv = measured["pizza-bottom"]
    assert layers == 3 and measured[None][0] == 6
    assert host == kv == 3 * (64 // 16) * page_bytes
    assert measured[None][1:] == (2 * host, 2 * kv)


def test_a_prompt_computed_by_iteration_is_never_split():
    """Chunking would change an iterated prompt's KV: such a model prefills whole, reuses no prefix
    and refuses tiers that rebuild lost pages from a prefix's tokens."""
    model = model_for("sandwich-middle")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, **GREEDY)
    with OffloadedModel(model, page_size=8, prefill_chunk=16) as om:
        assert torch.equal(om.generate(ids, max_new_tokens=4, **GREEDY), expected)
        assert om.store.tree is None  # no prefix reuse
    with pytest.raises(ValueError, match="layers attending a later layer's KV"):
        OffloadedModel(model, disk_dir="/tmp/never-used", disk_budget="1MiB")


def test_the_trainer_reproduces_a_configuration_from_its_flags(tmp_path, monkeypatch):
    """`python -m offload.models.train --kv-sharing sandwich-middle --layers 6` twice from the same seed
    (a few steps of a tiny recipe): the same map in the saved config and the same weights, bit for bit."""
    from safetensors.torch import load_file

    from offload.models import train

    monkeypatch.setitem(train.RECIPES, "study", (train.Phase(128, 2, 3),))
    for run in ("a", "b"):
        train.main(["--out", str(tmp_path / run), "--layers", "6", "--recipe", "study", "--kv-sharing",
                    "sandwich-middle", "--threads", "1", "--probe-every", "0", "--no-eval", "--log-every", "1"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.kv_source_layers == [0, 2, 2, 2, 2, 5]
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
