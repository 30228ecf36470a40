"""The embedded default model, its word tokenizer and the synthetic task data.

The accuracy test guards the committed weights: it re-measures passkey accuracy with the full
cache on a small seeded sample and compares it with what `evaluation.json` (the model card's
numbers) states, so a broken or swapped model cannot ship.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from offload.models import tasks
from offload.models.embedded import (
    WEIGHTS_DIR,
    WordTokenizer,
    evaluate_passkey,
    greedy_generate_fn,
    load_embedded_model,
    task_accuracy,
)
from offload.models.train import MARKER_FILLER, Phase, loss_fn, make_batch

# Samples are seeded, so the measured numbers are fixed for a given torch build; the margin covers
# the small samples (16: one miss is 0.0625) against the 50-sample numbers in evaluation.json.
ACCURACY_MARGIN = 0.15


@pytest.fixture(scope="module")
def embedded():
    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.fail(f"the embedded model is missing from {WEIGHTS_DIR}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_embedded_model()


@pytest.fixture(scope="module")
def stated_accuracy() -> dict:
    return json.loads((WEIGHTS_DIR / "evaluation.json").read_text())["accuracy"]


def test_word_tokenizer_round_trip_and_left_padding():
    tok = WordTokenizer(tasks.VOCAB)
    text = "the pass key is 4 0 7 1 9 . remember sigma ruby ."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1 and len(ids) == 15
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<s>" + text
    assert tok.encode("zebra", add_special_tokens=False) == [tok.unk_token_id]
    batch = tok(["the cat", "the old cat sleeps"], return_tensors="pt")
    assert batch["input_ids"].tolist() == [[0, 0, 1, *tok.encode("the cat", False)],
                                           [1, *tok.encode("the old cat sleeps", False)]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_word_tokenizer_file_matches_tasks_vocab(tmp_path):
    assert WordTokenizer.from_file(WEIGHTS_DIR / "tokenizer.json").vocab == tasks.VOCAB
    WordTokenizer(tasks.VOCAB).save(tmp_path / "t.json")
    assert WordTokenizer.from_file(tmp_path / "t.json").vocab == tasks.VOCAB
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        WordTokenizer.from_file(tmp_path / "bad.json")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_eval_samples_are_seeded_exact_length_and_answers_are_one_lookup(task):
    a = tasks.eval_sample(task, 300, np.random.default_rng(7))
    b = tasks.eval_sample(task, 300, np.random.default_rng(7))
    assert np.array_equal(a.input_ids, b.input_ids) and a.answers == b.answers
    assert len(a.input_ids) == 300 and a.input_ids[0] == tasks.BOS_ID
    for _, start, end in a.answers:
        # One-step lookups by design: the token before the answer occurred exactly once
        # earlier (in the needle), followed there by the answer.
        answer, cue = a.input_ids[start:end].tolist(), a.input_ids[start - 1]
        earlier = [i for i in range(start - 1) if a.input_ids[i] == cue]
        assert len(earlier) == 1
        assert a.input_ids[earlier[0] + 1:earlier[0] + 1 + len(answer)].tolist() == answer


def test_passkey_needle_lands_anywhere():
    rng = np.random.default_rng(0)
    cue = tasks.ids("the pass key is")
    positions = []
    for _ in range(200):
        s = tasks.eval_sample("passkey", 256, rng).input_ids.tolist()
        positions.append(next(i for i in range(len(s)) if s[i:i + 4] == cue) / len(s))
    assert min(positions) < 0.05 and max(positions) > 0.8


def test_training_batches_fit_and_mark_loss_tokens():
    rng = np.random.default_rng(0)
    input_ids, position_ids, weights = make_batch(Phase(128, 16, 1), rng, skip_prob=1.0, max_position=4608)
    assert input_ids.shape == position_ids.shape == weights.shape == (16, 128)
    assert (weights[:, 0] == 0).all() and (weights == 1).any(dim=1).all()
    assert set(weights.unique().tolist()) <= {0.0, float(np.float32(MARKER_FILLER)), 1.0}
    steps = position_ids.diff(dim=1)
    assert (steps >= 1).all() and ((steps > 1).sum(dim=1) <= 1).all() and position_ids.max() < 4608
    logits = torch.zeros(16, 128, len(tasks.VOCAB))
    total, task_loss, filler_loss = loss_fn(logits, input_ids, weights, filler_weight=0.1)
    uniform = np.log(len(tasks.VOCAB))
    assert task_loss.item() == pytest.approx(uniform) and filler_loss.item() == pytest.approx(uniform)
    assert total.item() == pytest.approx(1.1 * uniform)


def test_embedded_model_is_a_small_gqa_llama(embedded):
    model, tok = embedded
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tok) == len(tasks.VOCAB)
    assert config.num_key_value_heads < config.num_attention_heads
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_embedded_model_reaches_its_stated_passkey_accuracy(embedded, stated_accuracy):
    model, tok = embedded
    for context_tokens in (1024, 4096):
        stated = stated_accuracy["passkey"][str(context_tokens)]
        measured = evaluate_passkey(model, tok, context_tokens, num_samples=16 if context_tokens < 4096 else 4,
                                    seed=123)
        assert measured >= stated - ACCURACY_MARGIN, (context_tokens, measured, stated)


def test_embedded_model_reaches_its_stated_mqar_and_copy_accuracy(embedded, stated_accuracy):
    model, tok = embedded
    for task in ("mqar", "copy"):
        stated = stated_accuracy[task]["1024"]
        measured = task_accuracy(model, tok, task, 1024, num_samples=16, seed=123)
        assert measured >= stated - ACCURACY_MARGIN, (task, measured, stated)


def test_generate_path_agrees_with_teacher_forced_scoring(embedded):
    model, tok = embedded
    forced = evaluate_passkey(model, tok, 256, num_samples=4, seed=5)
    generated = evaluate_passkey(model, tok, 256, num_samples=4, seed=5, generate_fn=greedy_generate_fn(model))
    assert generated == forced


def test_decode_step_scoring_matches_the_full_cache_forward(embedded):
    from offload import OffloadedModel
    from offload.quality import offloaded_argmax

    model, tok = embedded
    sample = tasks.eval_sample("mqar", 300, np.random.default_rng(3))
    ids = torch.from_numpy(sample.input_ids[None].copy())
    start = min(a for _, a, _ in sample.answers)
    with torch.no_grad():
        forced = model(input_ids=ids).logits[0, start - 1:-1].argmax(-1)
    # A device budget far below the KV cache: most pages are read on the host.
    with OffloadedModel(model, page_size=16, sink_tokens=16, recent_tokens=16, device_budget=100_000) as om:
        scored = offloaded_argmax(om, ids, start)
        assert torch.equal(scored, forced)
        accuracy = task_accuracy(model, tok, "mqar", 300, 3, seed=5, score_fn=partial(offloaded_argmax, om))
    assert accuracy == task_accuracy(model, tok, "mqar", 300, 3, seed=5)
    with pytest.raises(ValueError, match="not both"):
        task_accuracy(model, tok, "passkey", 300, 1, generate_fn=greedy_generate_fn(model), score_fn=lambda i, s: i)


def test_sample_text_is_seeded_task_text():
    from offload.models.embedded import sample_text

    a, b = sample_text(500), sample_text(500)
    assert a.shape == (1, 500) and torch.equal(a, b) and int(a[0, 0]) == tasks.BOS_ID
    assert not torch.equal(a, sample_text(500, seed=1))


@pytest.mark.parametrize("length", [17, 64, 300, 4096])
def test_induction_sample_repeats_a_span_of_distinct_tokens(length):
    s = tasks.induction_sample(length, np.random.default_rng(length), filler_weight=0.1)
    assert len(s.input_ids) == len(s.weights) == length and s.input_ids[0] == tasks.BOS_ID
    n = int((s.weights == 1.0).sum()) + 1  # every repeated token but the first is a target
    span, repeat = s.input_ids[1:1 + n], s.input_ids[length - n:]
    assert 8 <= n <= tasks.MAX_INDUCTION_SPAN and np.array_equal(span, repeat)
    assert len(set(span.tolist())) == n and (span >= len(tasks.SPECIAL_TOKENS)).all()
    assert (s.weights[1 + n:length - n] == np.float32(0.1)).all() and s.weights[length - n] == 0.0
    with pytest.raises(ValueError, match="at least 17"):
        tasks.induction_sample(16, np.random.default_rng(0))
