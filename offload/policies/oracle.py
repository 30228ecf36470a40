"""The oracle: the pages the query really attends most, from exact attention over every stored
key (read in full, every step). Not a deployable policy: the reference upper bound of the
quality table, and of selection recall (the share of the oracle's pages a policy attends).

Per KV head: the mass its query heads give each page, the top `budget_pages` kept."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill


def exact_page_mass(view: StepView, pages: torch.Tensor) -> torch.Tensor:
    """[H_kv, P] the exact attention mass of the step's queries on each page (tail in the softmax)."""
    keys = view.stored_keys(pages)
    view.charge(keys.numel() * keys.element_size())
    group = view.query.shape[0] // view.num_kv_heads
    k = keys.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [H, T, D]
    probs = (torch.matmul(view.query.float(), k.transpose(1, 2)) * view.scale).softmax(dim=-1)
    return view.page_mass(probs, pages)


class OraclePolicy(KVPolicy):
    name = "oracle"
    evicts = False
    per_head = True
    reads_keys = True

    def keep(self, view: StepView) -> torch.Tensor:
        pages = view.alive.nonzero().flatten()
        none = torch.zeros(view.num_kv_heads, view.num_pages, dtype=torch.bool)
        if view.budget_pages >= pages.numel():
            return none | view.alive[None, :]
        return fill(none, exact_page_mass(view, pages), view.budget_pages, view.alive)
