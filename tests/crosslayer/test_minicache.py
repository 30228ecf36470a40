"""MiniCache: the SLERP merge and its restoration on tensors, retention, the bytes the cache counts,
and the cache inside a model (a decode step equals one over a plain cache holding the restored KV)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from offload.crosslayer.minicache import MiniCache
from offload.crosslayer.slerp_merge import AngleRange, MergedStates, retained, slerp
from tests.crosslayer.conftest import tiny_llama, token_ids


def _vectors(seed: int, shape=(2, 3, 7, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_slerp_keeps_magnitudes_and_interpolates_on_the_sphere():
    a, b = _vectors(0), _vectors(1)
    for t, towards in ((0.0, a), (1.0, b)):
        direction, mag_a, mag_b, _ = slerp(a, b, t)
        torch.testing.assert_close(direction, towards / towards.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(mag_a, a.norm(dim=-1))
        torch.testing.assert_close(mag_b, b.norm(dim=-1))
    direction, _, _, distance = slerp(a, b, 0.5)
    unit_a, unit_b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    # halfway on the great circle: equal angles to both ends, each half the angle between them
    angle_a = torch.arccos((direction * unit_a).sum(-1).clamp(-1, 1))
    angle_b = torch.arccos((direction * unit_b).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(angle_a, angle_b)
    torch.testing.assert_close(angle_a, distance * torch.pi / 2)
    torch.testing.assert_close(direction.norm(dim=-1), torch.ones_like(angle_a))


def test_parallel_vectors_merge_losslessly():
    a = _vectors(2)
    direction, mag_a, mag_b, distance = slerp(a, 3.0 * a, 0.6)
    torch.testing.assert_close(direction * mag_b[..., None], 3.0 * a)
    assert float(distance.max()) < 1e-6


def test_retention_keeps_the_vectors_that_disagree_most():
    angles = AngleRange()
    distance = torch.tensor([0.1, 0.2, 0.5, 0.9])
    angles.update(distance)
    assert retained(distance, angles, 1.0).tolist() == [False] * 4
    assert retained(distance, angles, 0.5).tolist() == [False, False, False, True]
    assert retained(distance, angles, 0.0).tolist() == [False, True, True, True]
    single = AngleRange()
    single.update(torch.tensor([0.3]))
    assert not retained(torch.tensor([0.3]), single, 0.0).any()  # nothing stands out from one vector


def test_merged_states_restore_retained_vectors_exactly_and_count_their_bytes():
    a, b = _vectors(3).float(), _vectors(4).float()  # [B=2, H=3, 7 tokens, D=8]
    states = MergedStates.empty(2, 3, 8, torch.float32, "cpu")
    states.append(a[:, :, :5], b[:, :, :5], t=0.6, gamma=0.5)
    states.append(a[:, :, 5:], b[:, :, 5:], t=0.6, gamma=0.5)  # judged against the running range
    _, _, _, distance = slerp(a, b, 0.6)
    first, everything = distance[:, :, :5], distance  # each append is judged by the range seen so far
    kept = torch.cat([first > first.min() + 0.5 * (first.max() - first.min()),
                      distance[:, :, 5:] > everything.min() + 0.5 * (everything.max() - everything.min())], dim=2)
    assert states.num_tokens == 7 and states.num_retained == int(kept.sum()) > 0
    for member, x in ((0, a), (1, b)):
        restored = states.restore(member)
        torch.testing.assert_close(restored[kept], x[kept], rtol=0, atol=0)
        direction, mag_a, mag_b, _ = slerp(a, b, 0.6)
        merged = direction * (mag_a if member == 0 else mag_b)[..., None]
        torch.testing.assert_close(restored[~kept], merged[~kept].float())
    n, r = 2 * 3 * 7, states.num_retained
    assert states.nbytes() == 4 * (n * 8 + 2 * n) + 4 * r + 2 * 4 * r * 8  # directions, magnitudes, index, vectors


@torch.inference_mode()
def test_a_decode_step_reads_the_merged_kv():
    """Prefill through MiniCache, then one decode step: its logits equal a DynamicCache decode step
    whose merged layers hold the KV restored by hand from the same merge."""
    model = tiny_llama(num_layers=4)
    ids = token_ids(1, 30, seed=6)
    cache = MiniCache.for_model(model, gamma=0.6)  # pairs (2, 3)
    assert cache.pairs == [(2, 3)]
    model(ids[:, :-1], past_key_values=cache)
    got = model(ids[:, -1:], past_key_values=cache).logits

    full = DynamicCache(config=model.config)
    model(ids[:, :-1], past_key_values=full)
    keys = MergedStates.empty(1, 2, 16, torch.float32, "cpu")
    values = MergedStates.empty(1, 2, 16, torch.float32, "cpu")
    keys.append(full.layers[2].keys, full.layers[3].keys, 0.6, 0.6)
    values.append(full.layers[2].values, full.layers[3].values, 0.6, 0.6)
    for member, layer in ((0, 2), (1, 3)):
        full.layers[layer].keys, full.layers[layer].values = keys.restore(member), values.restore(member)
    expected = model(ids[:, -1:], past_key_values=full).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 30
    # bytes: layers 0 and 1 whole, the pair as directions + magnitudes + retained vectors and indices
    whole = 2 * 2 * (1 * 2 * 30 * 16) * 4
    merged = sum(s.nbytes() for s in (cache.merged[0].keys, cache.merged[0].values))
    assert cache.kv_bytes() == whole + merged
    assert merged == 2 * 4 * (2 * 30 * (16 + 2)) + sum(4 * s.num_retained * (1 + 2 * 16)
                                                       for s in (cache.merged[0].keys, cache.merged[0].values))


@torch.inference_mode()
def test_generate_runs_with_the_cache_and_nothing_merged_below_the_start():
    model = tiny_llama(num_layers=4)
    ids = token_ids(1, 20, seed=7)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = MiniCache.for_model(model, start_layer=3)  # layer 3 has no partner: nothing is merged
    assert cache.pairs == []
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=cache),
                       plain)


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_layer=0), "start_layer"), (dict(start_layer=4), "start_layer"),
    (dict(t=1.5), "t="), (dict(gamma=-0.1), "gamma="),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiniCache(4, **kwargs)
