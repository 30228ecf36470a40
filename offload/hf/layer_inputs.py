"""The hooks speculation needs from the model: each decoder layer's input on decode steps, and its
residual stream right after attention (before the MLP), where the next layer's query is best
predicted while there is still the MLP's time to copy its pages."""

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


def after_attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The module of a decoder layer whose input is the residual stream after attention, or None:
    Gemma's `pre_feedforward_layernorm` (its post-attention norm acts on the attention output),
    else the Llama-style `post_attention_layernorm`."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm"):
        module = getattr(layer, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


class LayerInputs:
    """Hooks keeping, for the current decode step, each decoder layer's input (hidden states,
    rotary cos/sin) and its residual after attention (`after`); prefill activations are not kept
    (no speculation, no activation kept alive). When a layer's residual after attention is
    captured, `on_after_attention(idx)` runs (the cache speculates the next layer there).

    The residual is trusted only when the module holding it runs after the layer's attention:
    a parallel-residual layer normalises its input for the MLP beside attention, and there the
    capture is switched off (`has_after` False) for good."""

    def __init__(self, layers) -> None:
        self.layers = layers
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.on_after_attention = None  # callable(layer index), set by the model wrapper
        self._handles = [
            layer.register_forward_pre_hook(partial(self._capture, idx), with_kwargs=True)
            for idx, layer in enumerate(layers)
        ]
        modules = [after_attention_module(layer) for layer in layers]
        self.has_after = all(m is not None for m in modules)
        self._attended: set[int] = set()
        if self.has_after:
            for idx, (layer, module) in enumerate(zip(layers, modules)):
                self._handles.append(layer.self_attn.register_forward_hook(partial(self._attention_ran, idx)))
                self._handles.append(module.register_forward_pre_hook(partial(self._capture_after, idx)))

    def _attention_ran(self, idx: int, module, args, output) -> None:
        self._attended.add(idx)

    def _capture_after(self, idx: int, module, args) -> None:
        hidden = args[0] if args else None
        if idx not in self._attended:  # this norm ran before attention: not the residual after it
            self.has_after = False
        self._attended.discard(idx)
        if not self.has_after or hidden is None or hidden.shape[1] > MAX_DECODE_QUERY or idx not in self.inputs:
            self.after.pop(idx, None)
            return
        self.after[idx] = hidden
        if self.on_after_attention is not None:
            self.on_after_attention(idx)

    def _capture(self, idx: int, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.shape[1] > MAX_DECODE_QUERY:
            self.inputs.pop(idx, None)
            self.after.pop(idx, None)
            return
        self.inputs[idx] = (hidden, kwargs.get("position_embeddings"))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.inputs.clear()
        self.after.clear()
