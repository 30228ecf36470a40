"""`make demo` / `python -m offload.demo [MODEL_DIR]`: generate with the KV cache far over budget.

By default, uses the embedded model (`offload/models/weights/`, trained by
`python -m offload.models.train`): a pass key hidden anywhere in a long context of filler, the
KV cache 5x the device budget, answered in exact and in sparse mode, each compared with the
same model and its full cache. With a path to a local transformers model directory, runs the
same comparison on a random prompt for that model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from offload import OffloadConfig, OffloadedModel
from offload.quality import kv_bytes
from offload.sizes import format_bytes


def needle_prompt(tokenizer, context_tokens: int, seed: int):
    """The embedded tasks' pass-key sample: (prompt ids [1, T], answer ids [n], context length:
    the prompt's tokens before the question)."""
    from offload.models import tasks

    sample = tasks.eval_sample("passkey", context_tokens, np.random.default_rng(seed))
    _, start, end = sample.answers[0]
    return (torch.from_numpy(sample.input_ids[None, :start].copy()), torch.from_numpy(sample.input_ids[start:end].copy()),
            sample.context_end)


def load(path: str | None):
    """(model, tokenizer, name, embedded?)"""
    if path is None:
        from offload.models.embedded import load_embedded_model

        model, tokenizer = load_embedded_model()
        return model, tokenizer, "embedded model (offload/models/weights, see MODEL_CARD.md)", True
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, path, False


def fit_prompt(model, prompt_tokens: int, new_tokens: int) -> int:
    """The prompt length to use: at most what the model has positions for (and, while offload
    supports sliding-window layers only within their window, at most the window)."""
    from offload.hf.layers import text_config

    text = text_config(model.config)
    limits = {"max_position_embeddings": getattr(text, "max_position_embeddings", None)}
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False:
        limits["sliding_window"] = text.sliding_window
    fitted = prompt_tokens
    for name, limit in limits.items():
        if limit is not None and fitted + new_tokens > limit:
            fitted = limit - new_tokens
            print(f"note: the prompt is shortened to {fitted} tokens to fit the model's {name}={limit}")
    if fitted < 1:
        raise SystemExit(f"--new-tokens {new_tokens} leaves no room for a prompt in this model ({limits})")
    return fitted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="local transformers model directory (default: the embedded model)")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate for a model directory")
    parser.add_argument("--budget-fraction", type=float, default=0.2, help="device budget as a share of the KV cache")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    model, tokenizer, name, embedded = load(args.model)
    if embedded:
        prompt, answer, context_end = needle_prompt(tokenizer, args.prompt_tokens, args.seed)
        new_tokens = len(answer)
        question = tokenizer.decode(prompt[0, -12:].tolist())
        print(f"model: {name}")
        print(f"task: a pass key hidden in {prompt.shape[1]} tokens of filler; the prompt ends '... {question}'")
        print(f"expected answer: {tokenizer.decode(answer.tolist())}")
        print("strict protocol: the context is prefilled first; the question then goes through the KV policy "
              "as a decode step, so the answer depends on what the policy kept")
    else:
        prompt_tokens = fit_prompt(model, args.prompt_tokens, args.new_tokens)
        torch.manual_seed(args.seed)
        prompt = torch.randint(3, model.config.vocab_size, (1, prompt_tokens))
        new_tokens, answer, context_end = args.new_tokens, None, None
        print(f"model: {name}; random prompt of {prompt.shape[1]} tokens, {new_tokens} new")
    total = prompt.shape[1] + new_tokens
    kv = kv_bytes(model, total)
    print(f"full KV cache: {format_bytes(kv)}")

    def show(ids: torch.Tensor) -> str:
        return tokenizer.decode(ids.tolist()) if tokenizer is not None else str(ids.tolist())

    start = time.perf_counter()
    with torch.inference_mode():
        reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)
    ref_s = time.perf_counter() - start
    ref_new = reference[0, prompt.shape[1] :]
    print(f"full cache answer: {show(ref_new)}" + ("" if answer is None else f" ({'right' if torch.equal(ref_new, answer) else 'wrong'})"))

    for mode in ("exact", "sparse"):
        om = OffloadedModel(model, OffloadConfig.from_env(mode=mode))
        minimum = om.minimum_device_budget(1, total)
        om.config.device_budget = max(minimum, int(args.budget_fraction * kv))
        print(f"\n=== mode={mode} ===")
        print(f"config: {om.config}")
        start = time.perf_counter()
        cache = None
        if context_end is not None:  # strict: the context alone first, then the question as a decode step
            cache = om.new_cache(1, total)
            with torch.inference_mode():
                om(prompt[:, :context_end], past_key_values=cache)
        out = om.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, past_key_values=cache)
        elapsed = time.perf_counter() - start
        om.unwrap()
        new = out[0, prompt.shape[1] :]
        verdict = "" if answer is None else f" ({'right' if torch.equal(new, answer) else 'wrong'})"
        print(f"answer: {show(new)}{verdict}")
        print(om.stats)
        same = "identical tokens" if torch.equal(new, ref_new) else f"{int((new == ref_new).sum())}/{len(ref_new)} tokens agree"
        print(f"vs. the same model with its full cache: {same} (offloaded {elapsed:.2f} s, full cache {ref_s:.2f} s; "
              f"device budget {format_bytes(om.config.device_budget)} = {100 * om.config.device_budget / kv:.0f}% of the KV cache)")
        if mode == "exact" and not torch.equal(new, ref_new):
            raise SystemExit("exact mode diverged from the full cache: this is a bug, please report it")


if __name__ == "__main__":
    main()
