"""Quest's page selection: an upper bound of q.k over a page from the page's key min/max."""

from __future__ import annotations

import torch

from offload.policies.base import BatchView, KVPolicy, PageSelector, StepView, fill_rows, sinks_and_recent


def page_upper_bounds(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k for every page, maximised over query heads, query rows and KV heads.

    query:   [B, H, Q, D]
    key_min: [B, P, H_kv, D], key_max: [B, P, H_kv, D]  (element-wise min / max of the page's keys)
    Returns  [B, P] float32.
    Since max(q*lo, q*hi) = relu(q)*hi + min(q, 0)*lo per dimension, the bound is two matmuls.
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key_min.shape[2]
    q = query.float().reshape(bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim)
    hi = key_max.float().permute(0, 2, 3, 1)  # [B, Hkv, D, P]
    lo = key_min.float().permute(0, 2, 3, 1)
    bound = torch.matmul(q.clamp(min=0), hi) + torch.matmul(q.clamp(max=0), lo)  # [B, Hkv, G*Q, P]
    return bound.amax(dim=(1, 2))


class QuestSelector(PageSelector):
    name = "quest"

    def score(self, query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
        return page_upper_bounds(query, key_min, key_max)


class QuestPolicy(KVPolicy):
    """Quest: the sinks and the recent window (at most half the budget), then the pages with the
    highest upper bound of q.k, computed from page summaries alone (nothing is read). The paper
    selects by the bound alone; the sinks and recent window are this runtime's addition. One selection for every head (the
    bound is maximised over heads), re-made every step: a selector, never dropping. Pages on the device (or on
    their way) count `OffloadConfig.sticky_margin` nats more, so the selection changes only for a clearly
    better page."""

    name = "quest"
    evicts = False
    speculates = True

    def __init__(self, config) -> None:
        super().__init__(config)
        from offload.policies import make_selector  # (the registry imports this module)

        self.selector = make_selector(config.selector)

    def keep(self, view: StepView) -> torch.Tensor:
        return view.shared(self.keep_batch(BatchView.of(view))[0])

    def keep_batch(self, view: BatchView) -> torch.Tensor:
        """[B, P] bool: each sequence's pages (`keep` is a batch of one)."""
        required = sinks_and_recent(view)
        rest = view.budget_pages - required.sum(dim=1)
        if view.key_min is None or not bool((rest > 0).any()):
            return required
        # In nats: a page not on the device takes a resident one's place only when its bound is
        # `sticky_margin` higher (hysteresis; without it the bounds' noise churns the selection,
        # and every change is a copy or a host read).
        bound = self.selector.score(view.query, view.key_min, view.key_max).cpu() * view.scale
        margin = self.config.sticky_margin
        if margin:
            bound = bound + margin * view.resident.float()
        return fill_rows(required, bound, rest, view.alive)
