"""How a transformers model's decoder layers map onto offload's store, read from its config.

Which layers keep KV in the store (attention, possibly windowed or chunked) and which keep their
own state in transformers' cache layer classes (recurrent, conv, attention-free), the KV layout
the store pages, each store layer's sliding window or attention chunk, which layers read another
layer's KV (cross-layer sharing), and whether attention is latent (MLA). Nothing here holds state.
"""

from __future__ import annotations

import torch

from offload.store.layout import KVLayout


def text_config(model_config):
    """The decoder's config (multimodal configs nest it; text-only ones are it)."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


# transformers' cache layer types (cache_utils.DYNAMIC_LAYER_TYPE_MAPPING) offload's store serves,
# and those whose state stays in transformers' own layer classes (recurrent, conv, no attention).
STORE_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
STATE_KINDS = ("conv", "linear_attention", "dummy")


def cache_layer_types(model_config, kv_sharing: dict[int, int] | None = None) -> tuple[list[str], list[dict]]:
    """Per decoder layer, transformers' cache layer type and its init kwargs (as DynamicCache builds them).
    With `kv_sharing` (consumer -> producer, `OffloadConfig.kv_sharing`), consumers are "dummy"
    layers that keep nothing, as transformers makes a config's own "reuse" layers."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = text_config(model_config)
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except Exception:  # a config transformers' helper cannot read: full attention, as the config says
        n = text.num_hidden_layers
        types, kwargs = list(getattr(text, "layer_types", None) or ["full_attention"] * n), [{} for _ in range(n)]
    if kv_sharing:
        types = ["dummy" if i in kv_sharing else t for i, t in enumerate(types)]
        kwargs = [{} if i in kv_sharing else kw for i, kw in enumerate(kwargs)]
    return types, kwargs


def attention_layers(model_config, kv_sharing: dict[int, int] | None = None) -> list[int]:
    """Decoder layers whose KV the store keeps (the others keep their state in the cache itself, or
    read another layer's KV)."""
    return [i for i, t in enumerate(cache_layer_types(model_config, kv_sharing)[0]) if t in STORE_KINDS]


def has_layer_state(model_config) -> bool:
    """Layers with recurrent or conv state: their state after a prefix depends on all of it, so
    prefixes cannot be reused from KV pages alone."""
    return any(t in ("conv", "linear_attention") for t in cache_layer_types(model_config)[0])


def iterates_prompt(model_config) -> bool:
    """Layers attend a later layer's KV (`kv_source_layers`, top and middle targets of cross-layer
    sharing): the model computes a prompt by iterating over it, so its KV depends on how the prompt
    is split into forward passes, and pages cannot be rebuilt from a prefix's tokens alone."""
    declared = getattr(text_config(model_config), "kv_source_layers", None) or []
    return any(j > i for i, j in enumerate(declared))


def prefills_whole(model_config) -> bool:
    """The model's KV after a prompt depends on computing the prompt in one forward (layer state, or
    an iterated prompt): no chunked prefill, no prefix reuse, no tier that rebuilds pages from tokens."""
    return has_layer_state(model_config) or iterates_prompt(model_config)


def kv_sources(model_config, kv_sharing: dict[int, int] | None = None) -> dict[int, int]:
    """Cross-layer KV sharing: each consumer layer -> the layer whose KV it reads.

    Declared by the config: per layer, the layer whose KV it attends (`kv_source_layers`, offload's
    `SharedKVLlamaConfig`), or (Gemma 3n, Gemma 4: `kv_sharing_modes`) each "reuse" layer reads the last
    "store" layer of the same layer type before it. Or given by `kv_sharing` (`OffloadConfig.kv_sharing`,
    already parsed) for a model that declares none: checked against the model here."""
    text = text_config(model_config)
    modes = getattr(text, "kv_sharing_modes", None)
    declared = getattr(text, "kv_source_layers", None)
    if kv_sharing:
        if modes and "reuse" in modes:
            raise ValueError(
                f"kv_sharing={kv_sharing} (OFFLOAD_KV_SHARING) was given for a model whose config declares its own "
                "cross-layer KV sharing (kv_sharing_modes), which offload follows; the two cannot be combined: "
                "unset kv_sharing")
        return configured_sources(model_config, kv_sharing)
    if declared is not None:
        return {i: j for i, j in enumerate(declared) if j != i}
    if not modes:
        return {}
    types = getattr(text, "layer_types", None) or ["full_attention"] * len(modes)
    last_store: dict[str, int] = {}
    sources = {}
    for i, (mode, kind) in enumerate(zip(modes, types)):
        if mode == "store":
            last_store[kind] = i
        elif mode == "reuse":
            if kind not in last_store:
                raise ValueError(f"layer {i} reuses the KV of a {kind} layer, but no earlier {kind} layer stores one")
            sources[i] = last_store[kind]
    return sources


def configured_sources(model_config, kv_sharing: dict[int, int]) -> dict[int, int]:
    """`kv_sharing` checked against the model: both layers exist and are attention layers whose KV the
    store keeps, of the same kind (layer type, sliding window, attention chunk), so the consumer's mask
    is the producer's. Raises ValueError naming the pair and the rule."""
    types, kwargs = cache_layer_types(model_config)
    for consumer, producer in kv_sharing.items():
        for layer in (consumer, producer):
            if layer >= len(types):
                raise ValueError(f"kv_sharing (OFFLOAD_KV_SHARING) pair {consumer}:{producer}: the model has "
                                 f"{len(types)} decoder layers (0..{len(types) - 1}), no layer {layer}")
            if types[layer] not in STORE_KINDS:
                raise ValueError(f"kv_sharing (OFFLOAD_KV_SHARING) pair {consumer}:{producer}: layer {layer} is a "
                                 f"{types[layer]!r} layer, not an attention layer with a KV cache")
        if (types[consumer], kwargs[consumer]) != (types[producer], kwargs[producer]):
            raise ValueError(
                f"kv_sharing (OFFLOAD_KV_SHARING) pair {consumer}:{producer}: layer {consumer} is {types[consumer]} "
                f"{kwargs[consumer] or ''} and layer {producer} is {types[producer]} {kwargs[producer] or ''}; a "
                "consumer must read a layer of the same kind (same window or chunk), whose KV spans what it attends")
    return dict(kv_sharing)


def is_latent_attention(model_config) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): the model caches compressed latents
    and hands attention per-head keys and values of different head sizes, expanded per token."""
    text = text_config(model_config)
    return getattr(text, "kv_lora_rank", None) is not None and getattr(text, "v_head_dim", None) is not None


def layout_from_model_config(model_config, page_size: int, dtype: torch.dtype,
                             kv_sharing: dict[int, int] | None = None) -> KVLayout:
    text = text_config(model_config)
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    if is_latent_attention(model_config):
        # The store keeps the expanded keys and values attention receives: one per query head, the
        # shorter of the two zero-padded to the longer (q.k and the output are unchanged).
        qk_dim = text.qk_nope_head_dim + text.qk_rope_head_dim
        num_kv_heads, head_dim = num_heads, max(qk_dim, text.v_head_dim)
    return KVLayout(len(attention_layers(model_config, kv_sharing)), num_kv_heads, head_dim, page_size, dtype)


def layer_windows(model_config, kv_sharing: dict[int, int] | None = None) -> list[int | None]:
    """Per store layer (attention layer): its sliding window, or None."""
    types, kwargs = cache_layer_types(model_config, kv_sharing)
    return [kw.get("sliding_window") if t == "sliding_attention" else None
            for t, kw in zip(types, kwargs) if t in STORE_KINDS]


def layer_chunks(model_config, kv_sharing: dict[int, int] | None = None) -> list[int | None]:
    """Per store layer (attention layer): its attention chunk (chunked attention, Llama 4), or None."""
    types, kwargs = cache_layer_types(model_config, kv_sharing)
    return [kw.get("sliding_window") if t == "chunked_attention" else None
            for t, kw in zip(types, kwargs) if t in STORE_KINDS]
