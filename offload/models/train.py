"""Train the embedded default model: `python -m offload.models.train [--out DIR]`.

A small Llama (GQA, word-level vocabulary of `offload.models.tasks`) learns passkey retrieval,
multi-query associative recall, copying, multi-hop variable tracking and vote counting from
code-generated data, on the CPU, in about half an hour on one thread. Everything is seeded: the same command gives the same data and, with the same
torch build and thread count, the same weights.

Two things make long contexts affordable here:

- a curriculum over length (`PHASES`): the first steps are 64-token sequences, half of them
  pure induction samples (a random span, then the span again), where attention is cheap and
  the lookup circuit forms; later phases double the length up to 4096 tokens;
- positional skips (PoSE, Zhu et al. 2023): half the sequences jump their position ids forward
  by a random gap at a random point, so relative distances up to `--max-position` are trained
  while sequences stay short, and evaluation at 4096 tokens sees no unseen rotary angle.

The loss is the mean cross-entropy on task tokens (answers and the fixed words of needles and
questions) plus `--filler-weight` times the mean on filler tokens, so long filler does not drown
the few answer tokens. After training, the model is saved with its tokenizer, evaluated with the
full cache on seeded samples, and `MODEL_CARD.md` is written beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from offload.models import tasks
from offload.models.embedded import TOKENIZER_FILE, WEIGHTS_DIR, WordTokenizer, evaluate_tasks, task_accuracy

MARKER_FILLER = 0.1  # `training_sample` marks filler tokens with this weight (task tokens: 1.0)


@dataclass(frozen=True)
class Phase:
    seq_len: int  # tokens per sequence
    batch_size: int  # sequences per step
    steps: int
    induction_share: float = 0.25  # share of `tasks.induction_sample` sequences


# ~4k tokens per step; short sequences first (see the module docstring). At 64 tokens with half
# the sequences pure induction samples the lookup circuit forms in ~400-600 steps; at 128
# tokens without them it had not formed after 1500 (docs/training.md). The long phases are the
# longer recipe (600 at 2048 and 300 at 4096 instead of 400 and 150: passkey 95% -> 100% at
# 4096), and the short ones got extra steps for vartrack and aggregate.
PHASES = (
    Phase(64, 64, 1000, induction_share=0.5),
    Phase(128, 32, 400),
    Phase(256, 16, 600),
    Phase(512, 8, 600),
    Phase(1024, 4, 400),
    Phase(2048, 2, 600),
    Phase(4096, 1, 300),
)
SMOKE_PHASES = (Phase(64, 64, 700, induction_share=0.5), Phase(256, 16, 20), Phase(1024, 4, 5))
# The cross-layer sharing study (issue 11, docs/crosslayer.md): a dozen models side by side on this
# CPU, so a shorter curriculum up to 512 tokens; the lookup circuit still forms in the first phase.
STUDY_PHASES = (
    Phase(64, 64, 1000, induction_share=0.5),
    Phase(128, 32, 200),
    Phase(256, 16, 200),
    Phase(512, 8, 200),
)
RECIPES = {"default": PHASES, "study": STUDY_PHASES, "smoke": SMOKE_PHASES}


def model_config(vocab_size: int, rope_theta: float, max_position: int, num_layers: int = 4,
                 kv_sharing: str | None = None, kv_layers: int | None = None, forward_passes: int = 2,
                 backward_passes: int = 1):
    """The embedded architecture with `num_layers` layers: a `LlamaConfig`, or with `kv_sharing`
    ("pizza-top", ...: `offload.models.shared_kv.framework_map` with `kv_layers` KV layers, default
    half the layers) a `SharedKVLlamaConfig`."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_position,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=True,
        bos_token_id=tasks.BOS_ID, eos_token_id=tasks.TOKEN_ID["</s>"], pad_token_id=tasks.TOKEN_ID["<unk>"],
        rms_norm_eps=1e-5, initializer_range=0.02,
    )
    if kv_sharing is None:
        return LlamaConfig(**fields)
    from offload.models.shared_kv import SharedKVLlamaConfig, parse_configuration

    partition, target = parse_configuration(kv_sharing)
    sources = framework_map_for(num_layers, partition, target, kv_layers)
    return SharedKVLlamaConfig(**fields, kv_source_layers=sources, forward_passes=forward_passes,
                               backward_passes=backward_passes)


def framework_map_for(num_layers: int, partition: str, target: str, kv_layers: int | None) -> list[int]:
    from offload.models.shared_kv import framework_map

    return framework_map(num_layers, partition, target, kv_layers if kv_layers is not None else num_layers // 2)


def make_batch(phase: Phase, rng: np.random.Generator, skip_prob: float, max_position: int):
    """`(input_ids [B, T], position_ids [B, T], weights [B, T])` of fresh training samples."""
    samples = [tasks.induction_sample(phase.seq_len, rng, filler_weight=MARKER_FILLER)
               if rng.random() < phase.induction_share else
               tasks.training_sample(phase.seq_len, rng, filler_weight=MARKER_FILLER)
               for _ in range(phase.batch_size)]
    input_ids = torch.from_numpy(np.stack([s.input_ids for s in samples]))
    weights = torch.from_numpy(np.stack([s.weights for s in samples]))
    positions = np.tile(np.arange(phase.seq_len), (phase.batch_size, 1))
    for row in range(phase.batch_size):
        if rng.random() < skip_prob and max_position > phase.seq_len:
            start = rng.integers(1, phase.seq_len)
            positions[row, start:] += rng.integers(0, max_position - phase.seq_len + 1)
    return input_ids, torch.from_numpy(positions), weights


def loss_fn(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor, filler_weight: float):
    """`(total, task_loss, filler_loss)`: mean CE on task tokens + filler_weight * mean on filler."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    task_mask = w >= 1.0
    filler_mask = (w > 0) & (w < 1.0)
    task_loss = ce[task_mask].mean()
    filler_loss = ce[filler_mask].mean() if filler_mask.any() else ce.new_zeros(())
    return task_loss + filler_weight * filler_loss, task_loss, filler_loss


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, tokenizer: WordTokenizer, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save(out / TOKENIZER_FILE)
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    from transformers import AutoModelForCausalLM

    tokenizer = WordTokenizer(tasks.VOCAB)
    config = model_config(len(tokenizer), args.rope_theta, args.max_position, args.layers, args.kv_sharing,
                          args.kv_layers, args.forward_passes, args.backward_passes)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())
    phases = SMOKE_PHASES if args.smoke else RECIPES[args.recipe]
    if args.phase1_steps is not None and not args.smoke:
        phases = (replace(phases[0], steps=args.phase1_steps), *phases[1:])
    total_steps = sum(p.steps for p in phases)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    print(f"params {num_params:,}  steps {total_steps}  threads {torch.get_num_threads()}", flush=True)
    log: list[dict] = []
    step = 0
    tokens = 0
    start = time.perf_counter()
    meta = {"command": " ".join(["python -m offload.models.train", *sys.argv[1:]]), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "phases": [asdict(p) for p in phases], "num_params": num_params, "torch": torch.__version__,
            "platform": platform.platform(), "log": log}
    for phase_index, phase in enumerate(phases):
        model.train()
        skip_prob = args.skip_prob if phase.seq_len >= 256 else 0.0
        window = []
        for _ in range(phase.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
            input_ids, position_ids, weights = make_batch(phase, rng, skip_prob, args.max_position)
            # An explicit all-ones mask: without it transformers reads the position jumps as
            # boundaries of packed sequences and would block attention across them.
            logits = model(input_ids=input_ids, position_ids=position_ids,
                           attention_mask=torch.ones_like(input_ids)).logits
            loss, task_loss, filler_loss = loss_fn(logits, input_ids, weights, args.filler_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            tokens += input_ids.numel()
            window.append((task_loss.item(), filler_loss.item()))
            if step % args.log_every == 0:
                elapsed = time.perf_counter() - start
                t, f = np.mean(window, axis=0)
                window = []
                entry = {"step": step, "seq_len": phase.seq_len, "task_loss": round(float(t), 4),
                         "filler_loss": round(float(f), 4), "tokens": tokens, "elapsed_s": round(elapsed, 1)}
                log.append(entry)
                print(json.dumps(entry), flush=True)
            if args.probe_every and step % args.probe_every == 0:
                model.eval()
                entry = {"step": step, "probe_passkey_acc_16": task_accuracy(
                    model, tokenizer, "passkey", phase.seq_len, 16, seed=1234)}
                model.train()
                log.append(entry)
                print(json.dumps(entry), flush=True)
        model.eval()
        accs = {task: task_accuracy(model, tokenizer, task, phase.seq_len, 16, seed=1234) for task in tasks.TASKS}
        elapsed = time.perf_counter() - start
        log.append({"phase": phase_index, "seq_len": phase.seq_len, "passkey_acc_16": accs["passkey"],
                    "acc_16": accs, "elapsed_s": round(elapsed, 1)})
        print(f"phase {phase_index} done: seq_len {phase.seq_len}, accuracy (16 samples) "
              + ", ".join(f"{t} {a:.3f}" for t, a in accs.items()) + f", {elapsed:.0f} s", flush=True)
        meta.update(train_tokens=tokens, train_steps=step, train_wall_s=round(elapsed, 1))
        save(model, tokenizer, args.out, meta)
    print(f"trained {step} steps, {tokens:,} tokens in {time.perf_counter() - start:.0f} s; saved to {args.out}")


def evaluate(args) -> None:
    """Full-cache accuracy per task and context length; writes `evaluation.json` and the card."""
    from offload.models.embedded import load_embedded_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_embedded_model(args.out)
    start = time.perf_counter()
    results = evaluate_tasks(model, tokenizer, args.eval_lengths, args.eval_samples, seed=args.eval_seed)
    report = {"num_samples": args.eval_samples, "seed": args.eval_seed, "accuracy": results,
              "eval_wall_s": round(time.perf_counter() - start, 1)}
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    write_model_card(args.out)


def write_model_card(out: Path) -> None:
    """`MODEL_CARD.md` from `training.json`, `config.json` and `evaluation.json` in `out`."""
    meta = json.loads((out / "training.json").read_text())
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "evaluation.json").read_text())
    lengths = sorted({int(n) for per_task in report["accuracy"].values() for n in per_task})
    header = "| task | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    rows = [header, "|" + "---|" * (len(lengths) + 1)]
    for task, per_len in report["accuracy"].items():
        rows.append(f"| {task} | " + " | ".join(f"{per_len[str(n)]:.1%}" for n in lengths) + " |")
    phases = ", ".join(f"{p['steps']} x {p['batch_size']} x {p['seq_len']}" for p in meta["phases"])
    shares = ", ".join(f"{p.get('induction_share', 0):.0%}" for p in meta["phases"])
    probes = [e for e in meta["log"] if "phase" in e]
    probe_tasks = [t for t in tasks.TASKS if all(t in e.get("acc_16", {"passkey": 0}) for e in probes)]
    probe_header = "| phase | tokens | " + " | ".join(probe_tasks) + " | minutes so far |\n|" + "---|" * (len(probe_tasks) + 3)
    probe_rows = "\n".join(
        f"| {e['phase']} | {e['seq_len']} | "
        + " | ".join(f"{e.get('acc_16', {'passkey': e['passkey_acc_16']})[t]:.0%}" for t in probe_tasks)
        + f" | {e['elapsed_s'] / 60:.1f} |" for e in probes)
    args = meta["args"]
    size_bytes = (out / "model.safetensors").stat().st_size
    text = f"""# Embedded default model

A {config['num_hidden_layers']}-layer Llama (`LlamaForCausalLM`) trained by this project on
code-generated data (`offload/models/tasks.py`) to retrieve from its context, so that KV-cache
policies can be told apart from a local window. Load it with
`offload.models.embedded.load_embedded_model()`; how it was trained is in `docs/training.md`.

## Architecture

| field | value |
|---|---|
| parameters | {meta['num_params']:,} ({size_bytes / 1e6:.1f} MB float32 safetensors, tied embeddings) |
| layers / hidden / MLP | {config['num_hidden_layers']} / {config['hidden_size']} / {config['intermediate_size']} |
| heads | {config['num_attention_heads']} query, {config['num_key_value_heads']} KV (GQA), head_dim {config['head_dim']} |
| RoPE theta | {config['rope_parameters']['rope_theta']:g} |
| vocabulary | {config['vocab_size']} words (`tokenizer.json`, word level, digits are single tokens) |

## Training

| field | value |
|---|---|
| command | `{meta['command']}` |
| seed | {args['seed']} |
| curriculum (steps x batch x tokens) | {phases} |
| induction samples per phase | {shares} |
| positional skips | {args['skip_prob']:.0%} of sequences from 256 tokens on, relative distances up to {args['max_position']} |
| optimizer | AdamW, lr {args['lr']:g} (warmup {args['warmup']}, cosine to 10%), weight decay {args['weight_decay']:g}, clip 1.0 |
| loss | mean CE on task tokens + {args['filler_weight']:g} x mean CE on filler |
| training tokens | {meta['train_tokens']:,} ({meta['train_steps']} steps) |
| wall time | {meta['train_wall_s'] / 60:.1f} min on {args['threads']} CPU thread(s) |
| software | torch {meta['torch']}, {meta['platform']} |

Accuracy (16 samples at the phase's own length) at the end of each phase:

{probe_header}
{probe_rows}

## Full-cache accuracy

Exact match on {report['num_samples']} seeded samples per cell (`--eval-seed {report['seed']}`), needles
anywhere in the context, one task per sample: passkey = all 5 digits; mqar = the value word of
one of 4 queried keys out of 8 pairs (each query scored alone); copy = all 8 words and `end`;
vartrack = both tokens (`vk 7`) of one of 2 traced chains out of 3 two-hop chains (each query
scored alone); aggregate = the most frequent of 3 vote words (4/2/1 votes).
Measured with `python -m offload.models.train --no-train --eval-samples {report['num_samples']}`
(teacher-forced argmax, identical to greedy decoding of each answer).

{chr(10).join(rows)}
"""
    (out / "MODEL_CARD.md").write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m offload.models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package's weights/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--filler-weight", type=float, default=0.1)
    p.add_argument("--rope-theta", type=float, default=1e5)
    p.add_argument("--max-position", type=int, default=4608,
                   help="positional skips reach relative distances up to this (and max_position_embeddings)")
    p.add_argument("--skip-prob", type=float, default=0.5, help="share of sequences with a positional skip")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--probe-every", type=int, default=100, help="passkey accuracy probe every N steps (0: off)")
    p.add_argument("--phase1-steps", type=int, default=None,
                   help="steps of the first (shortest) phase, where the retrieval circuit forms")
    p.add_argument("--smoke", action="store_true", help="a ~5 minute run to check that the lookup circuit forms")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="the curriculum: default (the shipped model), study (the cross-layer study's shorter one), smoke")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the shipped model has 4)")
    p.add_argument("--kv-sharing", default=None, metavar="PARTITION-TARGET",
                   help="train with cross-layer KV sharing: pizza|sandwich|lasagna - bottom|top|middle "
                        "(offload.models.shared_kv; e.g. sandwich-middle)")
    p.add_argument("--kv-layers", type=int, default=None, help="KV layers with --kv-sharing (default: half the layers)")
    p.add_argument("--forward-passes", type=int, default=2,
                   help="with a top or middle target: passes without gradients per prompt (the paper's m)")
    p.add_argument("--backward-passes", type=int, default=1,
                   help="with a top or middle target: passes with gradients after them (the paper's b)")
    p.add_argument("--no-train", action="store_true", help="only evaluate the model in --out")
    p.add_argument("--no-eval", action="store_true", help="skip the full-cache evaluation after training")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--eval-seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.no_train:
        train(args)
    if not args.no_eval:
        evaluate(args)


if __name__ == "__main__":
    main()
