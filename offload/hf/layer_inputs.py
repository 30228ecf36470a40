"""The one hook speculation needs from the model: each decoder layer's input on decode steps."""

from __future__ import annotations

import sys
from functools import partial

import torch

from offload.store.planner import MAX_DECODE_QUERY


def decoder_layers(model: torch.nn.Module):
    """The model's decoder layers if they have the Llama-style parts prediction needs, else None."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        return None
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if not (hasattr(layer, "input_layernorm") and callable(getattr(attn, "q_proj", None)) and hasattr(attn, "head_dim")):
            return None
        if not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
            return None
    return layers


class LayerInputs:
    """Forward pre-hooks keeping each decoder layer's input (hidden states, rotary cos/sin) of the
    current decode step; prefill inputs are not kept (no speculation, no activation kept alive)."""

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
            self.inputs.pop(idx, None)
            return
        self.inputs[idx] = (hidden, kwargs.get("position_embeddings"))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.inputs.clear()
