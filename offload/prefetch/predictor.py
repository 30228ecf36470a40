"""InfiniGen-style query prediction: the residual stream changes slowly between layers, so a
residual of layer l, passed through layer l+1's input norm and q_proj and rotated at the current
positions, predicts layer l+1's query. The store scores its pages with that prediction and
prefetches the likely-critical ones while layer l computes.

Two residuals serve: layer l's input (InfiniGen's choice: the copies overlap all of layer l),
and layer l's residual right after its attention, which misses only layer l's MLP. On the
embedded model the second predicts the next layer's pages far better (at 4k: 0.65-0.89 of
the real selection against 0.23-0.71), and the MLP's time is enough to copy a step's few new
pages, so it is used wherever the model's layers expose it (`LayerInputs.has_after`).

Prediction only decides what is copied early, never what is attended: if a model's attention
does something this predictor does not mirror and it fails, it logs once and stops, and
speculation falls back to the previous step's queries.
"""

from __future__ import annotations

import logging
import sys

import torch

logger = logging.getLogger("offload")


class QueryPredictor:
    """Predicts a layer's query from another layer's captured input (`hf.layer_inputs.LayerInputs`)."""

    def __init__(self, layers, captured) -> None:
        self.layers = layers
        self.captured = captured  # .inputs: layer -> (hidden [B, T, hidden], (cos, sin) or None)
        self.failed: str | None = None

    @property
    def after_attention(self) -> bool:
        """Whether predictions come from a layer's residual after attention (else from its input)."""
        return self.failed is None and self.captured.has_after

    @torch.inference_mode()
    def predict(self, src_layer: int, dst_layer: int, after_attention: bool = True) -> torch.Tensor | None:
        """Predicted query [B, H, T, D] of `dst_layer` from a residual of `src_layer`: after its
        attention when captured (and `after_attention`), else its input; or None."""
        if self.failed is not None:
            return None
        captured = self.captured.inputs.get(src_layer)
        if captured is None or captured[1] is None:
            return None
        after = self.captured.after.get(src_layer) if after_attention and self.captured.has_after else None
        if after is not None:
            captured = (after, captured[1])
        try:
            return self._predict(captured, self.layers[dst_layer])
        except Exception as exc:  # a layout this predictor does not mirror: stop predicting, stay correct
            self.failed = f"{type(exc).__name__}: {exc}"
            logger.warning("query prediction failed (%s); prefetch falls back to the previous step's queries",
                           self.failed)
            return None

    @staticmethod
    def _predict(captured, layer) -> torch.Tensor:
        hidden, (cos, sin) = captured
        attn = layer.self_attn
        query = attn.q_proj(layer.input_layernorm(hidden))
        q_norm = getattr(attn, "q_norm", None)
        head_dim = attn.head_dim
        if q_norm is not None and getattr(q_norm, "weight", None) is not None and q_norm.weight.numel() != head_dim:
            query = q_norm(query)  # OLMo-style: one norm over the whole projection, before the head split
            q_norm = None
        query = query.view(*hidden.shape[:-1], -1, head_dim)
        if q_norm is not None:  # Qwen3-style per-head query norm
            query = q_norm(query)
        query = query.transpose(1, 2)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        rotary = cos.shape[-1]
        try:
            query, _ = rotate(query, query, cos, sin)  # the model's own rotation (some take half-width cos)
            return query
        except RuntimeError:
            if rotary >= head_dim:
                raise
        # Partial rotary (Phi, StableLM): the model turns only the first `rotary` dimensions.
        turned, _ = rotate(query[..., :rotary], query[..., :rotary], cos, sin)
        return torch.cat([turned, query[..., rotary:]], dim=-1)
