"""`Prefetcher`: copy the pages a predicted query will select before the layer runs.

The prediction asks the layer's own KV policy, with the predicted query in place of the real
one, so it follows the same rule as the real selection: the same budget, sinks and recent
window, and the same stickiness (`sticky_margin`: a page on the device stays chosen unless
another clearly beats it). Only the pages that rule would newly bring in are copied; room is
made by evicting the lowest-priority resident pages the prediction does not want. While a
layer's selections keep finding everything on the device, it speculates ever less often (`due`):
a stable selection needs no copies, and a prediction costs about what a selection does. The copies
are two-phase (`Residency.issue`), so the layer waits only for pages still in flight, and a
page in flight counts as on the device for the real selection's stickiness.
"""

from __future__ import annotations

import torch

from offload.policies import KVPolicy
from offload.store.page_table import PageTable
from offload.store.residency import Residency
from offload.store.selection import keep_batched, view_of

# A layer whose selections were all on the device for a while speculates less often: after n
# such steps only when n is a power of two, and at least every MAX_QUIET_INTERVAL steps. A miss
# (a selected page read from the host) brings speculation back at every step.
MAX_QUIET_INTERVAL = 16


def due(quiet_steps: int) -> bool:
    """Whether a layer speculates, given its consecutive decode steps without a miss."""
    if quiet_steps < 2:
        return True
    if quiet_steps >= MAX_QUIET_INTERVAL:
        return quiet_steps % MAX_QUIET_INTERVAL == 0
    return quiet_steps & (quiet_steps - 1) == 0


class Prefetcher:
    def __init__(self, policy: KVPolicy, residency: Residency) -> None:
        self.policy = policy
        self.residency = residency

    def speculate(self, table: PageTable, predicted_query: torch.Tensor, layer: int = 0, num_layers: int = 1) -> None:
        """Issue copies of the pages the policy would newly select for `predicted_query` [B, H, Q, D]
        (whether it is `due` is the caller's question, asked before predicting)."""
        scale = table.scale if table.scale is not None else table.layout.head_dim ** -0.5
        wanted = keep_batched(table, self.policy, predicted_query, scale)  # [B, P], the whole batch at once
        if wanted is None:
            width = max(table.num_complete(b) for b in range(table.batch_size))
            wanted = torch.zeros(table.batch_size, width, dtype=torch.bool)
            for b in range(table.batch_size):
                view = view_of(table, b, table.rules.token_budget, predicted_query[b], layer, num_layers, scale)
                wanted[b, : view.num_pages] = self.policy.keep(view).any(dim=0)
        missing = wanted & ~table.on_device_mask(wanted.shape[1])
        seqs = missing.any(dim=1).nonzero().flatten().tolist()  # only sequences missing pages go on
        if not seqs:
            return
        room = self.residency.make_room(table, seqs, wanted[seqs], missing[seqs].sum(dim=1))
        requests = []
        missing_rows, score_rows = missing[seqs].tolist(), table.scores[seqs].tolist()
        for b, free, row, score in zip(seqs, room, missing_rows, score_rows):
            pages = [p for p, m in enumerate(row) if m]
            # Most critical first when room is short, then the newer page.
            pages.sort(key=lambda p: (-score[p], -p))
            chosen = pages[: max(0, free)]
            requests.append((b, chosen))
            table.issued[b, chosen] = True
            table.counters.prefetch_issued_pages += len(chosen)
        self.residency.issue_many(table, requests)  # one copy batch for the whole batch
