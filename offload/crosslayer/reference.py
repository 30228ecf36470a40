"""Cross-layer KV sharing run by transformers itself: the slow, obvious reference of the store's path.

Inside `shared_kv_attention(model, sharing)` the (unwrapped) model attends with an attention
function that, for a consumer layer, swaps the keys and values it was handed for the ones its
producer was handed earlier in the same forward pass. With a transformers cache those are all the
producer's stored tokens plus the new ones; without, the whole sequence. The consumer's queries,
mask and scale are its own, so this is "layer c attends layer p's KV" and nothing else; the
attention itself is transformers' sdpa.

KVSharer's search (`kvsharer.py`) scores candidate maps with it, and the tests compare
`OffloadedModel(kv_sharing=...)` against it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

REFERENCE_ATTN = "offload_shared_kv_reference"


@contextmanager
def shared_kv_attention(model: torch.nn.Module, sharing: Mapping[int, int]) -> Iterator[None]:
    """Run `model` with `sharing` (consumer -> producer) for the duration of the block; undone on exit.

    Consumers still compute (and, with a cache, store) their own K/V; only attention ignores them."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    sharing = dict(sharing)
    producers = set(sharing.values())
    handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # producer -> K, V of this forward pass

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        layer = module.layer_idx
        if layer in sharing:
            if sharing[layer] not in handed:
                raise RuntimeError(f"layer {layer} reads layer {sharing[layer]}'s KV, which has not run yet")
            key, value = handed[sharing[layer]]
        elif layer in producers:
            handed[layer] = (key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    if REFERENCE_ATTN in AttentionInterface._global_mapping:
        raise RuntimeError("shared_kv_attention blocks cannot be nested")
    original = model.config._attn_implementation
    AttentionInterface.register(REFERENCE_ATTN, attention)
    AttentionMaskInterface.register(REFERENCE_ATTN, sdpa_mask)
    model.config._attn_implementation = REFERENCE_ATTN
    try:
        yield
    finally:
        model.config._attn_implementation = original
        AttentionInterface._global_mapping.pop(REFERENCE_ATTN, None)
        AttentionMaskInterface._global_mapping.pop(REFERENCE_ATTN, None)
        handed.clear()
