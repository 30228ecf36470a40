"""The policy matrix: on small constructed views, each policy keeps exactly the pages its
paper's rule says (asserted page ids), within its budget, never a dropped page."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import OffloadConfig
from offload.policies import POLICIES, StepView
from offload.policies.base import BatchView, sinks_and_recent
from offload.policies.pyramidkv import layer_budgets
from offload.policies.sparq import approximate_attention

PS, HKV, G, D = 4, 2, 2, 8
H = HKV * G
SCALE = D ** -0.5


def config(**kw):
    return OffloadConfig.from_env({}, page_size=PS, **kw)


def view(num_pages=10, tail=2, budget=None, *, acc=None, last=None, prompt=None, prompt_length=-1, alive=None,
         query=None, keys=None, layer=0, num_layers=1, sink_pages=1, recent_tokens=0, state=None):
    """A StepView of `num_pages` complete pages and `tail` tail tokens. `budget` in pages (the
    tail's tokens are added). Masses [H_kv, P] default to zero; keys [P * PS + tail, H_kv, D]."""
    length = num_pages * PS + tail
    budget_tokens = (budget if budget is not None else num_pages) * PS + tail
    zeros = torch.zeros(HKV, num_pages)
    gen = torch.Generator().manual_seed(0)
    keys = keys if keys is not None else torch.randn(length, HKV, D, generator=gen)
    pages = keys[: num_pages * PS].reshape(num_pages, PS, HKV, D).transpose(1, 2)  # head-major, as stored
    read = []
    return StepView(
        layer=layer, num_layers=num_layers, num_pages=num_pages, length=length, page_size=PS, budget=budget_tokens,
        sink_pages=sink_pages, recent_tokens=recent_tokens,
        alive=alive if alive is not None else torch.ones(num_pages, dtype=torch.bool),
        query=query if query is not None else torch.randn(H, 1, D, generator=gen),
        key_min=pages.amin(dim=2), key_max=pages.amax(dim=2),
        acc_mass=acc if acc is not None else zeros, last_mass=last if last is not None else zeros,
        prompt_mass=prompt if prompt is not None else zeros, prompt_length=prompt_length,
        state=state if state is not None else {}, scale=SCALE,
        read_keys=lambda idx: pages[idx], tail_keys=keys[num_pages * PS:], charge=read.append,
        mean_values=lambda: torch.zeros(HKV, D),
    )


def kept(keep: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in keep]


def mass(*per_head: dict[int, float], num_pages=10) -> torch.Tensor:
    out = torch.zeros(HKV, num_pages)
    for h, pages in enumerate(per_head):
        for p, m in pages.items():
            out[h, p] = m
    return out


def test_window_keeps_the_newest_pages():
    assert kept(POLICIES["window"](config()).keep(view(budget=4))) == [[6, 7, 8, 9]] * HKV


def test_streaming_keeps_sinks_and_the_newest_pages():
    assert kept(POLICIES["streaming"](config()).keep(view(budget=4, sink_pages=1))) == [[0, 7, 8, 9]] * HKV


def test_h2o_keeps_half_recent_half_heavy_hitters_per_head():
    acc = mass({1: 5.0, 3: 4.0, 9: 9.0}, {2: 3.0, 5: 6.0, 8: 7.0})
    keep = POLICIES["h2o"](config()).keep(view(budget=4, acc=acc))
    assert kept(keep) == [[1, 3, 8, 9], [2, 5, 8, 9]]


def test_tova_keeps_the_pages_the_last_query_attended_most_averaged_over_heads():
    last = mass({0: 0.1, 4: 0.5, 6: 0.2}, {4: 0.1, 2: 0.6, 7: 0.05})
    keep = POLICIES["tova"](config()).keep(view(budget=3, last=last))
    assert kept(keep) == [[2, 4, 6]] * HKV  # summed: 2 -> .6, 4 -> .6, 6 -> .2, 0 -> .1, 7 -> .05


def test_snapkv_keeps_the_window_what_came_after_and_the_prompt_pages_the_window_voted_for():
    # Prompt of 30 tokens (pages 0..6 complete, 7 partial), observation window 8 tokens -> pages >= 5.
    prompt = mass({1: 0.4, 2: 0.1, 3: 0.3}, {0: 0.5, 4: 0.2, 2: 0.3})
    keep = POLICIES["snapkv"](config(observation_window=8)).keep(view(budget=7, prompt=prompt, prompt_length=30))
    assert kept(keep) == [[1, 3, 5, 6, 7, 8, 9], [0, 2, 5, 6, 7, 8, 9]]


def test_snapkv_with_a_budget_below_its_window_keeps_the_newest():
    keep = POLICIES["snapkv"](config(observation_window=8)).keep(view(budget=2, prompt_length=30))
    assert kept(keep) == [[8, 9]] * HKV


def test_pyramidkv_budgets_decrease_with_depth_and_average_the_budget():
    budgets = layer_budgets(100, 4, window=8, beta=20, cap=1000)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 100 > budgets[-1]
    assert sum(budgets) == pytest.approx(400)
    assert budgets[-1] == pytest.approx((100 - 8) / 20 + 8)
    capped = layer_budgets(100, 4, window=8, beta=20, cap=120)
    assert max(capped) <= 120 and sum(capped) == pytest.approx(400)
    assert layer_budgets(500, 4, window=8, beta=20, cap=300) == [300.0] * 4


def test_pyramidkv_gives_the_bottom_layer_more_pages_than_the_top():
    prompt = mass({p: float(p) for p in range(10)}, {p: float(10 - p) for p in range(10)})
    policy = POLICIES["pyramidkv"](config(observation_window=4, pyramid_beta=4))
    sizes = [int(policy.keep(view(num_pages=10, budget=4, prompt=prompt, prompt_length=42, layer=layer,
                                  num_layers=4)).sum(dim=1).max()) for layer in range(4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 4 > sizes[-1]


def test_pyramidkv_splits_the_device_budget_unevenly_too():
    from offload.store import budget
    from offload.store.layout import KVLayout

    layout = KVLayout(4, HKV, D, 16, torch.float32)
    cfg = OffloadConfig.from_env({}, page_size=16, sink_tokens=16, recent_tokens=32, device_budget=1024 * 1024,
                                 policy="pyramidkv")
    even = budget.device_rules(cfg, layout, 2, 4096)
    weights = POLICIES["pyramidkv"](cfg).device_weights(layout.num_layers)
    uneven = budget.device_rules(cfg, layout, 2, 4096, weights=weights)
    slots = [r.slots_per_seq for r in uneven]
    assert slots == sorted(slots, reverse=True) and slots[0] > even[0].slots_per_seq > slots[-1]
    assert min(slots) >= budget.min_slots_per_seq(cfg, 4096)  # sinks + recent window + tail everywhere
    assert budget.device_reserved_bytes(layout, 2, 4096, uneven) <= cfg.device_budget
    assert {r.token_budget for r in uneven} == {even[0].token_budget}  # the policy splits the token budget


def test_fastgen_gives_each_head_the_cheapest_profile_that_recovers_its_attention():
    # Head 0 attends only the first page (special tokens); head 1 the newest pages (local).
    prompt = mass({0: 1.0}, {8: 0.5, 9: 0.5})
    state = {}
    keep = POLICIES["fastgen"](config(fastgen_recovery=0.9)).keep(
        view(budget=4, prompt=prompt, prompt_length=42, sink_pages=1, state=state))
    assert state["fastgen"] == ["special", "local"]
    assert kept(keep) == [[0], [0, 7, 8, 9]]


def test_fastgen_falls_back_to_frequency_when_attention_is_scattered():
    prompt = mass({2: 0.5, 5: 0.5}, {3: 0.5, 6: 0.5})
    acc = prompt.clone()
    state = {}
    keep = POLICIES["fastgen"](config(fastgen_recovery=0.9)).keep(
        view(budget=3, prompt=prompt, acc=acc, prompt_length=42, sink_pages=1, state=state))
    assert state["fastgen"] == ["frequency", "frequency"]
    assert kept(keep) == [[0, 2, 5], [0, 3, 6]]


def _needle_keys(num_pages, tail, needles: dict[int, int]):
    """Keys where KV head h's needle page (needles[h]) matches the query strongly."""
    gen = torch.Generator().manual_seed(1)
    keys = 0.1 * torch.randn(num_pages * PS + tail, HKV, D, generator=gen)
    query = torch.zeros(H, 1, D)
    for h, page in needles.items():
        direction = torch.zeros(D)
        direction[h] = 1.0
        keys[page * PS : (page + 1) * PS, h] += 4 * direction
        query[h * G : (h + 1) * G, 0] = 4 * direction
    return keys, query


def test_oracle_keeps_the_pages_each_head_attends_most():
    keys, query = _needle_keys(10, 2, {0: 3, 1: 6})
    keep = POLICIES["oracle"](config()).keep(view(budget=1, keys=keys, query=query))
    assert kept(keep) == [[3], [6]]


def test_oracle_keeps_quests_sinks_and_recent_pages_then_each_heads_most_attended():
    """Budget 6: at most 3 fixed pages (sink page 0, then the recent window's pages 9, 8), then per
    KV head its 3 pages of most exact mass: the needle first."""
    keys, query = _needle_keys(10, 2, {0: 3, 1: 6})
    keep = POLICIES["oracle"](config()).keep(view(budget=6, keys=keys, query=query, sink_pages=1,
                                                  recent_tokens=2 * PS + 2))
    for head, needle in enumerate((3, 6)):
        pages = kept(keep)[head]
        assert len(pages) == 6 and {0, 8, 9, needle} <= set(pages)


def test_sparq_with_every_component_ranks_like_the_oracle_and_reads_fewer_bytes_with_fewer():
    keys, query = _needle_keys(10, 2, {0: 3, 1: 6})
    full = POLICIES["sparq"](config(sparq_rank=D))
    assert kept(full.keep(view(budget=1, keys=keys, query=query))) == [[3], [6]]
    reads = []
    v = view(budget=1, keys=keys, query=query)
    v.charge = reads.append
    keep = POLICIES["sparq"](config(sparq_rank=1)).keep(v)
    assert kept(keep) == [[3], [6]]  # the needle component is the query's largest
    assert reads == [HKV * 1 * keys.shape[0] * 4]  # one component of every key, per KV head, float32


def test_sparq_approximation_is_exact_with_every_component():
    gen = torch.Generator().manual_seed(2)
    query, keys = torch.randn(H, 3, D, generator=gen), torch.randn(20, HKV, D, generator=gen)
    probs, read = approximate_attention(query, keys, D, SCALE)
    exact = (query @ keys.permute(1, 2, 0).repeat_interleave(G, dim=0) * SCALE).softmax(-1)
    torch.testing.assert_close(probs, exact)
    assert read.tolist() == [D] * HKV


def test_quest_keeps_sinks_recent_window_and_the_highest_bounds():
    keys, query = _needle_keys(10, 2, {0: 3, 1: 6})
    keep = POLICIES["quest"](config()).keep(view(budget=6, keys=keys, query=query, sink_pages=1, recent_tokens=8))
    assert all({0, 3, 6, 8, 9} <= set(row) and len(row) == 6 for row in kept(keep))
    # Sinks and the recent window take at most half the budget; the bound picks the rest.
    keep = POLICIES["quest"](config()).keep(view(budget=4, keys=keys, query=query, sink_pages=1, recent_tokens=8))
    assert kept(keep) == [[0, 3, 6, 9]] * HKV


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_stays_within_budget_and_never_keeps_a_dropped_page(name):
    alive = torch.ones(10, dtype=torch.bool)
    alive[[1, 4, 7]] = False
    gen = torch.Generator().manual_seed(3)
    masses = {k: torch.rand(HKV, 10, generator=gen) * alive for k in ("acc", "last", "prompt")}
    for budget in (0, 1, 3, 6, 20):
        keep = POLICIES[name](config()).keep(view(budget=budget, alive=alive, prompt_length=30, **masses))
        assert keep.shape == (HKV, 10) and keep.dtype == torch.bool
        assert not (keep & ~alive).any()
        assert (keep.sum(dim=1) <= budget).all()
        if budget >= 10:
            assert keep.equal(alive[None].expand(HKV, -1)), "a budget >= the context keeps everything"


def test_kvmerger_keeps_like_h2o():
    acc = mass({1: 5.0, 3: 4.0, 9: 9.0}, {2: 3.0, 5: 6.0, 8: 7.0})
    assert kept(POLICIES["kvmerger"](config()).keep(view(budget=4, acc=acc))) == [[1, 3, 8, 9], [2, 5, 8, 9]]


def test_a_merged_page_of_identical_keys_attends_exactly_like_the_page():
    """One merged token weighing page_size tokens: exact when the page's keys are all alike."""
    import math

    from offload.store.merging import merge_page

    gen = torch.Generator().manual_seed(4)
    key = torch.randn(HKV, D, generator=gen)
    keys, values = key.expand(PS, -1, -1).clone(), torch.randn(PS, HKV, D, generator=gen)
    merged_k, merged_v = merge_page(keys.transpose(0, 1), values.transpose(0, 1))  # a page is [H_kv, PS, D]
    torch.testing.assert_close(merged_k, key)
    torch.testing.assert_close(merged_v, values.mean(dim=0))
    q = torch.randn(HKV, D, generator=gen)
    other_k, other_v = torch.randn(3, HKV, D, generator=gen), torch.randn(3, HKV, D, generator=gen)
    exact_scores = torch.cat([(keys * q).sum(-1), (other_k * q).sum(-1)])  # [PS + 3, H_kv]
    exact = (exact_scores.softmax(0)[..., None] * torch.cat([values, other_v])).sum(0)
    merged_scores = torch.cat([(merged_k * q).sum(-1)[None] + math.log(PS), (other_k * q).sum(-1)])
    approx = (merged_scores.softmax(0)[..., None] * torch.cat([merged_v[None], other_v])).sum(0)
    torch.testing.assert_close(approx, exact)


def test_merge_weights_favour_the_tokens_near_the_pivot():
    from offload.store.merging import merge_page

    keys = torch.zeros(PS, 1, 2)
    keys[:, 0, 0] = 1.0
    keys[-1, 0] = torch.tensor([0.0, 5.0])  # an outlier
    values = torch.arange(PS, dtype=torch.float32)[:, None, None].expand(PS, 1, 2)
    merged_k, merged_v = merge_page(keys.transpose(0, 1), values.transpose(0, 1))  # a page is [H_kv, PS, D]
    assert float(merged_k[0, 1]) < 5.0 / PS  # the outlier weighs less than a plain mean
    assert float(merged_v[0, 0]) < values[:, 0, 0].mean()


def test_d2o_binds_a_leaving_page_to_its_most_similar_kept_page_or_discards_it():
    """Through a store: page 1 (keys like page 3's) merges into kept page 3; page 2 (orthogonal
    keys) is bound nowhere; the bound token is attended only while page 3 is kept."""
    from offload.store.merging import attend_merged, merge_unkept
    from tests.store.conftest import make_store

    store, request, table = make_store(1, 64, page_size=4, mode="sparse", policy="d2o", merge_threshold=0.9)
    with torch.inference_mode():
        keys = torch.zeros(1, 2, 16, 8)
        keys[0, :, 4:8, 0] = 1.0  # page 1
        keys[0, :, 8:12, 1] = 1.0  # page 2
        keys[0, :, 12:16, 0] = 1.0  # page 3, like page 1
        keys[0, :, 0:4, 2] = 1.0  # page 0
        values = torch.randn(1, 2, 16, 8)
        store.attend(request, 0, torch.randn(1, 4, 16, 8), keys, values, torch.ones(1, 16, dtype=torch.bool), 0.3)
        store.residency.complete_copies(table)
        keep = torch.tensor([[True, False, False, True]] * 2)
        merge_unkept(table, [keep], bind_threshold=0.9)
        assert table.merged_into[0, 1].tolist() == [3, 3]
        assert table.merged_into[0, 2].tolist() == [-1, -1]
        query = torch.randn(1, 4, 1, 8)
        assert attend_merged(table, query, [keep], torch.ones(1, 1, dtype=torch.bool), 0.3, binds=True) is not None
        gone = torch.tensor([[True, False, False, False]] * 2)
        assert attend_merged(table, query, [gone], torch.ones(1, 1, dtype=torch.bool), 0.3, binds=True) is None


@pytest.mark.parametrize("margin", [0.0, 4.0])
@pytest.mark.parametrize("recent_tokens", [0, 10])
def test_quest_batched_keep_equals_each_sequences_keep(margin, recent_tokens):
    # Awkward sizes: sequences with 0, 1 and several pages, tails of every length, dropped pages,
    # budgets below and above the sinks + recent window, random resident sets.
    from offload.policies.base import BatchView

    policy = POLICIES["quest"](config(sticky_margin=margin))
    gen = torch.Generator().manual_seed(7)
    for trial in range(12):
        counts = [0, 1, int(torch.randint(2, 14, (1,), generator=gen))][: 1 + trial % 3] + [9, 13]
        tails = [int(torch.randint(0, PS, (1,), generator=gen)) for _ in counts]
        budget = int(torch.randint(1, 12, (1,), generator=gen)) * PS
        width = max(counts)
        query = torch.randn(len(counts), H, 1, D, generator=gen)
        key_min = torch.randn(len(counts), width, HKV, D, generator=gen)
        key_max = key_min + torch.rand(len(counts), width, HKV, D, generator=gen)
        alive = (torch.rand(len(counts), width, generator=gen) > 0.2) & (torch.arange(width)[None, :] < torch.tensor(counts)[:, None])
        resident = (torch.rand(len(counts), width, generator=gen) > 0.5) & alive
        lengths = torch.tensor([n * PS + t for n, t in zip(counts, tails)])
        batch = policy.keep_batch(BatchView(
            num_pages=torch.tensor(counts), length=lengths, page_size=PS, budget=budget, sink_pages=1,
            recent_tokens=recent_tokens, alive=alive, query=query, key_min=key_min, key_max=key_max,
            resident=resident, scale=SCALE))
        for b, n in enumerate(counts):
            one = view(num_pages=n, tail=tails[b], sink_pages=1, recent_tokens=recent_tokens, alive=alive[b, :n],
                       query=query[b])
            one.budget = budget
            one.key_min, one.key_max, one.resident = key_min[b, :n], key_max[b, :n], resident[b, :n]
            assert kept(policy.keep(one))[0] == batch[b, :n].nonzero().flatten().tolist(), (trial, b)
            assert not bool(batch[b, n:].any())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), num_pages=st.integers(0, 12),
       budget=st.integers(0, 60), sink_pages=st.integers(0, 3), recent=st.integers(0, 40))
def test_sinks_and_recent_takes_the_sinks_then_the_newest_alive_window_pages(seed, batch, num_pages, budget,
                                                                            sink_pages, recent):
    """Against the rule written per sequence: the first min(sinks, half the budget) alive pages, then
    the newest alive pages of the recent window until half the page budget is kept."""
    gen = torch.Generator().manual_seed(seed)
    length = torch.randint(num_pages * PS, num_pages * PS + PS, (batch,), generator=gen)
    alive = torch.rand(batch, num_pages, generator=gen) < 0.8
    batch_view = BatchView(num_pages=torch.full((batch,), num_pages), length=length, page_size=PS, budget=budget,
                           sink_pages=sink_pages, recent_tokens=recent, alive=alive, query=torch.zeros(batch, H, 1, D),
                           key_min=None, key_max=None, resident=torch.zeros(batch, num_pages, dtype=torch.bool),
                           scale=SCALE)
    got = sinks_and_recent(batch_view)
    for b in range(batch):
        fixed = max(0, (budget - int(length[b]) % PS) // PS) // 2
        kept = {p for p in range(min(fixed, sink_pages, num_pages)) if alive[b, p]}
        first = max(0, int(length[b]) - recent) // PS if recent else num_pages
        for p in reversed(range(first, num_pages)):
            if len(kept) >= fixed:
                break
            if alive[b, p] and p not in kept:
                kept.add(p)
        assert set(got[b].nonzero().flatten().tolist()) == kept
