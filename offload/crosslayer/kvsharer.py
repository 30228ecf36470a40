"""KVSharer-style search for a `kv_sharing` map (Yang et al., arXiv 2410.18517), training-free.

1. Calibrate: run the model on calibration sequences (all of one length) and average each layer's
   keys and values over them: mean K, mean V of shape [H_kv, T, D] per layer.
2. Rank every pair (later layer c, earlier layer p) that may share (attention layers of the same
   kind) by the *dissimilarity* of their mean KV: the Euclidean distance between the flattened mean
   keys, and between the flattened mean values, averaged. Most dissimilar first: the paper's
   counter-intuitive finding is that sharing dissimilar KV keeps quality better than similar KV.
3. Greedy: walk the ranking; for each pair whose later layer reads nothing yet, try "c reads p's KV"
   (p's own producer if p already reads one; layers that read c move to that producer too). Keep it
   when the mean cosine similarity between the last hidden states of the sharing model and of the
   model itself, on the calibration sequences, stays at or above `min_similarity`. Stop after
   `num_shared` consumers.

The result is a map `OffloadedModel(kv_sharing=...)` runs. Candidate maps are scored with
`reference.shared_kv_attention` (transformers' own forward), which the tests hold equal to the
store's path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offload.crosslayer.reference import shared_kv_attention


@dataclass
class SearchStep:
    consumer: int
    producer: int  # the layer it would read (after following an existing share)
    distance: float
    similarity: float
    accepted: bool


@dataclass
class KVSharerResult:
    sharing: dict[int, int]  # consumer -> producer
    ranking: list[tuple[int, int, float]]  # (later layer, earlier layer, distance), most dissimilar first
    steps: list[SearchStep] = field(default_factory=list)
    levels: list[dict[int, int]] = field(default_factory=list)  # the map after 1, 2, ... accepted consumers


@torch.inference_mode()
def mean_kv(model, calibration: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per attention layer: (mean keys, mean values) [H_kv, T, D] float32 over the calibration
    sequences (ids [1, T] each, all of one length T)."""
    from transformers import DynamicCache

    lengths = {int(ids.shape[-1]) for ids in calibration}
    if len(lengths) != 1:
        raise ValueError(f"calibration sequences must all have one length (the KV is averaged position by position); "
                         f"got lengths {sorted(lengths)}")
    sums: dict[int, list[torch.Tensor]] = {}
    for ids in calibration:
        cache = DynamicCache(config=model.config)
        model(ids.reshape(1, -1), past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or keys.numel() == 0:
                continue
            kv = [keys[0].float(), values[0].float()]
            sums[i] = kv if i not in sums else [s + x for s, x in zip(sums[i], kv)]
    return {i: (k / len(calibration), v / len(calibration)) for i, (k, v) in sums.items()}


def rank_pairs(means: dict[int, tuple[torch.Tensor, torch.Tensor]], model_config=None) -> list[tuple[int, int, float]]:
    """(later, earlier, distance) for every pair of layers in `means`, most dissimilar first; with
    `model_config`, only pairs that may share (same kind of attention layer)."""
    pairs = []
    layers = sorted(means)
    for c in layers:
        for p in layers:
            if p >= c or (model_config is not None and not _may_share(model_config, c, p)):
                continue
            (kc, vc), (kp, vp) = means[c], means[p]
            distance = 0.5 * (float(torch.linalg.vector_norm(kc - kp)) + float(torch.linalg.vector_norm(vc - vp)))
            pairs.append((c, p, distance))
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))


def _may_share(model_config, consumer: int, producer: int) -> bool:
    from offload.hf.layers import configured_sources

    try:
        configured_sources(model_config, {consumer: producer})
        return True
    except ValueError:
        return False


@torch.inference_mode()
def last_hidden_similarity(model, sharing: dict[int, int], calibration: list[torch.Tensor],
                           reference: list[torch.Tensor] | None = None) -> float:
    """Mean over the sequences of the cosine similarity between the flattened last hidden states
    [T, hidden] of the model with `sharing` and of the model itself (`reference`, if computed)."""
    if reference is None:
        reference = last_hidden_states(model, calibration)
    with shared_kv_attention(model, sharing):
        shared = last_hidden_states(model, calibration)
    sims = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(reference, shared)]
    return float(torch.stack(sims).mean())


@torch.inference_mode()
def last_hidden_states(model, calibration: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids.reshape(1, -1), output_hidden_states=True, use_cache=False).hidden_states[-1][0].float()
            for ids in calibration]


def search(model, calibration: list[torch.Tensor], num_shared: int, min_similarity: float = 0.9,
           order: str = "dissimilar") -> KVSharerResult:
    """KVSharer's greedy search for up to `num_shared` consumer layers (see the module docstring).

    order: "dissimilar" (KVSharer) or "similar" (the intuitive ranking the paper argues against,
    for comparison)."""
    if isinstance(num_shared, bool) or not isinstance(num_shared, int) or num_shared < 0:
        raise ValueError(f"num_shared={num_shared!r} must be an integer >= 0")
    if not 0.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity={min_similarity!r} must be in [0, 1]")
    if order not in ("dissimilar", "similar"):
        raise ValueError(f"order={order!r} is not accepted; expected 'dissimilar' or 'similar'")
    ranking = rank_pairs(mean_kv(model, calibration), model.config)
    if order == "similar":
        ranking = ranking[::-1]
    reference = last_hidden_states(model, calibration)
    result = KVSharerResult({}, ranking)
    for consumer, producer, distance in ranking:
        if len(result.sharing) >= num_shared:
            break
        if consumer in result.sharing:
            continue
        candidate = share(result.sharing, consumer, producer)
        similarity = last_hidden_similarity(model, candidate, calibration, reference)
        accepted = similarity >= min_similarity
        result.steps.append(SearchStep(consumer, candidate[consumer], distance, similarity, accepted))
        if accepted:
            result.sharing = candidate
            result.levels.append(candidate)
    return result


def share(sharing: dict[int, int], consumer: int, producer: int) -> dict[int, int]:
    """`sharing` plus "consumer reads producer", kept a map of KV layers: the consumer reads the
    producer's own producer if it has one, and layers that read the consumer read that layer too."""
    root = sharing.get(producer, producer)
    updated = {c: (root if p == consumer else p) for c, p in sharing.items()}
    updated[consumer] = root
    return dict(sorted(updated.items()))
