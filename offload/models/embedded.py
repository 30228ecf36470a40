"""The embedded default model: a small Llama trained by `python -m offload.models.train`.

`load_embedded_model()` gives a `LlamaForCausalLM` and its word-level tokenizer from the
files committed in `offload/models/weights/` (see `MODEL_CARD.md` there for how it was made and
what it scores). The evaluation helpers here measure exact-match task accuracy on seeded
samples from `offload.models.tasks`, either with one teacher-forced forward pass (the full
cache, fast) or through any `generate` (for example an `OffloadedModel`'s), so the same numbers
can be compared with and without offloading.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from offload.models import tasks
from offload.models.tokenizer import Tokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOKENIZER_FILE = "tokenizer.json"

# (prompt_ids [1, T], max_new_tokens) -> ids [1, T + max_new_tokens], as `model.generate` returns.
GenerateFn = Callable[[torch.Tensor, int], torch.Tensor]
# (input_ids [1, T], start) -> [T - start] argmax predictions for positions start..T-1, each from
# the true tokens before it: prefill input_ids[:, :start], then one decode step per token.
ScoreFn = Callable[[torch.Tensor, int], torch.Tensor]


class WordTokenizer(Tokenizer):
    """Word-level tokenizer over a fixed vocabulary: text is split on whitespace, one id per word.

    Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>` as in `offload.models.tokenizer` (which gives the
    `encode`/`decode`/`__call__` surface, left padding with `<unk>`). Unknown words map to
    `<unk>`; decoding joins words with single spaces.
    """

    def __init__(self, vocab: Sequence[str], path: str | Path = "<in memory>"):
        vocab = list(vocab)
        if vocab[:3] != tasks.SPECIAL_TOKENS:
            raise ValueError(f"{path}: vocabulary must start with {tasks.SPECIAL_TOKENS}, got {vocab[:3]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"{path}: vocabulary has duplicate words")
        self.vocab = vocab
        self._ids = {word: i for i, word in enumerate(vocab)}
        super().__init__(Path(path), len(vocab))

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable word tokenizer file ({e})") from e
        if data.get("type") != "word" or not isinstance(data.get("vocab"), list):
            raise ValueError(f"{path}: expected {{'type': 'word', 'vocab': [...]}}")
        return cls(data["vocab"], path)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "word", "vocab": self.vocab}, indent=0) + "\n")

    def _encode_text(self, text: str) -> list[int]:
        return [self._ids.get(word, self.unk_token_id) for word in text.split()]

    def _decode_text(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


def load_embedded_model(path: str | Path = WEIGHTS_DIR, dtype: torch.dtype = torch.float32):
    """`(model in eval mode, WordTokenizer)` from a folder written by the trainer: a `LlamaForCausalLM`,
    or a `SharedKVLlamaForCausalLM` for a model trained with cross-layer KV sharing."""
    from transformers import AutoModelForCausalLM

    import offload.models.shared_kv  # noqa: F401  (registers SharedKVLlamaConfig with the Auto classes)

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; train a model with `python -m offload.models.train`")
    tokenizer = WordTokenizer.from_file(path / TOKENIZER_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if model.config.vocab_size != len(tokenizer):
        raise ValueError(f"{path}: model vocab_size {model.config.vocab_size} != tokenizer's {len(tokenizer)}")
    return model, tokenizer


def _check_vocab(tokenizer: WordTokenizer) -> None:
    # Samples are built as ids from tasks.VOCAB; a different vocabulary would mean other ids.
    if getattr(tokenizer, "vocab", None) != tasks.VOCAB:
        raise ValueError("the tokenizer's vocabulary is not offload.models.tasks.VOCAB")


def task_samples(task: str, context_tokens: int, num_samples: int, seed: int = 0) -> list[tasks.Sample]:
    """The seeded `tasks.eval_sample(task, context_tokens)` samples `task_accuracy` scores:
    the same `(task, context_tokens, num_samples, seed)` always gives the same samples."""
    rng = np.random.default_rng([seed, context_tokens, tasks.TASKS.index(task)])
    return [tasks.eval_sample(task, context_tokens, rng) for _ in range(num_samples)]


@torch.no_grad()
def task_accuracy(model, tokenizer: WordTokenizer, task: str, context_tokens: int, num_samples: int,
                  seed: int = 0, generate_fn: GenerateFn | None = None, batch_size: int = 4,
                  score_fn: ScoreFn | None = None, strict: bool = True) -> float:
    """Exact-match accuracy on `num_samples` seeded `tasks.eval_sample(task, context_tokens)`.

    An answer counts as right when every token of it is right: all five passkey digits, the
    MQAR value word (each of the 4 queries scores alone), all copied words and `end`, both
    tokens of a traced vartrack chain (each of the 2 queries scores alone), the winning vote.
    Without `generate_fn`, one teacher-forced forward pass per batch scores every answer (its
    greedy continuation is right exactly when each answer token is the argmax given the right
    ones before it). With `generate_fn`, each answer is generated greedily from its prompt.
    With `score_fn`, each sample's context is prefilled once (up to `Sample.context_end`) and the
    questions and answers are fed as decode steps, scored like the forward pass: the strict
    protocol, where every answer depends on what a KV policy kept (kvpress's: a press sees the
    context, never the question). `strict=False` prefills up to the first answer instead, question
    included (the lenient number). With the full cache both equal the forward pass.
    """
    if generate_fn is not None and score_fn is not None:
        raise ValueError("pass generate_fn or score_fn, not both")
    _check_vocab(tokenizer)
    samples = task_samples(task, context_tokens, num_samples, seed)
    right = total = 0
    if generate_fn is None and score_fn is None:
        device = next(model.parameters()).device
        for i in range(0, len(samples), batch_size):
            batch = samples[i:i + batch_size]
            input_ids = torch.from_numpy(np.stack([s.input_ids for s in batch])).to(device)
            predicted = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.argmax(-1)
            for row, sample in enumerate(batch):
                for _, a, b in sample.answers:
                    right += bool((predicted[row, a - 1:b - 1] == input_ids[row, a:b]).all())
                    total += 1
    elif score_fn is not None:
        for sample in samples:
            start = sample.context_end if strict else min(a for _, a, _ in sample.answers)
            end = max(b for _, _, b in sample.answers)
            ids = torch.from_numpy(sample.input_ids[None, :end].copy())
            predicted = score_fn(ids, start)
            for _, a, b in sample.answers:
                right += bool((predicted[a - start:b - start] == ids[0, a:b]).all())
                total += 1
    else:
        for sample in samples:
            for _, a, b in sample.answers:
                prompt = torch.from_numpy(sample.input_ids[None, :a].copy())
                out = generate_fn(prompt, b - a)
                out = out.sequences if hasattr(out, "sequences") else out
                right += out[0, a:b].tolist() == sample.input_ids[a:b].tolist()
                total += 1
    return right / total


def evaluate_passkey(model, tokenizer: WordTokenizer, context_tokens: int, num_samples: int,
                     seed: int = 0, generate_fn: GenerateFn | None = None) -> float:
    """Passkey accuracy with the needle anywhere in `context_tokens` tokens (see `task_accuracy`)."""
    return task_accuracy(model, tokenizer, "passkey", context_tokens, num_samples, seed, generate_fn)


def evaluate_tasks(model, tokenizer: WordTokenizer, context_lengths: Sequence[int] = (1024, 2048, 4096),
                   num_samples: int = 100, seed: int = 0,
                   task_names: Sequence[str] = tasks.TASKS) -> dict[str, dict[int, float]]:
    """`{task: {context_tokens: accuracy}}` with the full cache, for the model card."""
    return {task: {n: task_accuracy(model, tokenizer, task, n, num_samples, seed) for n in context_lengths}
            for task in task_names}


def sample_text(num_tokens: int, seed: int = 0) -> torch.Tensor:
    """ids [1, num_tokens]: one seeded training-style sequence (filler with passkey, MQAR and copy
    needles and their questions), the embedded model's own kind of text for perplexity runs."""
    rng = np.random.default_rng([seed, num_tokens])
    return torch.from_numpy(tasks.training_sample(num_tokens, rng, filler_weight=0.0).input_ids[None])


def greedy_generate_fn(model) -> GenerateFn:
    """A `GenerateFn` for a transformers model or an `OffloadedModel`: greedy, no EOS stop."""

    def generate(prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False)

    return generate
