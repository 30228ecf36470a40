"""The store's side of policies: value sums for SparQ, drops, merged pages, per-head masks in a run."""

from __future__ import annotations

import torch

from tests.store.conftest import H, HKV, D, SCALE, Reference, make_store, step


def test_value_sums_follow_appends_crops_and_beam_reorders_for_sparq_only():
    gen = torch.Generator().manual_seed(0)
    store, request, table = make_store(2, 120, slack_slots=2, mode="sparse", policy="sparq", token_budget=16)
    ref = Reference(2)
    step(store, request, ref, gen, 2, 37, pad=[0, 5])
    for _ in range(6):
        query = torch.randn(2, H, 1, D, generator=gen)
        keys, values = torch.randn(2, HKV, 1, D, generator=gen), torch.randn(2, HKV, 1, D, generator=gen)
        store.attend(request, 0, query, keys, values, torch.ones(2, 1, dtype=torch.bool), SCALE)
        for b in range(2):
            ref.values[b] = torch.cat([ref.values[b], values[b]], dim=1)
    for b in range(2):
        torch.testing.assert_close(table.value_sum[b], ref.values[b].sum(dim=1), rtol=1e-5, atol=1e-4)
    store.residency.complete_copies(table)
    table.crop(1, 21)
    torch.testing.assert_close(table.value_sum[1], ref.values[1][:, :21].sum(dim=1), rtol=1e-5, atol=1e-4)
    table.select(torch.tensor([1, 1]))
    torch.testing.assert_close(table.value_sum[0], ref.values[1][:, :21].sum(dim=1), rtol=1e-5, atol=1e-4)
    _, other, other_table = make_store(1, 40, mode="sparse", policy="tova")
    assert other_table.value_sum is None  # other policies do not pay for it
