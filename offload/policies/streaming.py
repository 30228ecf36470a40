"""StreamingLLM / LM-Infinite: attention sinks (the first tokens) plus the most recent tokens.

Page granularity: the first ceil(sink_tokens / page_size) pages are the sinks (the paper keeps 4
tokens; one page holds them), the rest of the budget is the newest whole pages."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill, recency, sinks


class StreamingPolicy(KVPolicy):
    name = "streaming"

    def keep(self, view: StepView) -> torch.Tensor:
        keep = sinks(view, min(view.sink_pages, view.budget_pages))
        return view.shared(fill(keep, recency(view), view.budget_pages - int(keep.sum()), view.alive))
