"""The oracle: the pages the query really attends most, from exact attention over every stored
key (read in full, every step). Not a deployable policy: the reference upper bound of the
quality table, and of selection recall (the share of the oracle's pages a policy attends).

Per KV head: the mass its query heads give each page, the top `budget_pages` kept."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill


def exact_page_mass(view: StepView, pages: torch.Tensor) -> torch.Tensor:
    """[H_kv, P] the exact attention mass of the step's queries on each page (tail in the softmax)."""
    page_keys = view.read_keys(pages).to(view.query.device)  # [n, ps, H_kv, D]
    keys = torch.cat([page_keys.reshape(-1, *page_keys.shape[2:]), view.tail_keys.to(page_keys)], dim=0)
    view.charge(keys.numel() * keys.element_size())
    num_heads, q_len, _ = view.query.shape
    group = num_heads // view.num_kv_heads
    k = keys.float().permute(1, 0, 2).repeat_interleave(group, dim=0)  # [H, T, D]
    probs = (torch.matmul(view.query.float(), k.transpose(1, 2)) * view.scale).softmax(dim=-1)
    ps = view.page_size
    mass = probs[..., : pages.numel() * ps].reshape(num_heads, q_len, pages.numel(), ps).sum(dim=(1, 3))
    mass = mass.reshape(view.num_kv_heads, group, -1).sum(dim=1).cpu()
    out = torch.zeros(view.num_kv_heads, view.num_pages)
    out[:, pages] = mass
    return out


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
