"""Device residency order: the pages the last query selected, then criticality, then recency.

A resident page's score counts `RESIDENT_BONUS` times: a page is displaced only by one scoring
that many times more. Without that hysteresis, promotions and speculative prefetches evict each
other's pages every step.
"""

from __future__ import annotations

import torch

from offload.policies.base import EvictionCandidates, EvictionOrder

RESIDENT_BONUS = 2.0
# Above any accumulated attention mass (heads x observed rows / (1 - decay) stays far below it).
_NEEDED_FIRST = 1e12


class CriticalityOrder(EvictionOrder):
    name = "criticality"

    def priority(self, c: EvictionCandidates) -> torch.Tensor:
        bonus = torch.where(c.resident, RESIDENT_BONUS, 1.0).to(torch.float64)
        return c.recently_needed.to(torch.float64) * _NEEDED_FIRST + c.score * bonus
