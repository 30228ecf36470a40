"""The "offload" attention and mask functions, registered with transformers while a model is wrapped.

transformers calls `past_key_values.update(k, v, layer_idx)` and then the registered attention
function. `OffloadCache.update` only stages the new K/V; the attention function takes them back,
together with the padding mask, and runs the split attention of the layer's store.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_NAME = "offload"

_active = threading.local()  # weak reference to the cache whose update() ran last on this thread
_registrations = 0
_registration_lock = threading.Lock()


def set_active_cache(cache) -> None:
    _active.cache = weakref.ref(cache)  # never what keeps a cache (and its pages) alive


def offload_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D]; key/value [B, H_kv, T, D] (the new tokens); returns ([B, T, H, D], None)."""
    ref = getattr(_active, "cache", None)
    cache = ref() if ref is not None else None
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or layer_idx is None or not cache.has_staged(layer_idx):
        raise RuntimeError(
            "attn_implementation='offload' needs an OffloadCache as past_key_values; "
            "call the model through OffloadedModel (or pass OffloadedModel.new_cache(...))"
        )
    if dropout and module.training:
        raise ValueError("offload attention is for inference; dropout must be 0 (call model.eval())")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.attend(layer_idx, query, key, value, attention_mask, scale)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def offload_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Hand the 2D padding mask [B, kv_length] (True = real token) through to the attention function.

    Without a registered mask function transformers drops the padding mask for custom attention.
    """
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def register() -> None:
    global _registrations
    with _registration_lock:
        if _registrations == 0:
            AttentionInterface.register(ATTN_NAME, offload_attention)
            AttentionMaskInterface.register(ATTN_NAME, offload_mask)
        _registrations += 1


def unregister() -> None:
    global _registrations
    with _registration_lock:
        if _registrations == 0:
            return
        _registrations -= 1
        if _registrations == 0:
            AttentionInterface._global_mapping.pop(ATTN_NAME, None)
            AttentionMaskInterface._global_mapping.pop(ATTN_NAME, None)


def is_registered() -> bool:
    return ATTN_NAME in AttentionInterface._global_mapping or ATTN_NAME in AttentionMaskInterface._global_mapping


@contextmanager
def registered() -> Iterator[None]:
    register()
    try:
        yield
    finally:
        unregister()
