"""KVSharer's search: the ranking is by dissimilarity of the mean KV, the greedy map stays a map of KV
layers, the calibration threshold decides, and the result is a map offload runs."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.crosslayer import kvsharer
from tests.crosslayer.conftest import tiny_llama, token_ids

CALIBRATION = [token_ids(1, 24, seed=s) for s in range(3)]


def test_pairs_are_ranked_most_dissimilar_first():
    zero = torch.zeros(2, 4, 8)
    means = {0: (zero, zero), 1: (zero + 1, zero), 2: (zero + 3, zero + 1)}
    ranking = kvsharer.rank_pairs(means)
    assert [(c, p) for c, p, _ in ranking] == [(2, 0), (2, 1), (1, 0)]
    distance = {(c, p): d for c, p, d in ranking}
    norm = float(torch.ones(2, 4, 8).norm())  # the flattened mean KV differ by 1 everywhere: that norm
    assert distance[(1, 0)] == pytest.approx(0.5 * norm)
    assert distance[(2, 0)] == pytest.approx(0.5 * (3 * norm + norm))


def test_mean_kv_averages_each_layers_cache():
    model = tiny_llama()
    means = kvsharer.mean_kv(model, CALIBRATION)
    assert sorted(means) == [0, 1, 2, 3] and means[0][0].shape == (2, 24, 16)
    from transformers import DynamicCache

    caches = []
    for ids in CALIBRATION:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        caches.append(cache.layers[2].values[0])
    torch.testing.assert_close(means[2][1], torch.stack(caches).mean(0))
    with pytest.raises(ValueError, match="one length"):
        kvsharer.mean_kv(model, [token_ids(1, 10), token_ids(1, 12)])


def test_sharing_a_producer_follows_existing_shares():
    assert kvsharer.share({}, 3, 1) == {3: 1}
    assert kvsharer.share({1: 0}, 3, 1) == {1: 0, 3: 0}  # 1 stores nothing: 3 reads what 1 reads
    assert kvsharer.share({3: 1}, 1, 0) == {1: 0, 3: 0}  # 3 read 1, which now reads 0


def test_search_respects_the_threshold_and_its_maps_run_in_offload():
    model = tiny_llama()
    strict = kvsharer.search(model, CALIBRATION, num_shared=3, min_similarity=1.0)
    assert strict.sharing == {} and all(not s.accepted for s in strict.steps)  # every share changes the output
    loose = kvsharer.search(model, CALIBRATION, num_shared=2, min_similarity=0.0)
    assert len(loose.sharing) == 2 and loose.levels[-1] == loose.sharing and len(loose.levels) == 2
    first = loose.steps[0]
    assert (first.consumer, first.distance) == (loose.ranking[0][0], loose.ranking[0][2])
    assert all(p not in loose.sharing and p < c for c, p in loose.sharing.items())
    similar = kvsharer.search(model, CALIBRATION, num_shared=1, min_similarity=0.0, order="similar")
    assert similar.steps[0].distance == min(d for _, _, d in loose.ranking)
    ids = token_ids(1, 40, seed=8)
    OffloadedModel(model, kv_sharing=loose.sharing).unwrap()  # passes the wrap-time checks
    with torch.no_grad():
        similarity = kvsharer.last_hidden_similarity(model, loose.sharing, [ids])
    assert 0.0 < similarity < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_shared=-1), "num_shared"), (dict(num_shared=1, min_similarity=1.5), "min_similarity"),
    (dict(num_shared=1, order="random"), "order"),
])
def test_bad_search_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kvsharer.search(tiny_llama(), CALIBRATION, **kwargs)
