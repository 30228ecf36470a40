"""The quality sweep on a tiny model: exact points match the full cache; results are written."""

from __future__ import annotations

import json

import pytest
import torch

from offload.bench import main as bench_main
from offload.quality import LoadedModel, sweep, write_results
from tests.conftest import tiny_model


def test_sweep_exact_matches_full_cache_and_writes_results(tmp_path):
    model = tiny_model("llama-gqa")
    text = torch.randint(3, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    points = sweep(
        LoadedModel(model, None, "tiny"), text, context=256, eval_tokens=32, gen_tokens=8,
        budgets=[0.5, 30, 100], modes=["exact", "sparse"], prefetch=[True], progress=False,
        overrides={"page_size": 8, "sink_tokens": 8, "recent_tokens": 16, "token_budget": 64},
    )
    assert len(points) == 6
    too_small = [p for p in points if p.budget_pct == 0.5]
    assert all(p.skipped and "below" in p.skipped for p in too_small)
    for p in points:
        if p.mode == "exact" and not p.skipped:
            assert p.perplexity_ratio == pytest.approx(1.0, abs=1e-4)
            assert p.greedy_agreement == 1.0
            assert 0.0 <= p.prefetch_recall <= 1.0 and 0.0 < p.mass_coverage <= 1.0 + 1e-6
    write_results(points, tmp_path / "quality", {"model": "tiny", "command": "test"})
    data = json.loads((tmp_path / "quality.json").read_text())
    assert len(data["points"]) == 6
    assert "| budget % of KV |" in (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_main(["quality", "--modes", "fast"])
    with pytest.raises(SystemExit, match="unknown command"):
        bench_main(["speedy"])
    bench_main(["--help"])
    assert "offload bench quality" in capsys.readouterr().out


def test_sweep_scores_tasks_once_per_budget_and_mode():
    model = tiny_model("llama-gqa")
    calls = []

    def tasks(wrapped, context_tokens, num_samples, seed, names):
        calls.append((wrapped.config.mode, wrapped.config.prefetch, context_tokens, names))
        return {name: 1.0 for name in names}

    points = sweep(
        LoadedModel(model, None, "tiny", tasks), None, budgets=[100], modes=["exact", "sparse"],
        prefetch=[True, False], task_contexts=[64], task_samples=1, task_names=["passkey"], progress=False,
        overrides={"page_size": 8, "sink_tokens": 8, "recent_tokens": 16},
    )
    # Prefetch moves pages, it never changes what is attended: one scoring per (budget, mode).
    assert [(m, c, n) for m, _, c, n in calls] == [("exact", 64, ("passkey",)), ("sparse", 64, ("passkey",))]
    assert all(p.task_accuracy == {"passkey@64": 1.0} for p in points)


def test_cli_sweeps_the_embedded_model_with_its_tasks(tmp_path, capsys):
    out = tmp_path / "embedded"
    bench_main(["quality", "--context", "256", "--eval-tokens", "8", "--gen-tokens", "4", "--budgets", "50",
                "--modes", "exact", "--prefetch", "on", "--task-contexts", "128", "--task-samples", "2",
                "--tasks", "passkey", "--page-size", "16", "--sink-tokens", "16", "--recent-tokens", "16",
                "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["text"] == "embedded.sample_text"
    (point,) = data["points"]
    assert point["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4) and point["greedy_agreement"] == 1.0
    assert point["task_accuracy"] == data["meta"]["task_accuracy_full_cache"]  # exact mode: same answers
    assert set(point["task_accuracy"]) == {"passkey@128"}
    table = out.with_suffix(".md").read_text()
    assert "| full cache |" in table and "passkey@128" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        bench_main(["quality", "--tasks", "sudoku"])
    capsys.readouterr()
