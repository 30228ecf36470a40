"""Policies by name, each one small class in its own file.

`OffloadConfig.policy` names the KV policy (which pages a decode query attends, and with
effect="drop" which pages are kept at all); `.selector` (speculation's page ranking), `.scorer`,
`.device_eviction` and `.prefix_eviction` name the residency strategies. The registries below
map names to classes, so a new policy is one file and one line here.
"""

from __future__ import annotations

from offload.policies.attention_mass import AttentionMassScorer
from offload.policies.base import (EvictionCandidates, EvictionOrder, Interpolation, KVPolicy, PageScorer, PageSelector,
                                   StepView, keep_order)
from offload.policies.criticality import CriticalityOrder
from offload.policies.d2o import D2OPolicy
from offload.policies.fastgen import FastGenPolicy
from offload.policies.h2o import H2OPolicy
from offload.policies.kvmerger import KVMergerPolicy
from offload.policies.lru import LRUOrder
from offload.policies.oracle import OraclePolicy
from offload.policies.pyramidkv import PyramidKVPolicy
from offload.policies.quest import QuestPolicy, QuestSelector
from offload.policies.snapkv import SnapKVPolicy
from offload.policies.sparq import SparQPolicy
from offload.policies.streaming import StreamingPolicy
from offload.policies.tova import TOVAPolicy
from offload.policies.window import WindowPolicy

SELECTORS: dict[str, type[PageSelector]] = {cls.name: cls for cls in (QuestSelector,)}
SCORERS: dict[str, type[PageScorer]] = {cls.name: cls for cls in (AttentionMassScorer,)}
EVICTION_ORDERS: dict[str, type[EvictionOrder]] = {cls.name: cls for cls in (CriticalityOrder, LRUOrder)}
POLICIES: dict[str, type[KVPolicy]] = {cls.name: cls for cls in (
    QuestPolicy, WindowPolicy, StreamingPolicy, H2OPolicy, TOVAPolicy, SnapKVPolicy, PyramidKVPolicy, FastGenPolicy,
    SparQPolicy, OraclePolicy, KVMergerPolicy, D2OPolicy)}
EFFECTS = ("demote", "drop")


def make_policy(config) -> KVPolicy:
    return POLICIES[config.policy](config)


def make_selector(name: str) -> PageSelector:
    return SELECTORS[name]()


def make_scorer(name: str, decay: float) -> PageScorer:
    cls = SCORERS[name]
    return cls(decay) if cls is AttentionMassScorer else cls()


def make_eviction_order(name: str) -> EvictionOrder:
    return EVICTION_ORDERS[name]()


__all__ = [
    "SELECTORS", "SCORERS", "EVICTION_ORDERS", "POLICIES", "EFFECTS", "make_selector", "make_scorer",
    "make_eviction_order", "make_policy", "PageSelector", "PageScorer", "EvictionOrder", "EvictionCandidates",
    "keep_order", "KVPolicy", "StepView", "Interpolation",
]
