"""InfiniGen-style query prediction: the residual stream changes slowly between layers, so
layer l's input, passed through layer l+1's input norm and q_proj and rotated at the current
positions, predicts layer l+1's query. The store scores its pages with that prediction and
prefetches the likely-critical ones while layer l computes.
"""

from __future__ import annotations

import sys

import torch


class QueryPredictor:
    """Predicts a layer's query from another layer's captured input (`hf.layer_inputs.LayerInputs`)."""

    def __init__(self, layers, captured) -> None:
        self.layers = layers
        self.captured = captured  # .inputs: layer -> (hidden [B, T, hidden], (cos, sin) or None)

    @torch.inference_mode()
    def predict(self, src_layer: int, dst_layer: int) -> torch.Tensor | None:
        """Predicted query [B, H, T, D] of `dst_layer` from the input of `src_layer`, or None."""
        captured = self.captured.inputs.get(src_layer)
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
