"""Quality and KV bytes of a model with a cross-layer reduction, the same way for every method.

A `Variant` is a model plus how its KV cache is kept: offload's store (`OffloadedModel`, exact mode,
for the unreduced model, `kv_sharing` maps and head-merged models) or a transformers cache on the
plain model (`MiniCache`). Every quality number uses one protocol, the strict one of
`offload bench policies`: the context is prefilled, then the scored tokens are fed one decode step
at a time, so every prediction reads the reduced cache. KV bytes per token are counted from what
the cache holds after a prefill: the store's pages (`OffloadStats.kv_bytes`, a whole number of
pages) or `MiniCache.kv_bytes()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class OffloadSession:
    """One request in an `OffloadedModel`'s store."""

    def __init__(self, om, max_tokens: int) -> None:
        self.om = om
        self.cache = om.new_cache(1, max_tokens)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.om(ids, past_key_values=self.cache).logits

    def kv_bytes(self) -> int:
        return self.cache.stats().kv_bytes

    def close(self) -> None:
        self.cache.release()


class CacheSession:
    """The plain model with a transformers cache that counts its own bytes (`MiniCache`)."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, past_key_values=self.cache, use_cache=True).logits

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes()

    def close(self) -> None:
        self.cache = None


@dataclass
class Variant:
    """method and level name it; `open(max_tokens)` starts a session; `details` go to the results."""

    method: str
    level: str
    open: Callable[[int], OffloadSession | CacheSession]
    details: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


@torch.inference_mode()
def strict_scores(variant: Variant, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, float]:
    """Prefill ids[:, :start] [1, T], then feed ids[start:] one decode step each. Returns (argmax
    predictions for positions start..T-1 [T - start], mean NLL of those tokens)."""
    session = variant.open(ids.shape[1])
    try:
        logits = session.step(ids[:, :start])[:, -1]
        predicted, nll = [], 0.0
        for t in range(start, ids.shape[1]):
            nll += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t]))
            predicted.append(int(logits.argmax(-1)))
            if t + 1 < ids.shape[1]:
                logits = session.step(ids[:, t:t + 1])[:, -1]
    finally:
        session.close()
    return torch.tensor(predicted), nll / (ids.shape[1] - start)


def perplexity(variant: Variant, windows: list[torch.Tensor], scored: int) -> tuple[float, torch.Tensor]:
    """exp(mean NLL) of the last `scored` tokens of each window [1, T] (strict protocol), and the
    concatenated argmax predictions."""
    nlls, predictions = [], []
    for ids in windows:
        predicted, nll = strict_scores(variant, ids, ids.shape[1] - scored)
        nlls.append(nll)
        predictions.append(predicted)
    return math.exp(sum(nlls) / len(nlls)), torch.cat(predictions)


@torch.inference_mode()
def bytes_per_token(variant: Variant, ids: torch.Tensor) -> float:
    """KV bytes the cache holds per token after a prefill of ids [1, T] (T a multiple of the page size)."""
    session = variant.open(ids.shape[1])
    try:
        session.step(ids)
        return session.kv_bytes() / ids.shape[1]
    finally:
        session.close()


def task_accuracy(variant: Variant, model, tokenizer, task: str, context: int, samples: int, seed: int) -> float:
    """Exact-match accuracy on the embedded model's seeded task samples, strict protocol."""
    from offload.models import embedded

    return embedded.task_accuracy(model, tokenizer, task, context, samples, seed,
                                  score_fn=lambda ids, start: strict_scores(variant, ids, start)[0])


def offloaded(method: str, level: str, model, details: dict | None = None, **config) -> Variant:
    """A variant run by `OffloadedModel(model, exact mode, **config)`; unwrapped by `variant.close()`."""
    from offload import OffloadedModel

    om = OffloadedModel(model, mode="exact", prefix_cache=False, prefetch=False, **config)
    return Variant(method, level, lambda max_tokens: OffloadSession(om, max_tokens), dict(details or {}), om.unwrap)


def cached(method: str, level: str, model, make_cache: Callable[[], object], details: dict | None = None) -> Variant:
    """A variant run by the plain model with the cache `make_cache()` returns (one per session)."""
    return Variant(method, level, lambda max_tokens: CacheSession(model, make_cache()), dict(details or {}))
