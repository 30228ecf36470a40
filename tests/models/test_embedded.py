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
    task_samples,
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
    text = "the pass key is 4 0 7 1 9 . remember sigma ruby . var vb vk . vote plum ."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1 and len(ids) == 22 and tok.unk_token_id not in ids
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
def test_eval_samples_are_seeded_exact_length_and_answers_are_lookups(task):
    a = tasks.eval_sample(task, 300, np.random.default_rng(7))
    b = tasks.eval_sample(task, 300, np.random.default_rng(7))
    assert np.array_equal(a.input_ids, b.input_ids) and a.answers == b.answers and a.context_end == b.context_end
    assert len(a.input_ids) == 300 and a.input_ids[0] == tasks.BOS_ID
    assert a.answers and all(t == task for t, _, _ in a.answers)
    s = a.input_ids
    dot = tasks.TOKEN_ID["."]
    for _, start, end in a.answers:
        if task in ("passkey", "mqar", "copy"):
            # One-step lookups by design: the token before the answer occurred exactly once
            # earlier (in the needle), followed there by the answer.
            answer, cue = s[start:end].tolist(), s[start - 1]
            earlier = [i for i in range(start - 1) if s[i] == cue]
            assert len(earlier) == 1
            assert s[earlier[0] + 1:earlier[0] + 1 + len(answer)].tolist() == answer
        elif task == "vartrack":
            # `trace X` -> `Y 7`: each answer token follows its predecessor in a `var` needle,
            # and that needle is the predecessor's only occurrence followed by something other
            # than `.` (the other one is the previous hop's needle `var W X .`).
            assert end - start == tasks.VARTRACK_HOPS and s[start - 2] == tasks.TOKEN_ID["trace"]
            for t in range(start, end):
                cue = s[t - 1]
                earlier = [i for i in range(a.context_end) if s[i] == cue]
                assert all(s[i - 1] == tasks.TOKEN_ID["var"] or s[i + 1] == dot for i in earlier)
                defining = [i for i in earlier if s[i - 1] == tasks.TOKEN_ID["var"] and s[i + 2] == dot]
                assert len(defining) == 1 and s[defining[0] + 1] == s[t]
                assert len(earlier) == (1 if t == start else 2)
            assert str(tasks.VOCAB[s[end - 1]]).isdigit()
        else:
            # `most vote` -> the word after `vote` most often, strictly.
            assert s[start - 1] == tasks.TOKEN_ID["vote"]
            voted = [s[i + 1] for i in range(a.context_end) if s[i] == tasks.TOKEN_ID["vote"]]
            counts = sorted(((voted.count(w), w) for w in set(voted)), reverse=True)
            assert [c for c, _ in counts] == list(tasks.AGGREGATE_COUNTS) and counts[0][1] == s[start]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_context_end_precedes_every_answer_and_needle(task):
    """Everything before context_end is BOS, filler and needles; from it on, questions and answers."""
    rng = np.random.default_rng(11)
    starts = {"passkey": "pass", "mqar": "remember", "copy": "copy", "vartrack": "var", "aggregate": "vote"}
    questions = {"passkey": "tell", "mqar": "recall", "copy": "repeat", "vartrack": "trace", "aggregate": "most"}
    for length in (64, 300, 1024):
        for _ in range(5):
            s = tasks.eval_sample(task, length, rng)
            ids = s.input_ids
            assert 0 < s.context_end <= min(a for _, a, _ in s.answers)
            assert ids[s.context_end] == tasks.TOKEN_ID[questions[task]]
            needle_word = tasks.TOKEN_ID[starts[task]]
            assert needle_word in ids[:s.context_end].tolist()
            tail = ids[s.context_end:].tolist()
            assert needle_word not in tail or task in ("passkey", "aggregate")  # their questions repeat `pass`, `vote`
            assert tasks.TOKEN_ID["remember"] not in tail and tasks.TOKEN_ID["var"] not in tail
            assert tasks.TOKEN_ID["copy"] not in tail
            if task != "aggregate":
                assert tasks.TOKEN_ID["vote"] not in tail
    rng = np.random.default_rng(12)
    for length in (64, 256, 2048):
        for _ in range(20):
            s = tasks.training_sample(length, rng)
            tail = s.input_ids[s.context_end:].tolist()
            assert s.answers and s.context_end <= min(a for _, a, _ in s.answers)
            for word in ("remember", "var", "copy"):
                assert tasks.TOKEN_ID[word] not in tail
            # `vote` occurs in the tail only in the question `most vote`.
            assert all(tail[i - 1] == tasks.TOKEN_ID["most"] for i in range(len(tail)) if tail[i] == tasks.TOKEN_ID["vote"])
            assert s.input_ids[s.context_end] in [tasks.TOKEN_ID[w] for w in questions.values()]


def test_task_samples_are_the_ones_task_accuracy_scores():
    a = task_samples("vartrack", 200, 3, seed=4)
    b = task_samples("vartrack", 200, 3, seed=4)
    assert len(a) == 3 and all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    rng = np.random.default_rng([4, 200, tasks.TASKS.index("vartrack")])
    assert all(np.array_equal(x.input_ids, tasks.eval_sample("vartrack", 200, rng).input_ids) for x in a)
    assert not np.array_equal(a[0].input_ids, task_samples("vartrack", 200, 1, seed=5)[0].input_ids)

    # task_accuracy scores exactly these samples: a score_fn sees their ids.
    seen = []

    def score(ids, start):
        seen.append(ids[0].clone())
        return ids[0, start:]  # the true tokens: every answer right

    assert task_accuracy(None, WordTokenizer(tasks.VOCAB), "vartrack", 200, 3, seed=4, score_fn=score) == 1.0
    assert all(torch.equal(x, torch.from_numpy(y.input_ids[:len(x)])) for x, y in zip(seen, a))


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


@pytest.mark.parametrize("task", [t for t in tasks.TASKS if t != "passkey"])
def test_embedded_model_reaches_its_stated_task_accuracy(embedded, stated_accuracy, task):
    model, tok = embedded
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


def test_training_samples_mix_every_task_and_keep_passkey_digits_unique():
    rng = np.random.default_rng(3)
    seen = set()
    digits = {tasks.TOKEN_ID[d] for d in tasks.DIGITS}
    for length in (64, 512):
        for _ in range(50):
            s = tasks.training_sample(length, rng)
            seen.update(t for t, _, _ in s.answers)
            context = s.input_ids[:s.context_end].tolist()
            for task, a, b in s.answers:
                if task == "passkey":
                    # Vartrack digits never reuse a passkey digit: each has one earlier occurrence.
                    assert all(context.count(d) == 1 for d in s.input_ids[a:b].tolist())
                    assert set(s.input_ids[a:b].tolist()) <= digits
    assert seen == set(tasks.TASKS)


def test_new_tasks_need_every_needle(embedded):
    """What the policy zoo relies on: vartrack's second hop reads its own needle (remove it and
    the hop fails while the first stays right), and aggregate counts votes (leave the winner one
    vote of its four and the runner-up wins)."""
    model, _ = embedded
    T, blank = tasks.TOKEN_ID, tasks.ids("a cat sleeps .")
    rows, checks = [], []  # checks: (row, position, expected token, kind)
    for s in task_samples("vartrack", 384, 4, seed=1):
        rows.append(s.input_ids)
        for _, a, _ in s.answers:
            checks += [(len(rows) - 1, a - 1, s.input_ids[a], "hop1"), (len(rows) - 1, a, s.input_ids[a + 1], "hop2")]
            cut = s.input_ids.copy()
            pos = next(i for i in range(s.context_end) if cut[i] == cut[a] and cut[i - 1] == T["var"])
            cut[pos - 1:pos + 3] = blank
            rows.append(cut)
            checks.append((len(rows) - 1, a, s.input_ids[a + 1], "hop2 without its needle"))
    for s in task_samples("aggregate", 384, 4, seed=1):
        (_, a, _), ids = s.answers[0], s.input_ids.copy()
        votes = [i for i in range(s.context_end) if ids[i] == T["vote"]]
        others = [ids[i + 1] for i in votes if ids[i + 1] != ids[a]]
        for i in [i for i in votes if ids[i + 1] == ids[a]][:3]:
            ids[i:i + 3] = blank[1:]
        rows.append(ids)
        checks.append((len(rows) - 1, a - 1, max(set(others), key=others.count), "runner-up after cutting votes"))
    with torch.no_grad():
        predicted = model(input_ids=torch.from_numpy(np.stack(rows))).logits.argmax(-1).numpy()
    right = {}
    for row, pos, expected, kind in checks:
        right.setdefault(kind, []).append(bool(predicted[row, pos] == expected))
    assert all(right["hop1"]) and sum(right["hop2"]) >= len(right["hop2"]) - 1, right
    assert sum(right["hop2 without its needle"]) <= 1, right  # a lucky guess of the digit at most
    assert sum(right["runner-up after cutting votes"]) >= 3, right
