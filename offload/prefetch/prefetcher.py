"""`Prefetcher`: copy the pages a predicted query selects before the layer runs.

As many pages as the device holds are selected, not just the token budget: the real query's
pages rank near the top of the predicted ones, so a wider net catches more of them. Room is
made by evicting the lowest-priority resident pages that the prediction does not want; the
copies are two-phase (`Residency.issue`), so the layer waits only for pages still in flight.
"""

from __future__ import annotations

import torch

from offload.policies import PageSelector
from offload.store.page_table import PageTable
from offload.store.planner import select_pages
from offload.store.residency import Residency


class Prefetcher:
    def __init__(self, selector: PageSelector, residency: Residency) -> None:
        self.selector = selector
        self.residency = residency

    def speculate(self, table: PageTable, predicted_query: torch.Tensor) -> None:
        """Issue copies of the pages `predicted_query` [B, H, Q, D] selects that are not on the device."""
        capacity = (table.rules.slots_per_seq - 1) * table.layout.page_size
        selected = select_pages(table, self.selector, predicted_query, capacity)
        for b in range(table.batch_size):
            wanted = selected[b]
            missing = sorted(wanted - set(table.resident_pages(b)) - set(table.inflight[b]))
            if not missing:
                continue
            room = self.residency.make_room(table, b, wanted, len(missing))
            # Most promising first: the predicted bound order is lost in the set, so use scores then recency.
            score = table.scores[b].tolist()
            missing.sort(key=lambda p: (-score[p], -p))
            chosen = missing[: max(0, room)]
            self.residency.issue(table, b, chosen)
            table.issued[b].update(chosen)
            table.counters.prefetch_issued_pages += len(chosen)
