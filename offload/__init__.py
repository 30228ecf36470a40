"""offload: decode Hugging Face causal LMs over KV caches larger than accelerator memory."""

from offload.config import OffloadConfig

__all__ = ["OffloadConfig"]
__version__ = "0.1.0"
