"""The three seams a policy plugs into. Each is a one-method strategy; policies see tensors only.

- `PageSelector.score`: how relevant each page is to a query (which pages a query needs).
- `PageScorer.update`: criticality from observed attention (which pages stay resident).
- `EvictionOrder.priority`: what leaves a tier first (device residency, the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PageSelector:
    """Estimates, from page summaries alone, how much a query will attend each page."""

    name = "base"

    def score(self, query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
        """query [B, H, Q, D]; key_min/key_max [B, P, H_kv, D] -> [B, P] float32, higher = more needed."""
        raise NotImplementedError


class PageScorer:
    """Turns observed attention into page scores."""

    name = "base"

    def update(self, scores: torch.Tensor, page_mass: torch.Tensor) -> torch.Tensor:
        """Return new scores.

        scores:    [B, max_pages] float32, the current scores (0 for pages never seen)
        page_mass: [B, max_pages] float32, attention mass each page received this step,
                   summed over heads and the observed queries (rows of one query sum to 1)
        """
        raise NotImplementedError


@dataclass(slots=True)
class EvictionCandidates:
    """What an eviction order may look at, one entry per candidate (a page, or a cached prefix page).

    score:           [n] float64 criticality (0 where a tier keeps none)
    last_access:     [n] float64 logical clock of the last use (higher = more recent)
    resident:        [n] bool, already in the tier (moving it costs a copy)
    recently_needed: [n] bool, selected by the last query
    position:        [n] float64 page position in its sequence (higher = newer)
    """

    score: torch.Tensor
    last_access: torch.Tensor
    resident: torch.Tensor
    recently_needed: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, n: int, **given: torch.Tensor) -> "EvictionCandidates":
        """Candidates with the given fields and neutral values for the rest."""
        zeros = torch.zeros(n, dtype=torch.float64)
        fields = dict(score=zeros, last_access=zeros, resident=torch.zeros(n, dtype=torch.bool),
                      recently_needed=torch.zeros(n, dtype=torch.bool), position=zeros)
        fields.update({k: v.to(fields[k].dtype) for k, v in given.items()})
        return cls(**fields)


class EvictionOrder:
    """Ranks candidates for a tier: the lowest priority leaves first, the highest stays."""

    name = "base"

    def priority(self, candidates: EvictionCandidates) -> torch.Tensor:
        """[n] float64; ties are broken by position (the older page leaves first)."""
        raise NotImplementedError


def keep_order(order: EvictionOrder, candidates: EvictionCandidates) -> list[int]:
    """Candidate indices, the one to keep first; equal priorities keep the newer position first."""
    priority = order.priority(candidates).tolist()
    position = candidates.position.tolist()
    return sorted(range(len(priority)), key=lambda i: (-priority[i], -position[i]))
