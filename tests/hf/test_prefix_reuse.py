"""Prefix reuse, multi-turn continuation and crop through the whole model: the same tokens as the
unwrapped model, with fewer tokens forwarded, exact reference counts and every pool freed."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from transformers import DynamicCache

from offload import OffloadedModel
from offload.hf.layers import layout_from_model_config
from tests.conftest import make_batch, tiny_model

PS = 8
NEW = 5
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
PLAIN = dict(do_sample=False, pad_token_id=0)


def _tokens(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _wrap(model, **kw):
    kw.setdefault("device_budget", "256KiB")
    return OffloadedModel(model, page_size=PS, sink_tokens=8, recent_tokens=16, prefill_chunk=64, **kw)


def _reference(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, **GREEDY, **kw)


class ForwardCounter:
    """Tokens the model forwards, per call of its top-level forward."""

    def __init__(self, model):
        self.tokens = []
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens.append(int(ids.shape[1]))

    def prefill(self):
        """Tokens of the calls that forwarded more than one token (the prefill chunks)."""
        return sum(n for n in self.tokens if n > 1)


def _host_refcounts(om):
    return [list(pool.refcount) for pool in om.store.homes]


def test_second_request_forwards_only_its_new_tokens():
    model = tiny_model("llama-gqa")
    doc = _tokens(203, seed=1)
    first, second = torch.cat([doc, _tokens(20, 2)], 1), torch.cat([doc, _tokens(25, 3)], 1)
    expected = [_reference(model, first), _reference(model, second)]
    om = _wrap(model)
    counter = ForwardCounter(model)
    try:
        assert torch.equal(om.generate(first, **GREEDY), expected[0])
        assert om.stats.prefix_hit_tokens == 0 and counter.prefill() == 223
        gc.collect()
        om.store.release_dead()
        # Only the tree holds the first request's pages now: one reference each, every layer.
        cached = (223 + NEW - 1) // PS  # prompt + generated tokens stored (the last one never is)
        assert om.store.tree.num_pages == cached
        for pool in om.store.homes:
            assert pool.num_used == cached and set(pool.refcount[: pool.num_used]) == {1}
        counter.tokens.clear()
        out = om.generate(second, **GREEDY, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected[1])
        reused = 203  # 25 whole pages, and the 3 document tokens of the next cached page (copied, not shared)
        assert om.stats.prefix_hit_tokens == reused
        assert counter.prefill() == 228 - reused  # only the new tokens went through the model
        shared = set(out.past_key_values.request.tables[0].page_ids[0, : reused // PS].tolist())
        pool = om.store.homes[0]
        assert all(pool.refcount[i] == 2 for i in shared)  # the tree's and the live request's
        # ... and every page of the live request is in the tree too now, so held twice.
        assert sum(r == 2 for r in pool.refcount) == (228 + NEW - 1) // PS
    finally:
        counter.handle.remove()
        om.unwrap()
    cold = _wrap(model, prefix_cache=False)
    try:
        cold.generate(first, **GREEDY)
        assert torch.equal(cold.generate(second, **GREEDY), expected[1])
        assert cold.stats.prefix_hit_tokens == 0 and cold.stats.prefix_cached_pages == 0
        gc.collect()
        cold.store.release_dead()
        assert all(pool.num_used == 0 for pool in cold.store.homes)  # nothing kept, nothing shared
    finally:
        cold.unwrap()


def test_batch_rows_with_a_common_prefix_share_its_pages():
    model = tiny_model("qwen2")
    doc = _tokens(100, seed=4)
    rows = [torch.cat([doc, _tokens(n, 5 + n)], 1) for n in (30, 12, 21)]
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - row.shape[1]:], mask[b, width - row.shape[1]:] = row[0], 1
    expected = _reference(model, ids, attention_mask=mask)
    with _wrap(model) as om:
        out = om.generate(ids, attention_mask=mask, **GREEDY)
        assert torch.equal(out, expected)
        # The common 96 tokens (12 whole pages) were prefilled once, before the batch.
        assert om.stats.prefix_hit_tokens > 0
        assert om.stats.tokens_prefilled < int(mask.sum())


def test_num_return_sequences_stores_the_prompt_once():
    model = tiny_model("llama-gqa")
    prompt = _tokens(120, seed=6)
    kwargs = dict(max_new_tokens=6, do_sample=True, num_return_sequences=8, pad_token_id=0)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)
    host_bytes = {}
    for prefix_cache in (True, False):
        with _wrap(model, prefix_cache=prefix_cache) as om:
            torch.manual_seed(3)
            out = om.generate(prompt, **kwargs, return_dict_in_generate=True)
            assert torch.equal(out.sequences, expected)
            host_bytes[prefix_cache] = om.stats.host_bytes
            page_bytes = om.store.layout.page_bytes * om.store.layout.num_layers
    shared = (120 - 1) // PS  # whole prompt pages before the last prompt token
    own = 8 * ((120 + 6 - 1) // PS - shared)
    assert host_bytes[True] == (shared + own) * page_bytes
    assert host_bytes[False] == 8 * ((120 + 6 - 1) // PS) * page_bytes


def test_beam_search_with_a_cached_prompt_matches():
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 60, seed=7)
    expected = _reference(model, ids, attention_mask=mask, num_beams=3)
    with _wrap(model) as om:
        for _ in range(2):  # cold, then from the cache
            assert torch.equal(om.generate(ids, attention_mask=mask, **GREEDY, num_beams=3), expected)
        assert om.stats.prefix_hit_tokens > 0


def test_five_turns_through_past_key_values_match_dynamic_cache():
    model = tiny_model("llama-gqa")
    turns = [_tokens(n, seed=10 + n) for n in (70, 9, 33, 1, 17)]
    kwargs = dict(**GREEDY, return_dict_in_generate=True)
    expected, ids, cache = [], None, DynamicCache(config=model.config)
    with torch.no_grad():
        for turn in turns:
            ids = turn if ids is None else torch.cat([ids, turn], 1)
            out = model.generate(ids, past_key_values=cache, **kwargs)
            cache, ids = out.past_key_values, out.sequences
            expected.append(ids)
    for prefix_cache in (True, False):
        with _wrap(model, prefix_cache=prefix_cache) as om:
            ids, cache, forwarded = None, None, 0
            for turn, want in zip(turns, expected):
                ids = turn if ids is None else torch.cat([ids, turn], 1)
                out = om.generate(ids, past_key_values=cache, **kwargs)
                assert out.past_key_values is (cache or out.past_key_values)
                cache, ids = out.past_key_values, out.sequences
                assert torch.equal(ids, want)
            # Each turn forwarded only its own tokens and the previous turn's last one.
            assert cache.tokens_prefilled == sum(t.shape[1] for t in turns) + len(turns) - 1


def test_prompt_lookup_decoding_matches():
    model = tiny_model("llama-gqa")
    prompt = torch.randint(3, 12, (1, 150), generator=torch.Generator().manual_seed(8))  # repetitive
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=5)
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)
    with _wrap(model) as om:
        assert torch.equal(om.generate(prompt, **kwargs), expected)


def test_cached_prefixes_are_evicted_lru_under_host_pressure_and_live_pages_never():
    model = tiny_model("llama-gqa")
    prompts = [_tokens(64, seed=20 + i) for i in range(5)]
    expected = [_reference(model, p) for p in prompts]
    more = torch.cat([expected[0], _tokens(3, seed=30)], 1)
    expected_more = _reference(model, more)
    layout = layout_from_model_config(model.config, PS, torch.float32)
    with _wrap(model) as om:
        per_request = (64 + NEW - 1) // PS  # pages one request stores
        # Room for three requests' pages per layer, no more.
        om.config.host_budget = 3 * per_request * layout.page_bytes * layout.num_layers
        live = om.generate(prompts[0], **GREEDY, return_dict_in_generate=True)  # kept alive
        assert torch.equal(live.sequences, expected[0])
        for i in (1, 2):
            assert torch.equal(om.generate(prompts[i], **GREEDY), expected[i])
        gc.collect()
        tree = om.store.tree
        assert tree.match(prompts[1][0].tolist()) and tree.match(prompts[2][0].tolist())
        om.generate(prompts[1], **GREEDY)  # touch 1: now 2 is the least recently used
        gc.collect()
        assert torch.equal(om.generate(prompts[3], **GREEDY), expected[3])
        assert not tree.match(prompts[2][0].tolist()), "the least recently used prefix leaves first"
        assert tree.match(prompts[1][0].tolist())
        # The live request's pages stay, though they are the oldest; it still continues exactly.
        assert len(tree.match(prompts[0][0].tolist())) == 64 // PS
        for home in om.store.homes:
            assert home.host.num_used <= home.host.max_capacity
        out = om.generate(more, past_key_values=live.past_key_values, **GREEDY)
        assert torch.equal(out, expected_more)


def test_close_and_unwrap_free_every_pool():
    model = tiny_model("llama-gqa")
    om = _wrap(model)
    kept = om.generate(_tokens(90, seed=40), **GREEDY, return_dict_in_generate=True)
    om.generate(_tokens(50, seed=41), **GREEDY)
    store = om.store
    assert sum(pool.num_used for pool in store.homes) > 0
    om.close()
    assert all(pool.num_used == 0 for pool in store.homes)
    assert store.tree.num_pages == 0 and not store.requests
    with pytest.raises(ValueError, match="closed store|another OffloadedModel"):
        om.generate(kept.sequences, past_key_values=kept.past_key_values, **GREEDY)
    om.generate(_tokens(30, seed=42), **GREEDY)  # a closed wrapper starts a fresh store
    store = om.store
    om.unwrap()
    assert all(pool.num_used == 0 for pool in store.homes)
    assert om.store is None


def test_dropped_results_release_their_pages():
    model = tiny_model("llama-gqa")
    with _wrap(model, prefix_cache=False) as om:
        for seed in range(5):
            om.generate(_tokens(40, seed=50 + seed), **GREEDY, return_dict_in_generate=True)
        gc.collect()
        om.store.release_dead()
        assert all(pool.num_used == 0 for pool in om.store.homes)
        assert not om.store.requests


def test_a_prefix_hit_of_the_same_shape_finds_its_pages_still_on_the_device():
    model = tiny_model("llama-gqa")
    doc = _tokens(150, seed=60)
    prompts = [torch.cat([doc, _tokens(30, seed=61 + i)], 1) for i in range(2)]
    expected = [_reference(model, p) for p in prompts]
    with _wrap(model) as om:
        assert torch.equal(om.generate(prompts[0], **GREEDY), expected[0])
        assert om.stats.prefix_device_pages == 0
        assert torch.equal(om.generate(prompts[1], **GREEDY), expected[1])  # same length: same pool shape
        stats = om.stats
        assert stats.prefix_device_pages > 0  # the sink pages at least, in every layer
        assert stats.device_peak_bytes <= stats.device_budget_bytes
        om.generate(torch.cat([doc, _tokens(90, seed=63)], 1), **GREEDY)  # another shape: copies dropped
        assert om.stats.prefix_device_pages == 0


def _leaf_paths(tree):
    paths, stack = [], [(tree.root, [])]
    while stack:
        node, toks = stack.pop()
        if not node.children and toks:
            paths.append(toks)
        stack.extend((child, toks + list(key)) for key, child in node.children.items())
    return paths


def test_beam_search_pages_enter_the_tree_under_their_own_tokens():
    """Beams reorder pages and their token ids together: every cached path gives exact reuse."""
    model = tiny_model("llama-gqa")
    reference = copy.deepcopy(model)
    prompt = _tokens(7, seed=5)
    om = OffloadedModel(model, page_size=2, sink_tokens=2, recent_tokens=4, device_budget="256KiB")
    try:
        om.generate(prompt, max_new_tokens=10, num_beams=4, num_return_sequences=4, **PLAIN)
        paths = _leaf_paths(om.store.tree)
        assert len(paths) > 1
        for path in paths:
            ids = torch.tensor([path + [5, 6, 7]])
            with torch.no_grad():
                expected = reference.generate(ids, max_new_tokens=3, **PLAIN)
            assert torch.equal(om.generate(ids, max_new_tokens=3, **PLAIN), expected)
            assert om.stats.prefix_hit_tokens == len(path)
    finally:
        om.unwrap()


def test_assisted_decoding_after_a_prefix_hit_is_exact():
    """Prompt lookup's first forward ignores a cache that already holds the prompt's start: no skip then."""
    model = tiny_model("llama-gqa")
    reference = copy.deepcopy(model)
    doc = _tokens(11, seed=1)
    kwargs = dict(max_new_tokens=4, prompt_lookup_num_tokens=3, output_scores=True, return_dict_in_generate=True,
                  **PLAIN)
    with torch.no_grad():
        expected = reference.generate(doc[:, :3], **kwargs)
    with _wrap(model) as om:
        om.generate(torch.cat([doc, _tokens(5, seed=4)], 1), **PLAIN, max_new_tokens=4)
        got = om.generate(doc[:, :3], **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.scores, expected.scores)) < 1e-4


def test_pages_of_a_padded_plain_forward_never_enter_the_tree():
    """om(ids, mask) positions count padding (the model's own forward); generate's do not."""
    model = tiny_model("llama-gqa")
    ids, mask = make_batch(2, 30, seed=12)
    with _wrap(model) as om:
        cache = om(ids, attention_mask=mask).past_key_values
        more = torch.cat([ids, torch.full((2, 1), 7)], 1)
        om.generate(more, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                    past_key_values=cache, max_new_tokens=2, **PLAIN)
        assert om.store.tree.num_pages == 0
