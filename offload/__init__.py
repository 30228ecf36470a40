"""offload: decode Hugging Face causal LMs over KV caches larger than accelerator memory."""

from offload.config import OffloadConfig
from offload.hf.cache import OffloadCache
from offload.model import OffloadedModel
from offload.stats import OffloadStats

__all__ = ["OffloadConfig", "OffloadCache", "OffloadedModel", "OffloadStats"]
__version__ = "0.1.0"
