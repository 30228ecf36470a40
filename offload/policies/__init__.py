"""Policies by name: selectors, scorers and eviction orders, each one small class in its own file.

`OffloadConfig.selector`, `.scorer`, `.device_eviction` and `.prefix_eviction` name them; the
registries below map names to classes, so a new policy is one file and one line here.
"""

from __future__ import annotations

from offload.policies.attention_mass import AttentionMassScorer
from offload.policies.base import EvictionCandidates, EvictionOrder, PageScorer, PageSelector, keep_order
from offload.policies.criticality import CriticalityOrder
from offload.policies.lru import LRUOrder
from offload.policies.quest import QuestSelector

SELECTORS: dict[str, type[PageSelector]] = {cls.name: cls for cls in (QuestSelector,)}
SCORERS: dict[str, type[PageScorer]] = {cls.name: cls for cls in (AttentionMassScorer,)}
EVICTION_ORDERS: dict[str, type[EvictionOrder]] = {cls.name: cls for cls in (CriticalityOrder, LRUOrder)}


def make_selector(name: str) -> PageSelector:
    return SELECTORS[name]()


def make_scorer(name: str, decay: float) -> PageScorer:
    cls = SCORERS[name]
    return cls(decay) if cls is AttentionMassScorer else cls()


def make_eviction_order(name: str) -> EvictionOrder:
    return EVICTION_ORDERS[name]()


__all__ = [
    "SELECTORS", "SCORERS", "EVICTION_ORDERS", "make_selector", "make_scorer", "make_eviction_order",
    "PageSelector", "PageScorer", "EvictionOrder", "EvictionCandidates", "keep_order",
]
