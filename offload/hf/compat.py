"""Which models offload can run exactly, decided when a model is wrapped.

Two checks, so that no model runs silently wrong:

1. `config_problems`: features a model's config declares that the runtime does not implement
   (cross-layer KV sharing, layers that mix attention with their own state, bidirectional
   attention). Each is named with what to do. (Soft-capping, sinks, sliding
   windows, attention chunks, and recurrent or conv layers beside attention are implemented.)
2. `probe`: a short forward pass through the wrapped model, compared with the same model
   unwrapped. Whatever the config does not say (a custom mask, an attention modifier, a cache the
   model manages itself) shows up as an error or a difference in the logits, and the wrapper
   refuses, naming what went wrong.

The attention and mask functions (`hf/attention.py`) refuse any modifier they do not implement as
well, so a model that passes both checks still cannot use one silently on longer inputs.
"""

from __future__ import annotations

import torch

from offload.hf.layers import STATE_KINDS, STORE_KINDS, cache_layer_types, iterates_prompt, text_config

PROBE_TOKENS = 24
# Logits of the wrapped and the unwrapped model on the probe may differ by float rounding only:
# this much relative to the logits' scale, in the model's dtype.
PROBE_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class UnsupportedModel(TypeError):
    """The wrapped model uses something offload does not implement; it would run wrong, so it is refused."""


def config_problems(model) -> list[str]:
    """What the model's config declares that offload cannot run exactly (empty: nothing)."""
    text = text_config(model.config)
    problems = []
    shared = getattr(text, "num_kv_shared_layers", None)
    if shared and not getattr(text, "kv_sharing_modes", None):
        problems.append(f"cross-layer KV sharing (num_kv_shared_layers={shared}) without kv_sharing_modes to say which "
                        "layer reads which")
    types = cache_layer_types(model.config)[0]
    other = sorted({t for t in types if t not in STORE_KINDS and t not in STATE_KINDS})
    if other:
        problems.append(
            f"cache layers of kind {', '.join(other)} (attention with its own state or compression) that offload's "
            "store does not implement"
        )
    if not any(t in STORE_KINDS for t in types):
        problems.append("no attention layer keeps a KV cache: there is nothing to offload")
    if getattr(text, "is_causal", True) is False:
        problems.append("the model attends bidirectionally (is_causal=False); offload implements causal attention")
    return problems


def check_config(model) -> None:
    problems = config_problems(model)
    if problems:
        raise UnsupportedModel(_message(model, problems))


def probe(model, run_wrapped, unwrap, rewrap) -> None:
    """Compare a short forward of the wrapped model (`run_wrapped(ids)` -> logits) with the
    unwrapped one; raise UnsupportedModel on an error or a difference beyond rounding."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, max(4, min(vocab, 1000)), (1, probe_length(model)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    unwrap()
    try:
        with torch.inference_mode():
            if iterates_prompt(model.config):  # its prompt is iterated: prefill and decode as the wrapper does
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                expected = torch.cat([model(ids[:, :-1], past_key_values=cache, use_cache=True).logits,
                                      model(ids[:, -1:], past_key_values=cache, use_cache=True).logits], dim=1).float()
            else:
                expected = model(ids).logits.float()
        if expected.shape[:2] != ids.shape:
            raise ValueError(f"logits of shape {tuple(expected.shape)} for {tuple(ids.shape)} tokens")
    except Exception as exc:  # the model does not run plainly either: not ours to judge
        rewrap()
        raise UnsupportedModel(_message(model, [f"it does not run a plain forward pass ({type(exc).__name__}: {exc})"])) from exc
    rewrap()
    try:
        got = run_wrapped(ids).float()
    except NotImplementedError as exc:
        raise UnsupportedModel(_message(model, [str(exc)])) from exc
    except Exception as exc:
        raise UnsupportedModel(_message(
            model, [f"its attention does not go through offload's cache as expected ({type(exc).__name__}: {exc})"]
        )) from exc
    scale = float(expected.abs().max()) or 1.0
    rtol = PROBE_RTOL.get(next(model.parameters()).dtype, 1e-4)
    diff = float((got - expected).abs().max())
    if not diff <= rtol * scale:  # also catches NaN
        raise UnsupportedModel(_message(model, [
            f"its logits through offload differ from the model's own by {diff:.3g} (scale {scale:.3g}) on a "
            f"{PROBE_TOKENS}-token probe: it uses an attention feature offload does not implement"
        ]))


def probe_length(model) -> int:
    """PROBE_TOKENS, or fewer where a window, a chunk or the positions are shorter (within them the
    model's attention is full attention, which is what the probe compares)."""
    text = text_config(model.config)
    limits = [getattr(text, f, None) for f in ("sliding_window", "attention_chunk_size", "max_position_embeddings")]
    return max(2, min([PROBE_TOKENS] + [int(x) for x in limits if isinstance(x, int) and x > 0]))


def _message(model, problems: list[str]) -> str:
    family = getattr(text_config(model.config), "model_type", None) or type(model).__name__
    return (
        f"{type(model).__name__} ({family}) cannot run exactly under offload: " + "; ".join(problems)
        + ". Run it unwrapped (outputs would differ, so offload refuses rather than run it silently wrong)."
    )
