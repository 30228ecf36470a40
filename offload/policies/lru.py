"""Least recently used first (SGLang's `LRUStrategy`): the prefix cache's default order."""

from __future__ import annotations

import torch

from offload.policies.base import EvictionCandidates, EvictionOrder


class LRUOrder(EvictionOrder):
    name = "lru"

    def priority(self, c: EvictionCandidates) -> torch.Tensor:
        return c.last_access
