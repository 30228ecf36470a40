"""FastGen (adaptive KV compression): each KV head gets, at the end of the prompt, the cheapest
profile whose kept tokens recover at least `fastgen_recovery` of the attention its observation
rows paid; decoding then keeps that profile's tokens for that head.

Profiles, cheapest first, as in the paper: special tokens only; special + local (the newest
tokens); special + frequency (H2O's accumulated attention); special + half local + half
frequency; everything. Page granularity changes one thing: nearly every page of 16 tokens holds
punctuation, so the paper's punctuation profile cannot tell pages apart and is folded into
"special" (the first pages, which hold BOS and the sink tokens). Every profile but "special" fills
the token budget; among profiles that recover enough, the one keeping fewest pages wins, ties
broken by recovered mass; if none does, the best recovery wins (the paper would keep the full
cache, which the budget forbids)."""

from __future__ import annotations

import torch

from offload.policies.base import KVPolicy, StepView, fill, recency, sinks

PROFILES = ("special", "local", "frequency", "mixed", "full")


class FastGenPolicy(KVPolicy):
    name = "fastgen"
    per_head = True

    def profile_pages(self, view: StepView, profile: str) -> torch.Tensor:
        """[H_kv, P] bool: the pages `profile` keeps now."""
        k = view.budget_pages
        special = view.shared(sinks(view, min(view.sink_pages, k)))
        rest = k - int(special[0].sum())
        none = torch.zeros(view.num_pages, dtype=torch.bool)
        if profile == "special":
            return special
        if profile == "local":
            return special | view.shared(fill(none, recency(view), rest, view.alive & ~special[0]))
        if profile == "frequency":
            return fill(special, view.acc_mass, rest, view.alive)
        if profile == "mixed":
            local = special | view.shared(fill(none, recency(view), rest // 2, view.alive & ~special[0]))
            return fill(local, view.acc_mass, rest - rest // 2, view.alive)
        if int(view.alive.sum()) <= k:  # "full": only when everything fits
            return view.shared(view.alive.clone())
        return None

    def choose(self, view: StepView) -> list[str]:
        """Per KV head, the profile the prompt's observation rows ask for."""
        mass = view.prompt_mass[:, : view.num_pages]
        total = mass.sum(dim=1).clamp(min=1e-30)
        candidates = []  # (profile, pages kept [H_kv], recovered [H_kv])
        for profile in PROFILES:
            pages = self.profile_pages(view, profile)
            if pages is not None:
                candidates.append((profile, pages.sum(dim=1), (mass * pages).sum(dim=1) / total))
        chosen = []
        for h in range(view.num_kv_heads):
            enough = [c for c in candidates if float(c[2][h]) >= self.config.fastgen_recovery]
            if enough:
                best = min(enough, key=lambda c: (int(c[1][h]), -float(c[2][h]), PROFILES.index(c[0])))
            else:
                best = max(candidates, key=lambda c: (float(c[2][h]), -PROFILES.index(c[0])))
            chosen.append(best[0])
        return chosen

    def keep(self, view: StepView) -> torch.Tensor:
        chosen = view.state.get("fastgen")
        if chosen is None:
            chosen = view.state["fastgen"] = self.choose(view)
        keep = torch.zeros(view.num_kv_heads, view.num_pages, dtype=torch.bool)
        for profile in set(chosen):
            pages = self.profile_pages(view, profile)
            if pages is None:  # "full" no longer fits the budget: the closest profile that does
                pages = self.profile_pages(view, "mixed")
            heads = torch.tensor([c == profile for c in chosen])
            keep[heads] = pages[heads]
        return keep
