"""InfiniGen-style query prediction: the residual stream changes slowly between layers, so
layer l's input, passed through layer l+1's input norm and q_proj and rotated at the current
positions, predicts layer l+1's query. The store scores its pages with that prediction and
prefetches the likely-critical ones while layer l computes.
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from offload.store.layer_store import MAX_DECODE_QUERY


def decoder_layers(model: torch.nn.Module):
    """The model's decoder layers if they have the Llama-style parts prediction needs, else None."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        return None
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if not (hasattr(layer, "input_layernorm") and hasattr(attn, "q_proj") and hasattr(attn, "head_dim")):
            return None
        if not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
            return None
    return layers


class QueryPredictor:
    """Captures each decoder layer's input on decode steps and predicts the next layer's query."""

    def __init__(self, layers) -> None:
        self.layers = layers
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._handles = [
            layer.register_forward_pre_hook(partial(self._capture, idx), with_kwargs=True)
            for idx, layer in enumerate(layers)
        ]

    def _capture(self, idx: int, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.shape[1] > MAX_DECODE_QUERY:
            self.inputs.pop(idx, None)  # prefill: no speculation, and no activation kept alive
            return
        self.inputs[idx] = (hidden, kwargs.get("position_embeddings"))

    @torch.inference_mode()
    def predict(self, src_layer: int, dst_layer: int) -> torch.Tensor | None:
        """Predicted query [B, H, T, D] of `dst_layer` from the input of `src_layer`, or None."""
        captured = self.inputs.get(src_layer)
        if captured is None or captured[1] is None:
            return None
        hidden, (cos, sin) = captured
        layer = self.layers[dst_layer]
        attn = layer.self_attn
        query = attn.q_proj(layer.input_layernorm(hidden))
        query = query.view(*hidden.shape[:-1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head query norm
            query = attn.q_norm(query)
        query = query.transpose(1, 2)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        query, _ = rotate(query, query, cos, sin)
        return query

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.inputs.clear()
