"""Every `*ForCausalLM` in the installed transformers, as a tiny random-init model: wrapping either
refuses, naming the feature, or exact mode gives the unwrapped model's tokens and logits within
1e-4 (200-token prompt, 24 greedy tokens, most pages on the host). No third outcome. The README's
family table and docs/families.md are generated from these outcomes and checked here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hf.families import all_outcomes, causal_lm_families, full_markdown, reason, summary_markdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outcomes():
    return {o.family: o for o in all_outcomes()}


@pytest.mark.parametrize("family", [f for f, _ in causal_lm_families()])
def test_family_runs_exactly_or_is_refused(outcomes, family):
    outcome = outcomes[family]
    assert outcome.result in ("exact", "refused", "unbuildable"), f"{family}: {outcome.result}: {outcome.detail}"
    if outcome.result == "refused":
        assert not reason(outcome).startswith("other"), f"{family} is refused without naming the feature: {outcome.detail}"


def test_most_families_are_covered(outcomes):
    counts = {r: sum(o.result == r for o in outcomes.values()) for r in ("exact", "refused", "unbuildable")}
    assert counts["exact"] >= 60 and counts["unbuildable"] <= 55, counts


def test_readme_and_docs_carry_the_generated_tables(outcomes):
    ordered = [outcomes[f] for f, _ in causal_lm_families()]
    readme = (ROOT / "README.md").read_text()
    assert summary_markdown(ordered) in readme, "regenerate with: python -m tests.hf.families --markdown"
    assert full_markdown(ordered) in (ROOT / "docs" / "families.md").read_text()
