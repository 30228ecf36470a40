"""`make demo` / `python -m offload.demo [MODEL_DIR]`: generate with the KV cache over budget.

Without a path, builds a small Llama-architecture model from a config (random weights, no
download), prefills a long prompt whose KV cache is ~10x the device budget, and generates in
exact and sparse mode, comparing each against the same model without offloading.
With a path to a local transformers model directory, does the same on that model.
"""

from __future__ import annotations

import argparse
import time

import torch

from offload import OffloadConfig, OffloadedModel
from offload.sizes import format_bytes


def embedded_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval()


def load(path: str | None):
    if path is None:
        return embedded_model(), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def kv_bytes(model, num_tokens: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem * num_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="local transformers model directory (default: embedded model)")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget-fraction", type=float, default=0.1, help="device budget as a share of the KV cache")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (1, args.prompt_tokens))
    total = args.prompt_tokens + args.new_tokens
    kv = kv_bytes(model, total)
    print(f"model: {args.model or 'embedded Llama (4 layers, 8 heads / 2 KV heads, random weights)'}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new; full KV cache {format_bytes(kv)}")

    start = time.perf_counter()
    with torch.inference_mode():
        reference = model.generate(input_ids, max_new_tokens=args.new_tokens, do_sample=False)
    ref_s = time.perf_counter() - start
    ref_new = reference[0, args.prompt_tokens :]

    for mode in ("exact", "sparse"):
        base = OffloadConfig.from_env(mode=mode)
        om = OffloadedModel(model, base)
        minimum = om.minimum_device_budget(1, total)
        om.config.device_budget = max(minimum, int(args.budget_fraction * kv))
        om.config.token_budget = min(om.config.token_budget, max(64, args.prompt_tokens // 8))
        print(f"\n=== mode={mode} ===")
        print(f"config: {om.config}")
        start = time.perf_counter()
        out = om.generate(input_ids, max_new_tokens=args.new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
        om.unwrap()
        new = out[0, args.prompt_tokens :]
        shown = tokenizer.decode(new) if tokenizer is not None else new.tolist()
        print(f"generated: {shown}")
        print(om.stats)
        same = int((new == ref_new[: len(new)]).sum()) if len(new) == len(ref_new) else 0
        verdict = "identical tokens" if torch.equal(new, ref_new) else f"{same}/{len(ref_new)} tokens agree"
        print(f"vs. the same model without offloading: {verdict} "
              f"(offloaded {elapsed:.2f} s, full cache {ref_s:.2f} s, device budget "
              f"{format_bytes(om.config.device_budget)} = {100 * om.config.device_budget / kv:.0f}% of the KV cache)")
        if mode == "exact" and not torch.equal(new, ref_new):
            raise SystemExit("exact mode diverged from the full cache: this is a bug, please report it")


if __name__ == "__main__":
    main()
