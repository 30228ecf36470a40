"""The one interface a criticality policy implements.

A scorer keeps one number per page and sequence; the store keeps the highest-scoring pages
resident on the device (beside sinks and the recent window). Policies see tensors only.
"""

from __future__ import annotations

import torch


class PageScorer:
    """Turns observed attention into page scores. Subclasses implement `update`."""

    name = "base"

    def update(self, scores: torch.Tensor, page_mass: torch.Tensor) -> torch.Tensor:
        """Return new scores.

        scores:    [B, max_pages] float32, the current scores (0 for pages never seen)
        page_mass: [B, max_pages] float32, attention mass each page received this step,
                   summed over heads and the observed queries (rows of one query sum to 1)
        """
        raise NotImplementedError
