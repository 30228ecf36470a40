"""H2O-style criticality: decayed accumulated attention mass per page."""

from __future__ import annotations

import torch

from offload.policies.base import PageScorer


class AttentionMassScorer(PageScorer):
    name = "attention_mass"

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay!r} must be in [0, 1]")
        self.decay = decay

    def update(self, scores: torch.Tensor, page_mass: torch.Tensor) -> torch.Tensor:
        return scores.mul_(self.decay).add_(page_mass)
