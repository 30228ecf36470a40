"""The oracle: the pages the query really attends most, from exact attention over every stored
key (read in full, every step). Not a deployable policy: the reference upper bound of the
quality table, and of selection recall (the share of the oracle's pages a policy attends).

The same fixed part as Quest (the sinks and the newest pages of the recent window, at most half
the budget: `sinks_and_recent`), then, per KV head, the pages its query heads give the most exact
attention mass. Mass alone is not the bound it should be: on the embedded model's tasks it
leaves out the recent pages (the question's first tokens, local syntax), whose mass is small but
whose values matter, and it lost to Quest (aggregate at 5% of 1k: 0.45 against 0.65; stories260K
perplexity at 5%: 1.069x the full cache against 0.997x). With the fixed part in common the
oracle's chosen pages carry at least the mass of any policy's with that fixed part."""

from __future__ import annotations

import torch

from offload.policies.base import BatchView, KVPolicy, StepView, fill, sinks_and_recent


def exact_page_mass(view: StepView, pages: torch.Tensor) -> torch.Tensor:
    """[H_kv, P] the exact attention mass of the step's queries on each page (tail in the softmax)."""
    keys = view.stored_keys(pages)
    view.charge(keys.numel() * keys.element_size())
    group = view.query.shape[0] // view.num_kv_heads
    k = keys.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [H, T, D]
    probs = (torch.matmul(view.query.float(), k.transpose(1, 2)) * view.scale).softmax(dim=-1)
    return view.page_mass(probs, pages)


def oracle_pages(view: StepView, mass: torch.Tensor) -> torch.Tensor:
    """[H_kv, P] bool: the oracle's pages given the exact page mass [H_kv, P] (`exact_page_mass`)."""
    fixed = sinks_and_recent(BatchView.of(view))[0]
    rest = view.budget_pages - int(fixed.sum())
    return fill(fixed[None, :].expand(view.num_kv_heads, -1), mass, rest, view.alive)


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
        return oracle_pages(view, exact_page_mass(view, pages))
