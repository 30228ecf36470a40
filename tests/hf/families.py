"""Tiny random-init models of every `*ForCausalLM` in the installed transformers, and the one check
the runtime owes each: wrapping either refuses with a reason, or exact mode gives the unwrapped
model's tokens (and logits within 1e-4). Used by tests/hf/test_families.py and to regenerate the
README's family table (`python -m tests.hf.families --markdown`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import warnings

import torch

# Small sizes for every config field that exists; chosen so heads * head_dim == hidden_size.
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=1024, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=32,
    first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, sliding_window=64, attention_chunk_size=64, num_kv_shared_layers=1,
    d_model=64, n_embd=64, n_head=4, n_layer=2, n_positions=1024, num_layers=2, ffn_hidden_size=128,
    decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=2, encoder_attention_heads=4,
    encoder_ffn_dim=128, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
    ssm_state_size=8, expert_interval=1, attn_layer_period=2, attn_layer_offset=1, is_decoder=True,
    vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    rotary_dim=8, full_attention_interval=2,
)
PROMPT, NEW = 200, 24
MAX_PARAMS = 5_000_000


@dataclasses.dataclass
class Outcome:
    family: str
    model_class: str
    result: str  # "exact", "refused", "mismatch", "crash", "unbuildable"
    detail: str = ""


def causal_lm_families() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted((k, v) for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if v.endswith("ForCausalLM"))


def tiny(family: str, model_class: str, **overrides):
    import transformers
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = config_cls()
        accepted = set(inspect.signature(config_cls.__init__).parameters)
        kwargs = {k: v for k, v in {**SMALL, **overrides}.items() if hasattr(default, k) or k in accepted}
        if "kv_lora_rank" in kwargs and "head_dim" in kwargs and "head_dim" not in overrides:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # latent attention: the rotary part's size
        config = config_cls(**kwargs)
        model_cls = getattr(transformers, model_class)
        with torch.device("meta"):  # size it first: a config these fields do not shrink stays huge
            size = sum(p.numel() for p in model_cls(config).parameters())
        if size > MAX_PARAMS:
            raise ValueError(f"the tiny config still has {size / 1e6:.0f}M parameters (fields not shrunk)")
        torch.manual_seed(0)
        model = model_cls(config).eval()
    return model


def check(family: str, model_class: str, page_size: int = 16) -> Outcome:
    from offload import OffloadedModel

    try:
        model = tiny(family, model_class)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(3, min(vocab, 1000), (1, PROMPT), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref_logits = model(ids).logits
            ref = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    except Exception as exc:  # the test harness cannot build or run it unwrapped: not the runtime's case
        return Outcome(family, model_class, "unbuildable", f"{type(exc).__name__}: {str(exc)[:160]}")
    try:
        om = OffloadedModel(model, page_size=page_size, sink_tokens=16, recent_tokens=32, prefill_chunk=64)
    except (TypeError, ValueError) as exc:
        return Outcome(family, model_class, "refused", str(exc)[:300])
    try:
        om.config.device_budget = 2 * om.minimum_device_budget(1, PROMPT + NEW)  # most pages on the host
        logits = om(ids).logits
        out = om.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    except (TypeError, ValueError, NotImplementedError) as exc:
        return Outcome(family, model_class, "refused", f"{type(exc).__name__}: {str(exc)[:300]}")
    except Exception as exc:
        return Outcome(family, model_class, "crash", f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        om.unwrap()
    diff = float((logits - ref_logits).abs().max())
    if torch.equal(out, ref) and diff <= 1e-4:
        return Outcome(family, model_class, "exact", f"max logit difference {diff:.1e}")
    agree = int((out[0, PROMPT:] == ref[0, PROMPT:]).sum())
    return Outcome(family, model_class, "mismatch", f"{agree}/{NEW} tokens agree, max logit difference {diff:.2e}")


# Refusal messages -> the feature, in a few words (first match wins).
REASONS = [
    ("does not route attention through", "attention not routed through transformers' AttentionInterface"),
    ("attends with sliding_window", "a sliding window its config declares but its attention applies otherwise"),
    ("sliding-window", "sliding-window layers, context beyond the window"),
    ("chunked attention", "chunked attention, context beyond one chunk"),
    ("soft-capping", "attention logit soft-capping"),
    ("multi-head latent attention", "multi-head latent attention (K and V head sizes differ)"),
    ("cross-layer KV sharing", "cross-layer KV sharing"),
    ("cache layers of kind", "layers that mix attention with their own state or compression"),
    ("no attention layer keeps a KV cache", "no attention layer: nothing to offload (pure recurrent)"),
    ("4D attention mask", "a 4D attention mask the model builds itself"),
    ("bidirectional", "bidirectional attention"),
    ("custom pattern", "a custom attention-mask pattern"),
    ("does not go through offload's cache", "attention outside the cache protocol (its own KV handling)"),
    ("differ from the model's own", "outputs differ on the wrap-time probe"),
]


def reason(outcome: Outcome) -> str:
    for needle, short in REASONS:
        if needle in outcome.detail:
            return short
    return "other: " + re.sub(r"0x[0-9a-f]+", "0x…", outcome.detail)[:80]


def summary_markdown(outcomes: list[Outcome]) -> str:
    """The README's table: families per outcome (refusals grouped by the feature named)."""
    groups: dict[str, list[str]] = {}
    for o in outcomes:
        key = {"exact": "**exact**: tokens identical, logits within 1e-4",
               "unbuildable": "not tested: this harness's tiny config does not build"}.get(o.result)
        groups.setdefault(key or f"refused when wrapped or at the first call: {reason(o)}", []).append(o.family)
    order = sorted(groups, key=lambda k: (not k.startswith("**exact"), k.startswith("not tested"), k))
    rows = ["| under offload | families |", "|---|---|"]
    rows += [f"| {key} ({len(groups[key])}) | {', '.join(groups[key])} |" for key in order]
    return "\n".join(rows) + "\n"


def full_markdown(outcomes: list[Outcome]) -> str:
    rows = ["| family | model class | under offload | why |", "|---|---|---|---|"]
    for o in outcomes:
        why = {"exact": "", "unbuildable": re.sub(r"0x[0-9a-f]+", "0x…", o.detail)[:100]}.get(o.result, reason(o))
        rows.append(f"| {o.family} | `{o.model_class}` | {o.result} | {why} |")
    return "\n".join(rows) + "\n"


def all_outcomes() -> list[Outcome]:
    return [check(family, cls) for family, cls in causal_lm_families()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--markdown", action="store_true", help="print the README table and the full table")
    args = parser.parse_args()
    if args.markdown:
        outcomes = all_outcomes()
        print(summary_markdown(outcomes))
        print(full_markdown(outcomes))
        return
    for family, cls in causal_lm_families():
        if args.only and family not in args.only:
            continue
        o = check(family, cls)
        print(f"{o.result:12s} {family:28s} {cls:40s} {o.detail}", flush=True)


if __name__ == "__main__":
    main()
