"""`offload bench` runs from the installed package, not the source tree: every subcommand is
started from an empty directory and writes its results there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

COMMANDS = {
    "decode": ["--contexts", "2048", "--new-tokens", "2", "--layers", "1", "--budget-fraction", "0.5",
               "--configs", "a,b", "--out", "results/decode"],
    "kernels": ["--contexts", "256", "--threads", "1", "--out", "results/cpu"],
    "crosslayer": ["--quick", "--models", "embedded", "--out", "results/crosslayer"],
    "prefix": ["--prefix-tokens", "256", "--runs", "1", "--requests", "4", "--out", "results/prefix"],
    "step": ["--batch", "1", "--context", "1024", "--steps", "2", "--repeats", "1", "--prefill-tokens", "96",
             "--out", "results/step"],
}


def _run(tmp_path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "offload.bench", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["prefix", "decode", "kernels", "quality", "crosslayer", "crosslayer-study", "step"])
def test_every_subcommand_has_help_outside_the_source_tree(tmp_path, command):
    run = _run(tmp_path, command, "--help")
    assert run.returncode == 0, run.stderr
    assert f"offload bench {command}" in run.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_speed_benchmarks_run_outside_the_source_tree(tmp_path, command):
    run = _run(tmp_path, command, *COMMANDS[command])
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / COMMANDS[command][-1]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data and out.with_suffix(".md").exists()
    assert "source tree" not in run.stdout + run.stderr
    if command == "step":  # the plain model's step beside offload's, and the calls into torch
        assert all(row["unwrapped_step_ms"] > 0 and row["torch_calls_per_step"] > 0 for row in data["decode"])


def test_crosslayer_study_runs_on_trained_model_folders(tmp_path):
    """Three untrained 6-layer models saved as the trainer saves them: the standard one, a bottom and a
    top configuration. The study reads them back, times and scores them, and writes its tables."""
    from offload.models import tasks
    from offload.models.embedded import WordTokenizer
    from offload.models.train import model_config, save
    from transformers import AutoModelForCausalLM

    tokenizer = WordTokenizer(tasks.VOCAB)
    for name, sharing in (("standard", None), ("pizza-bottom", "pizza-bottom"), ("sandwich-middle", "sandwich-middle")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config(len(tokenizer), 1e5, 4608, 6, sharing))
        save(model, tokenizer, tmp_path / "models" / name, {"command": f"test {name}", "train_wall_s": 1.0})
    run = _run(tmp_path, "crosslayer-study", "--models-dir", "models", "--quick", "--out", "results/study")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "results/study.json").read_text())["rows"]}
    assert list(rows) == ["standard", "pizza-bottom", "sandwich-middle"]
    assert rows["pizza-bottom"]["kv_layers"] == 3 and rows["standard"]["kv_layers"] == 6
    assert rows["pizza-bottom"]["kv_bytes_per_token"] == rows["standard"]["kv_bytes_per_token"] / 2
    assert rows["standard"]["prefill_ratio"] == {"512": 1.0}
    assert (tmp_path / "results/study.md").exists() and (tmp_path / "results/study.png").exists()


def test_crosslayer_study_refuses_models_of_different_depths(tmp_path):
    from offload.benchmarks.crosslayer_study import load_models
    from offload.models import tasks
    from offload.models.embedded import WordTokenizer
    from offload.models.train import model_config, save
    from transformers import AutoModelForCausalLM

    tokenizer = WordTokenizer(tasks.VOCAB)
    for name, layers, sharing in (("standard", 6, None), ("pizza-bottom-kv2", 8, "pizza-bottom")):
        model = AutoModelForCausalLM.from_config(model_config(len(tokenizer), 1e5, 4608, layers, sharing, 2))
        save(model, tokenizer, tmp_path / name, {"command": f"test {name}"})
    with pytest.raises(ValueError, match="different depths"):
        load_models(tmp_path)


def test_crosslayer_study_orders_variant_folders_and_labels_their_iteration(tmp_path):
    """A folder named with a variant suffix (`pizza-top-kv2-m7`) sorts with its KV-layer count, and
    the crosslayer plot labels a top target's point with the m and b it was trained with."""
    from offload.benchmarks.crosslayer import trained_points
    from offload.benchmarks.crosslayer_study import _order

    names = ["pizza-top-kv2-m7", "lasagna-bottom", "pizza-bottom-kv2", "pizza-top", "pizza-top-kv2"]
    assert sorted(names, key=_order) == ["pizza-top", "lasagna-bottom", "pizza-bottom-kv2", "pizza-top-kv2",
                                         "pizza-top-kv2-m7"]
    row = {"configuration": "pizza-top", "layers": 6, "kv_reduction": 3.0, "perplexity_ratio": 1.1,
           "accuracy": {t: {"1024": 1.0} for t in ("passkey", "mqar", "copy")}}
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"rows": [
        {**row, "train_command": "python -m offload.models.train --forward-passes 7 --backward-passes 2"},
        {**row, "train_command": "python -m offload.models.train"}]}))
    series = [p["series"] for p in trained_points([study])]
    assert series == ["trained, top/middle target (6 layers, m = 7, b = 2)", "trained, top/middle target (6 layers)"]


def test_unknown_subcommand_is_named(tmp_path):
    run = _run(tmp_path, "speed")
    assert run.returncode != 0 and "unknown command 'speed'" in run.stderr


def test_the_readme_policy_table_is_the_committed_benchmark_results():
    """README's KV-policy table is `offload bench policies --summary` of bench/results/policies.json."""
    from pathlib import Path

    from offload.benchmarks.policies import load, summary_table

    root = Path(__file__).resolve().parents[1]
    results = load(root / "bench/results/policies.json", {"samples": 20}, keep_meta=True)
    assert summary_table(results) in (root / "README.md").read_text()


def test_the_readme_states_the_oracle_bound_of_the_committed_results():
    from pathlib import Path

    from offload.benchmarks.policies import load, oracle_bound_note

    root = Path(__file__).resolve().parents[1]
    results = load(root / "bench/results/policies.json", {"samples": 20}, keep_meta=True)
    readme = " ".join((root / "README.md").read_text().split())
    assert oracle_bound_note(results) in readme


def test_oracle_exceptions_count_the_questions_that_can_differ():
    from offload.benchmarks.policies import Cell, Results, oracle_bound_note, oracle_exceptions

    def cell(policy, task, accuracy, effect="demote", budget=10.0):
        return Cell(policy, effect, budget, task, 1024, accuracy=accuracy, samples=20)

    results = Results(meta={}, cells=[
        cell("oracle", "mqar", 0.95), cell("quest", "mqar", 0.975),      # 80 questions: 2 more right
        cell("oracle", "copy", 0.80), cell("h2o", "copy", 0.80),         # a tie is bounded
        cell("tova", "copy", 0.95, effect="drop"),                        # drop cells are not compared
        cell("sparq", "copy", 0.70), cell("quest", "copy", 0.90, budget=25.0),  # no oracle cell at 25%
    ])
    compared, exceptions = oracle_exceptions(results)
    assert compared == 3
    assert [(e["policy"], e["questions"], e["k"], e["p_min"]) for e in exceptions] == [("quest", 80, 2, 0.25)]
    assert "bounds the other rows in 2 of 3 demote cells" in oracle_bound_note(results)
    assert "is 0.25" in oracle_bound_note(results)
    assert "above the full cache" not in oracle_bound_note(results)  # no full-cache accuracy known
    results.full_cache = {"mqar": {1024: 0.95}}  # the full cache answers as the oracle does
    assert oracle_exceptions(results)[1][0]["above_full"]
    assert "Of them, 1 also score above the full cache itself" in oracle_bound_note(results)
    assert oracle_bound_note(Results(meta={}, cells=[cell("oracle", "copy", 0.8), cell("h2o", "copy", 0.7)])) == \
        "The oracle row bounds every other row in all 1 demote cells."


def test_the_readme_crosslayer_table_is_the_committed_benchmark_results():
    """README's cross-layer summary is `offload bench crosslayer --summary` of bench/results/crosslayer.json."""
    from pathlib import Path

    from offload.benchmarks.crosslayer import Row, summary_table

    root = Path(__file__).resolve().parents[1]
    rows = [Row(**r) for r in json.loads((root / "bench/results/crosslayer.json").read_text())["rows"]]
    assert summary_table(rows) in (root / "README.md").read_text()


def test_bench_decode_names_a_wrong_configuration(capsys):
    from offload.benchmarks.decode import main

    with pytest.raises(SystemExit) as exc:
        main(["--configs", "a,g"])
    assert exc.value.code == 2 and "--configs takes a,b,c,d,e,f, got 'g'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--modes", "exact,fast"], "--modes takes exact and/or sparse, got 'fast'"),
    (["--configs", "a,e"], "--configs takes a,b,c,d, got 'e'"),
])
def test_bench_tiers_names_a_wrong_mode_or_configuration(capsys, argv, message):
    """In process (a subprocess would take seconds): refused before any model is built."""
    from offload.benchmarks.tiers import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU exists")
@pytest.mark.parametrize("command", ["decode", "step"])
def test_bench_device_cuda_without_a_gpu_is_refused(capsys, command):
    import importlib

    main = importlib.import_module(f"offload.benchmarks.{command}").main
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err


def test_benchmark_command_lines_name_the_offload_settings(monkeypatch):
    import os

    from offload.benchmarks import command_line

    for name in [k for k in os.environ if k.startswith("OFFLOAD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OFFLOAD_PREFILL_CHUNK", "2048")
    monkeypatch.setenv("OFFLOAD_MODE", "sparse")
    monkeypatch.setenv("UNRELATED", "1")
    assert command_line("decode", ["--quick"]) == \
        "OFFLOAD_MODE=sparse OFFLOAD_PREFILL_CHUNK=2048 offload bench decode --quick"
