"""H2O (Heavy-Hitter Oracle): the recent tokens plus the "heavy hitters", the tokens with the
largest attention accumulated over every query so far; half the budget each, as in the paper.

Per KV head (as H2O and kvpress's observed-attention press do): each head keeps its own heavy
hitters, scored by the mass its query heads gave them. Page granularity: a page's score is the
summed mass of its tokens. The prompt contributes the observed rows of each prefill chunk (the
runtime does not materialise every prompt row's attention). Under effect="demote", a page left
out keeps its accumulated score and returns if the kept pages' scores fall behind it; it gains
no mass while it is not attended."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill, recency


class H2OPolicy(KVPolicy):
    name = "h2o"
    per_head = True

    def keep(self, view: StepView) -> torch.Tensor:
        num_recent = view.budget_pages // 2
        keep = view.shared(fill(torch.zeros(view.num_pages, dtype=torch.bool), recency(view), num_recent, view.alive))
        return fill(keep, view.acc_mass, view.budget_pages - num_recent, view.alive)
