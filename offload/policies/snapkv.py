"""SnapKV: the prompt's last queries (the observation window) vote, per KV head, for the prompt
tokens worth keeping; the window itself and every token generated after the prompt are kept.

The selection is made from the prompt's attention and does not change while decoding, as in the
paper (and in kvpress, whose presses see the context, never the question). Page granularity: a
page's vote is the mass the observation rows gave its tokens; the paper's pooling over
neighbouring tokens (kernel 5-7) falls inside one page of 16 and is not applied again. A budget
smaller than the window and the generated pages keeps the newest of them."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill, recency


class SnapKVPolicy(KVPolicy):
    name = "snapkv"
    per_head = True

    def budget_pages(self, view: StepView) -> int:
        return view.budget_pages

    def keep(self, view: StepView) -> torch.Tensor:
        k = self.budget_pages(view)
        page = torch.arange(view.num_pages)
        prompt_length = max(0, view.prompt_length)
        first_window = max(0, prompt_length - self.config.observation_window) // view.page_size
        fixed = (page >= first_window) & view.alive  # the observation window and what came after
        if int(fixed.sum()) >= k:
            none = torch.zeros(view.num_pages, dtype=torch.bool)
            return view.shared(fill(none, recency(view), k, fixed))
        keep = view.shared(fixed)
        return fill(keep, view.prompt_mass, k - int(fixed.sum()), view.alive)
