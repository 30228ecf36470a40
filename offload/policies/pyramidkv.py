"""PyramidKV (PyramidInfer's observation): attention narrows in higher layers, so lower layers get
larger budgets. Each layer selects like SnapKV with its own budget, decreasing linearly from the
first layer to the last (kvpress's schedule: the top layer gets (budget - window) / beta
beyond the window, the bottom one 2 (budget - window) minus that), with the same average.

A layer's budget never exceeds the context: what a capped layer cannot use goes to the others, so
a budget at least the context keeps everything. The device budget follows the same schedule: the
page slots beyond each layer's minimum (sinks, recent window, tail) are shared over layers in
proportion to its budget beyond the window, so lower layers can keep what they select resident."""

from __future__ import annotations

from offload.policies.base import StepView
from offload.policies.snapkv import SnapKVPolicy


def layer_budgets(budget: int, num_layers: int, window: int, beta: float, cap: int) -> list[float]:
    """Tokens per layer: linear from the bottom layer down to the top, averaging `budget`, each
    at most `cap` (the excess of a capped layer is shared by the uncapped ones)."""
    if budget >= cap:
        return [float(cap)] * num_layers
    base = budget - window
    if base <= 0 or num_layers == 1:
        return [float(budget)] * num_layers
    low = base / beta
    high = 2 * base - low
    step = (high - low) / (num_layers - 1)
    budgets = [high - layer * step + window for layer in range(num_layers)]
    while True:
        excess = sum(max(0.0, b - cap) for b in budgets)
        budgets = [min(b, float(cap)) for b in budgets]
        open_layers = [i for i, b in enumerate(budgets) if b < cap]
        if excess <= 1e-9 or not open_layers:
            return budgets
        for i in open_layers:
            budgets[i] += excess / len(open_layers)


class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"

    def device_weights(self, num_layers: int) -> list[float] | None:
        if num_layers == 1:
            return None
        # The schedule's shape (window 0, no cap): linear from 2 - 1/beta down to 1/beta.
        return layer_budgets(1_000_000, num_layers, 0, self.config.pyramid_beta, cap=2**62)

    def budget_pages(self, view: StepView) -> int:
        budgets = layer_budgets(view.budget, view.num_layers, self.config.observation_window, self.config.pyramid_beta,
                                view.length)
        tokens = int(budgets[view.layer])
        return max(0, (tokens - view.length % view.page_size) // view.page_size)
