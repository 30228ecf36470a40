"""TOVA (Token Omission Via Attention): keep the tokens the current query attends most, averaged
over heads, one selection for every head of the layer; no fixed sinks or window.

The paper drops, each step, the token with the lowest attention of the last query; keeping the
top `budget` pages by the last step's attention is the same rule applied to whole pages. Under
effect="demote", a page left out keeps the mass of the last step that attended it and can
return if a kept page falls below it."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill


class TOVAPolicy(KVPolicy):
    name = "tova"

    def keep(self, view: StepView) -> torch.Tensor:
        none = torch.zeros(view.num_pages, dtype=torch.bool)
        return view.shared(fill(none, view.last_mass.sum(dim=0), view.budget_pages, view.alive))
