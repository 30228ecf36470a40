"""MHA -> GQA head merging: group size 1 changes nothing, mean pooling is the hand average, the
aligned variants recover heads that differ only by what they can absorb, and the merged model is an
ordinary one offload runs with a smaller cache."""

from __future__ import annotations

import copy

import pytest
import torch

from offload import OffloadedModel
from offload.crosslayer.head_merge import METHODS, merge_kv_heads
from tests.crosslayer.conftest import tiny_llama, token_ids

CALIBRATION = [token_ids(1, 48, seed=s) for s in range(3)]


@pytest.mark.parametrize("method", METHODS)
def test_group_size_one_is_the_identity(method):
    model = tiny_llama(num_layers=2, kv_heads=4)
    merged = merge_kv_heads(model, 1, method, CALIBRATION)
    ids = token_ids(1, 40, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert merged.config.num_key_value_heads == 4 and model.config.num_key_value_heads == 4


def test_mean_pooling_is_the_hand_average():
    model = tiny_llama(num_layers=2, kv_heads=4)  # 4 query heads, 4 KV heads, head_dim 16
    merged = merge_kv_heads(model, 2, "mean")
    assert merged.config.num_key_value_heads == 2
    for old, new in zip(model.model.layers, merged.model.layers):
        for name in ("k_proj", "v_proj"):
            w = getattr(old.self_attn, name).weight  # [4 * 16, 64]
            expected = torch.stack([(w[0:16] + w[16:32]) / 2, (w[32:48] + w[48:64]) / 2]).reshape(32, 64)
            torch.testing.assert_close(getattr(new.self_attn, name).weight, expected, rtol=0, atol=1e-7)
        for name in ("q_proj", "o_proj"):
            assert torch.equal(getattr(new.self_attn, name).weight, getattr(old.self_attn, name).weight)
    # everything but k/v projections is the same module by module
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == {f"model.layers.{i}.self_attn.{n}.weight" for i in range(2) for n in ("k_proj", "v_proj")}


def _rotate_pairs(rows: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """rows [D, in]: each RoPE pair (p, p + D/2) turned by angles[p]."""
    half = rows.shape[0] // 2
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    return torch.cat([c * rows[:half] - s * rows[half:], s * rows[:half] + c * rows[half:]])


def _model_with_twin_heads():
    """Two KV heads per layer that compute the same attention: head 1's keys are head 0's turned per RoPE
    pair (its queries turned alike), its values head 0's under an orthogonal map (undone by o_proj)."""
    model = copy.deepcopy(tiny_llama(num_layers=2, kv_heads=2, heads=2))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            angles = torch.rand(8, generator=gen) * 6.28
            rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
            attn.k_proj.weight[16:] = _rotate_pairs(attn.k_proj.weight[:16], angles)
            attn.q_proj.weight[16:] = _rotate_pairs(attn.q_proj.weight[:16], angles)
            attn.v_proj.weight[16:] = rotation.T @ attn.v_proj.weight[:16]
            attn.o_proj.weight[:, 16:] = attn.o_proj.weight[:, :16] @ rotation
    return model


@pytest.mark.parametrize("method, exact", [("procrustes", True), ("svd", True), ("mean", False)])
def test_aligned_merges_recover_heads_that_differ_by_what_they_absorb(method, exact):
    model = _model_with_twin_heads()
    merged = merge_kv_heads(model, 2, method, CALIBRATION)
    ids = token_ids(1, 40, seed=4)
    with torch.no_grad():
        diff = float((merged(ids).logits - model(ids).logits).abs().max())
    assert (diff < 1e-4) == exact, diff


def test_the_merged_model_runs_exactly_in_offload_with_half_the_cache():
    model = tiny_llama(num_layers=2, kv_heads=4)
    merged = merge_kv_heads(model, 2, "svd", CALIBRATION)
    ids = token_ids(1, 64, seed=2)
    with torch.no_grad():
        expected = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    host = {}
    for name, m in (("original", model), ("merged", merged)):
        with OffloadedModel(m, page_size=16, prefix_cache=False) as om:
            cache = om.new_cache(1, 64)
            om(ids, past_key_values=cache)
            host[name] = om.store.host_used_bytes()
            cache.release()
            if name == "merged":
                assert torch.equal(om.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)
    assert host["merged"] * 2 == host["original"] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=3, method="mean"), "positive divisor of the model's 4 KV heads"),
    (dict(group_size=0, method="mean"), "positive divisor"),
    (dict(group_size=2, method="median"), "not a head-merging method"),
    (dict(group_size=2, method="svd"), "pass calibration"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        merge_kv_heads(tiny_llama(num_layers=2, kv_heads=4), **kwargs)


def test_models_with_per_head_key_norms_are_refused():
    from tests.hf.families import tiny

    with pytest.raises(ValueError, match="q_norm/k_norm"):
        merge_kv_heads(tiny("qwen3", "Qwen3ForCausalLM"), 2, "mean")
