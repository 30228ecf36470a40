"""offload: decode Hugging Face causal LMs over KV caches larger than accelerator memory."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first use: a process that needs only the store (a remote lender) does not pay for
# transformers.
_EXPORTS = {
    "OffloadConfig": "offload.config",
    "OffloadCache": "offload.hf.cache",
    "OffloadedModel": "offload.model",
    "OffloadStats": "offload.stats",
}

if TYPE_CHECKING:
    from offload.config import OffloadConfig
    from offload.hf.cache import OffloadCache
    from offload.model import OffloadedModel
    from offload.stats import OffloadStats


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offload' has no attribute {name!r}")


__all__ = ["OffloadConfig", "OffloadCache", "OffloadedModel", "OffloadStats"]
__version__ = "0.1.0"
