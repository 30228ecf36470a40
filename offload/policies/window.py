"""Sliding window: the newest tokens only, no sinks (the baseline StreamingLLM improves on).

Page granularity: the newest whole pages that fit the budget beside the tail."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, newest


class WindowPolicy(KVPolicy):
    name = "window"

    def keep(self, view: StepView) -> torch.Tensor:
        return view.shared(newest(view, view.budget_pages))
