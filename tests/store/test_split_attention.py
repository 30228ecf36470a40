"""`SplitAttention.run` on a plan: output and per-page attention mass against naive references."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from offload.store import split_attention
from offload.store.planner import MAX_DECODE_QUERY, OBSERVATION_WINDOW, plan
from tests.reference import naive_attention
from tests.store.conftest import HKV, SCALE, D, H, Reference, make_store, step


def _naive_page_mass(ref: Reference, query, keys, page_size, max_pages, observe):
    """[B, max_pages + 1]: softmax mass of the last `observe` rows per page, over every stored key."""
    bsz = query.shape[0]
    mass = torch.zeros(bsz, max_pages + 1, dtype=torch.float64)
    for b in range(bsz):
        k = torch.cat([ref.keys[b], keys[b]], dim=1)  # [H_kv, T, D]
        old, new = ref.keys[b].shape[1], keys.shape[2]
        scores = torch.einsum("hqd,htd->hqt", query[b].double(), k.double().repeat_interleave(H // HKV, 0)) * SCALE
        visible = torch.arange(k.shape[1])[None, :] <= (old + torch.arange(new))[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)[:, new - observe :]
        per_key = probs.sum(dim=(0, 1))
        mass[b].index_add_(0, torch.arange(k.shape[1]) // page_size, per_key)
    return mass


@pytest.mark.parametrize("host_worker", [False, True])
@pytest.mark.parametrize("device_path", ["paged", "gathered"])
@pytest.mark.parametrize("new_tokens", [1, 5, 40])
@pytest.mark.parametrize("page_size", [1, 4, 5])
def test_run_gives_exact_output_and_page_mass(new_tokens, page_size, device_path, host_worker, monkeypatch):
    # On the CPU the device part attends resident pages with the paged kernel in place; when that
    # kernel fails it gathers them for the torch path: both exact, masses included. The host part
    # runs inline on the CPU and on a worker thread with an accelerator: both paths are run here.
    if device_path == "gathered":
        def failing(*args, **kwargs):
            raise RuntimeError("injected device-part kernel failure")

        monkeypatch.setattr(split_attention, "attend_pages", failing)
    gen = torch.Generator().manual_seed(new_tokens * 10 + page_size)
    store, request, table = make_store(2, 120, page_size=page_size, slack_slots=2)
    assert store.runner.executor is None  # (the CPU is the device here)
    if host_worker:
        store.runner.executor = store.executor = ThreadPoolExecutor(max_workers=1)  # (closed with the store)
    ref = Reference(2)
    step(store, request, ref, gen, 2, 57, pad=[0, 3])  # some pages resident, most on the host
    store.residency.complete_copies(table)
    query = torch.randn(2, H, new_tokens, D, generator=gen)
    keys = torch.randn(2, HKV, new_tokens, D, generator=gen)
    values = torch.randn(2, HKV, new_tokens, D, generator=gen)
    valid = torch.ones(2, new_tokens, dtype=torch.bool)
    layer_plan = plan(table, valid, None, decode=new_tokens <= MAX_DECODE_QUERY)
    assert int(layer_plan.host_counts.sum()) > 0, "the host part must be exercised"
    lengths, read_before = list(table.length), table.counters.device_read_bytes
    result = store.runner.run(layer_plan, table, query, keys, values, SCALE)
    if new_tokens == 1 and device_path == "paged":  # decode: the tails and new tokens joined the paged call
        pool, ps = table.device_pool, table.layout.page_size
        assert table.length == lengths  # written past the stored length: nothing stored yet
        for b in range(2):
            torch.testing.assert_close(pool.keys[table.tail_slot[b], :, lengths[b] % ps], keys[b, :, 0], atol=0, rtol=0)
        resident = sum(len(table.resident_pages(b)) for b in range(2))
        tokens = resident * ps + sum(n % ps + 1 for n in lengths)
        assert table.counters.device_read_bytes - read_before == tokens * table.layout.page_bytes // ps
    observe = min(new_tokens, OBSERVATION_WINDOW)
    expected_mass = _naive_page_mass(ref, query, keys, page_size, table.max_pages, observe)
    expected = ref.attend(query, keys, values, valid, SCALE)
    torch.testing.assert_close(result.out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.page_mass.double()[:, : table.max_pages], expected_mass[:, : table.max_pages],
                               rtol=1e-4, atol=1e-4)
    assert float(result.page_mass[:, -1].abs().sum()) == 0.0  # the spare column collects nothing
    assert table.counters.failed_kernels == (1 if device_path == "gathered" else 0)
    store.close()


@pytest.mark.parametrize("page_size", [4, 5])
def test_per_head_selections_mask_each_kv_head_to_its_own_pages(page_size):
    """KV heads attending different pages: every attended page goes through the device part
    (resident or read there), masked per head; out matches naive attention per head."""
    gen = torch.Generator().manual_seed(page_size)
    store, request, table = make_store(2, 120, page_size=page_size, slack_slots=2, mode="sparse")
    ref = Reference(2)
    step(store, request, ref, gen, 2, 57, pad=[0, 3])
    store.residency.complete_copies(table)
    query = torch.randn(2, H, 1, D, generator=gen)
    keys = torch.randn(2, HKV, 1, D, generator=gen)
    values = torch.randn(2, HKV, 1, D, generator=gen)
    valid = torch.ones(2, 1, dtype=torch.bool)
    head_keep = torch.zeros(2, HKV, table.max_pages, dtype=torch.bool)
    head_keep[:, 0, [0, 2, 5]] = True
    head_keep[:, 1, [1, 2, 7]] = True
    attend = head_keep.any(dim=1)
    layer_plan = plan(table, valid, attend, True, head_keep=head_keep)
    assert int(layer_plan.host_counts.sum()) == 0 and layer_plan.gather_ids is not None
    assert table.counters.gathered_bytes > 0
    out = store.runner.run(layer_plan, table, query, keys, values, SCALE).out
    group = H // HKV
    for b in range(2):
        k = torch.cat([ref.keys[b], keys[b]], dim=1)
        v = torch.cat([ref.values[b], values[b]], dim=1)
        n = table.num_complete(b)
        page = torch.arange(k.shape[1]) // page_size
        for h in range(HKV):
            seen = (page >= n) | head_keep[b, h, page.clamp(max=table.max_pages - 1)]
            expected = naive_attention(query[b : b + 1, h * group : (h + 1) * group], k[None, h : h + 1],
                                       v[None, h : h + 1], seen[None, None, :], SCALE)
            torch.testing.assert_close(out[b : b + 1, h * group : (h + 1) * group].double(), expected,
                                       rtol=1e-5, atol=1e-5)
