"""The "offload" attention and mask functions, registered with transformers while a model is wrapped.

transformers calls `past_key_values.update(k, v, layer_idx)` and then the registered attention
function. `OffloadCache.update` only stages the new K/V; the attention function takes them back,
together with the padding mask, and runs the split attention of the layer's store.
"""

from __future__ import annotations

import inspect
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


def active_cache():
    """The cache whose step runs on this thread, or None."""
    ref = getattr(_active, "cache", None)
    return ref() if ref is not None else None


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
    cache = active_cache()
    layer_idx = getattr(module, "layer_idx", None)
    shared = cache is not None and layer_idx is not None and cache.is_consumer(layer_idx)
    if cache is None or layer_idx is None or not (shared or cache.has_staged(layer_idx)):
        raise RuntimeError(
            "attn_implementation='offload' needs an OffloadCache as past_key_values; "
            "call the model through OffloadedModel (or pass OffloadedModel.new_cache(...))"
        )
    if dropout and module.training:
        raise ValueError("offload attention is for inference; dropout must be 0 (call model.eval())")
    refusal = getattr(attention_mask, "offload_refusal", None)
    if refusal is not None:
        raise NotImplementedError(
            f"{refusal}; offload attends full causal attention over every stored token, so outputs would differ: "
            "it refuses"
        )
    check_modifiers(type(module).__name__, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    window = kwargs.get("sliding_window") or getattr(attention_mask, "offload_window", None)
    chunk = getattr(attention_mask, "offload_chunk", None)
    if shared:  # this layer reads another layer's KV (cross-layer sharing): attend it, store nothing
        out, lse = cache.attend_shared(layer_idx, query, key, scale, window=window, chunk=chunk,
                                       softcap=kwargs.get("softcap"))
    else:
        out, lse = cache.attend(layer_idx, query, key, value, attention_mask, scale, window=window, chunk=chunk,
                                softcap=kwargs.get("softcap"))
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Learned attention sinks (GPT-OSS): one more logit per head in the softmax's denominator,
    with a zero value. Merged as one more partial by log-sum-exp: out [B, H, T, D], lse [B, H, T],
    sinks [H]. Rows with no key keep only the sink: zeros."""
    sink = sinks.detach().float().reshape(1, -1, 1).to(lse.device)
    weight = torch.exp(lse - torch.logaddexp(lse, sink)).nan_to_num(0.0)  # share of the keys against the sink
    return out * weight.unsqueeze(-1)


# Arguments of transformers' attention functions that change the result. Each is implemented
# (sinks above; softcap, sliding_window in the cache) or refused here: none is ever ignored.
def check_modifiers(module_name: str, kwargs: dict) -> None:
    """Sliding windows are checked by the cache, against the window its store keeps for the layer."""
    refused = {
        "position_bias": "an additive position bias (T5/relative-position style)",
        "indices": "sparse attention over indexed tokens (DeepSeek sparse attention)",
        "block_indices": "block-sparse attention",
    }
    for name, feature in refused.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{module_name} uses {feature} ({name}={_short(kwargs[name])}), which offload does not implement; "
                "outputs would differ from the model's, so it refuses. Use the unwrapped model."
            )
    if kwargs.get("is_causal") is False:
        raise NotImplementedError(f"{module_name} attends bidirectionally (is_causal=False); offload implements causal attention only")


def _short(value) -> str:
    return f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


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
    The attention here is causal over every stored token, so a mask function that says otherwise
    (chunked attention, a sliding window beyond its size, bidirectional spans, packed sequences)
    is refused rather than ignored.
    """
    problem = _mask_problem(mask_function, kv_offset + kv_length)
    if problem is not None:
        # Refused only if a layer attends with it: models also build masks they do not use
        # (a decoder's cross-attention mask without an encoder).
        refused = torch.zeros(0, dtype=torch.bool)
        refused.offload_refusal = f"this model's attention mask {problem}"
        return refused
    window = _mask_span(mask_function, "sliding_window_overlay.", "sliding_window")
    chunk = _mask_span(mask_function, "chunked_overlay.", "chunk_size")
    if attention_mask is None and window is None and chunk is None:
        return None
    if attention_mask is None:
        mask = torch.ones(batch_size, kv_length, dtype=torch.bool)
    else:
        mask = attention_mask[:, -kv_length:].to(torch.bool)
    if window is not None:
        mask.offload_window = window  # the layers given this mask attend a sliding window
    if chunk is not None:
        mask.offload_chunk = chunk  # ... or their own chunk only
    return mask


def _mask_span(fn, overlay: str, field: str) -> int | None:
    """The span of a transformers mask function's overlay (`sliding_window_overlay.` ->
    sliding_window, `chunked_overlay.` -> chunk_size), looking inside and_masks; None if it has none."""
    name = getattr(fn, "__qualname__", "")
    if not inspect.isfunction(fn):
        return None
    cells = inspect.getclosurevars(fn).nonlocals
    if name.startswith(overlay):
        return cells.get(field)
    if name.startswith("and_masks."):
        spans = [w for w in (_mask_span(part, overlay, field) for part in cells.get("mask_functions", ())) if w is not None]
        return min(spans) if spans else None
    return None


def _mask_problem(fn, tokens: int) -> str | None:
    """None if `fn` (a transformers mask function, possibly and_masks of several) allows exactly
    the causal pattern over `tokens` keys; else what it does instead."""
    from transformers.masking_utils import causal_mask_function

    if fn is None or fn is causal_mask_function:
        return None
    name = getattr(fn, "__qualname__", type(fn).__name__)
    cells = inspect.getclosurevars(fn).nonlocals if inspect.isfunction(fn) else {}
    if name.startswith("and_masks."):
        for part in cells.get("mask_functions", ()):
            problem = _mask_problem(part, tokens)
            if problem is not None:
                return problem
        return None
    if name.startswith("padding_mask_function."):
        return None  # the 2D padding mask, which the cache applies
    if name.startswith("sliding_window_overlay."):
        return None if isinstance(cells.get("sliding_window"), int) else f"has a sliding window of unknown size ({name})"
    if name.startswith("chunked_overlay."):
        return None if isinstance(cells.get("chunk_size"), int) else f"has an attention chunk of unknown size ({name})"
    return f"is a custom pattern ({name}: bidirectional spans, packed sequences or another one)"


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
