"""Every KV policy through a real model: a budget covering the context gives the unwrapped model's
tokens whatever the policy and effect; exact mode stays exact with any policy; effect="drop"
shrinks the KV footprint by exactly the pages it frees."""

from __future__ import annotations

import pytest
import torch

from offload import OffloadConfig, OffloadedModel
from offload.policies import POLICIES
from tests.conftest import make_batch, tiny_model

GREEDY = dict(do_sample=False, pad_token_id=0, max_new_tokens=10)
LENGTH = 70
EVICTING = sorted(name for name, cls in POLICIES.items() if cls.evicts)


def _generate(model, **config):
    ids, mask = make_batch(2, LENGTH, seed=5)
    with OffloadedModel(model, page_size=8, sink_tokens=8, recent_tokens=16, prefix_cache=False, **config) as om:
        om.config.device_budget = 2 * om.minimum_device_budget(2, LENGTH + GREEDY["max_new_tokens"])
        return om.generate(ids, attention_mask=mask, **GREEDY), om.stats


def _expected(model):
    ids, mask = make_batch(2, LENGTH, seed=5)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **GREEDY)


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_budget_covering_the_context_gives_exact_tokens(name, family):
    model = tiny_model(family)
    effects = ["demote", "drop"] if name in EVICTING else ["demote"]
    for effect in effects:
        tokens, stats = _generate(model, mode="sparse", policy=name, policy_effect=effect, token_budget=4096)
        assert torch.equal(tokens, _expected(model)), (name, effect)
        assert stats.dropped_pages == 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_exact_mode_is_exact_with_any_policy(name):
    model = tiny_model("llama-gqa")
    tokens, stats = _generate(model, mode="exact", policy=name, token_budget=24)
    assert torch.equal(tokens, _expected(model))
    assert stats.pages_resident < stats.pages_total  # the host part attended the rest


@pytest.mark.parametrize("name", EVICTING)
def test_drop_frees_what_the_policy_leaves_and_reports_it(name):
    model = tiny_model("llama-gqa")
    budget = 32  # 4 pages of 8 beside the tail
    tokens, stats = _generate(model, mode="sparse", policy=name, policy_effect="drop", token_budget=budget)
    assert tokens.shape == (2, LENGTH + GREEDY["max_new_tokens"])
    layout_page_bytes = stats.dropped_bytes // max(1, stats.dropped_pages)
    assert stats.dropped_pages > 0
    total_pages = stats.pages_total  # complete pages the request has now (dropped ones included)
    # A merging policy keeps one merged token (1/page_size of the bytes) of every page it dropped.
    pages_bytes = stats.host_bytes - stats.host_reserved_bytes  # (merged tokens' room is held in the host pool)
    if POLICIES[name].merges:
        assert stats.host_reserved_bytes > 0
    merged = stats.kv_bytes - pages_bytes  # merged tokens (kvmerger, d2o)
    if POLICIES[name].merges and not POLICIES[name].binds_merges:
        assert merged == stats.dropped_bytes // 8  # every dropped page left one token (page_size 8)
    elif not POLICIES[name].merges:
        assert merged == 0
    assert stats.kv_bytes + stats.dropped_bytes - merged == total_pages * layout_page_bytes
    for layer in stats.per_layer:
        assert layer["dropped_pages"] > 0
    assert pages_bytes == stats.kv_bytes - merged  # the host pool's pages shrank by exactly what was dropped
    _, demoted = _generate(model, mode="sparse", policy=name, policy_effect="demote", token_budget=budget)
    assert demoted.host_reserved_bytes == stats.host_reserved_bytes
    assert demoted.dropped_pages == 0 and demoted.kv_bytes == demoted.host_bytes - demoted.host_reserved_bytes
    assert demoted.kv_bytes - pages_bytes == stats.dropped_bytes


def test_config_refuses_what_a_policy_cannot_do():
    with pytest.raises(ValueError, match="exact mode cannot"):
        OffloadConfig.from_env({}, policy="tova", policy_effect="drop")
    with pytest.raises(ValueError, match="never evicts"):
        OffloadConfig.from_env({}, mode="sparse", policy="quest", policy_effect="drop")
    with pytest.raises(ValueError, match=r"policy \(OFFLOAD_POLICY\)='nope' is not a policy"):
        OffloadConfig.from_env({"OFFLOAD_POLICY": "nope"})
    with pytest.raises(ValueError, match="is not an effect"):
        OffloadConfig.from_env({}, policy_effect="evict")
    assert OffloadConfig.from_env({"OFFLOAD_POLICY": "TOVA", "OFFLOAD_POLICY_EFFECT": "drop",
                                   "OFFLOAD_MODE": "sparse"}).policy == "tova"


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_decodes_a_padded_batch_at_a_small_budget(name, family):
    model = tiny_model(family)
    tokens, stats = _generate(model, mode="sparse", policy=name, token_budget=24)
    assert tokens.shape == (2, LENGTH + GREEDY["max_new_tokens"])
    assert stats.needed_pages >= 0 and stats.kv_bytes == stats.host_bytes - stats.host_reserved_bytes
    if POLICIES[name].reads_keys:
        assert stats.policy_read_bytes > 0
