"""The three seams a policy plugs into. Each is a one-method strategy; policies see tensors only.

- `PageSelector.score`: how relevant each page is to a query (which pages a query needs).
- `PageScorer.update`: criticality from observed attention (which pages stay resident).
- `EvictionOrder.priority`: what leaves a tier first (device residency, the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.store.layout import page_tokens


class PageSelector:
    """Estimates, from page summaries alone, how much a query will attend each page."""

    name = "base"

    def score(self, query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
        """query [B, H, Q, D]; key_min/key_max [B, P, H_kv, D] -> [B, P] float32, higher = more needed."""
        raise NotImplementedError


class PageScorer:
    """Turns observed attention into page scores."""

    name = "base"

    def update(self, scores: torch.Tensor, page_mass: torch.Tensor) -> torch.Tensor:
        """Return new scores.

        scores:    [B, max_pages] float32, the current scores (0 for pages never seen)
        page_mass: [B, max_pages] float32, attention mass each page received this step,
                   summed over heads and the observed queries (rows of one query sum to 1)
        """
        raise NotImplementedError

    def add_readers(self, scores: torch.Tensor, page_mass: torch.Tensor) -> torch.Tensor:
        """Return scores that also count `page_mass` [B, max_pages] of other layers reading these pages
        in the same step (cross-layer KV sharing: consumers attend their producer's pages), so the
        pages' residency and eviction serve every reader. Added as this step's mass, without another
        decay step."""
        return scores.add_(page_mass)


@dataclass(slots=True)
class EvictionCandidates:
    """What an eviction order may look at, one entry per candidate (a page, or a cached prefix page).

    score:           [n] float64 criticality (0 where a tier keeps none)
    last_access:     [n] float64 logical clock of the last use (higher = more recent)
    resident:        [n] bool, already in the tier (moving it costs a copy)
    recently_needed: [n] bool, selected by the last query
    position:        [n] float64 page position in its sequence (higher = newer)
    """

    score: torch.Tensor
    last_access: torch.Tensor
    resident: torch.Tensor
    recently_needed: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, n: int, **given: torch.Tensor) -> "EvictionCandidates":
        """Candidates with the given fields and neutral values for the rest."""
        zeros = torch.zeros(n, dtype=torch.float64)
        fields = dict(score=zeros, last_access=zeros, resident=torch.zeros(n, dtype=torch.bool),
                      recently_needed=torch.zeros(n, dtype=torch.bool), position=zeros)
        fields.update({k: v.to(fields[k].dtype) for k, v in given.items()})
        return cls(**fields)


class EvictionOrder:
    """Ranks candidates for a tier: the lowest priority leaves first, the highest stays."""

    name = "base"

    def priority(self, candidates: EvictionCandidates) -> torch.Tensor:
        """[n] float64; ties are broken by position (the older page leaves first). Element-wise:
        device residency passes [B, P] candidates (every sequence of a batch at once) and expects
        [B, P] back."""
        raise NotImplementedError


def keep_order(order: EvictionOrder, candidates: EvictionCandidates) -> list[int]:
    """Candidate indices, the one to keep first; equal priorities keep the newer position first."""
    priority = order.priority(candidates).tolist()
    position = candidates.position.tolist()
    return sorted(range(len(priority)), key=lambda i: (-priority[i], -position[i]))


# ---------------------------------------------------------------------------------------------
# KV policies: which complete pages a layer attends at a decode step (and, with effect="drop",
# which it keeps at all). One policy per file; `offload.policies.POLICIES` maps names to classes.


@dataclass(slots=True)
class StepView:
    """What a policy sees for one sequence of one layer at one decode step. Pages are complete
    pages 0..num_pages-1 (the tail page, still filling, is always attended). Masses are per KV
    head, summed over the query heads of its group and the observed query rows.

    budget:       tokens this layer may attend, the tail's included (`budget_pages` complete pages)
    alive:        [P] bool, the page exists (effect="drop" frees pages for good)
    query:        [H, Q, D] the step's queries
    key_min/max:  [P, H_kv, D] float32 page summaries (None on layers without them)
    acc_mass:     [H_kv, P] attention mass summed over every step so far, never decayed
    last_mass:    [H_kv, P] the mass of the last step that attended the page
    prompt_mass:  [H_kv, P] the prompt's observation window: the last prefill step's observed rows
    prompt_length: tokens stored when the prompt ended (-1: no prompt seen)
    state:        per sequence, a policy's own memory (emptied when a new prompt is stored)
    read_keys:    callable(pages [n] long) -> keys [n, H_kv, page_size, D] float32 from their tier (pages' layout)
    tail_keys:    [t, H_kv, D] float32, the keys of the tail page (always attended)
    charge:       callable(bytes): a policy that reads keys reports the bytes it read
    mean_values:  callable() -> [H_kv, D], the mean of every stored value (SparQ)
    resident:     [P] bool, the page is on the device or being copied there (None: unknown)
    """

    layer: int
    num_layers: int
    num_pages: int
    length: int
    page_size: int
    budget: int
    sink_pages: int
    recent_tokens: int
    alive: torch.Tensor
    query: torch.Tensor
    key_min: torch.Tensor | None
    key_max: torch.Tensor | None
    acc_mass: torch.Tensor
    last_mass: torch.Tensor
    prompt_mass: torch.Tensor
    prompt_length: int
    state: dict
    scale: float
    read_keys: object = None
    tail_keys: torch.Tensor | None = None
    charge: object = None
    mean_values: object = None
    resident: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.acc_mass.shape[0]

    @property
    def budget_pages(self) -> int:
        """Complete pages that fit the budget beside the tail's tokens."""
        return max(0, (self.budget - self.length % self.page_size) // self.page_size)

    def stored_keys(self, pages: torch.Tensor) -> torch.Tensor:
        """[n * page_size + t, H_kv, D] float32: the keys of `pages` (read from their tier), then the tail's."""
        page_keys = page_tokens(self.read_keys(pages).to(self.query.device))  # [n * ps, H_kv, D]
        return torch.cat([page_keys, self.tail_keys.to(page_keys)], dim=0)

    def page_mass(self, probs: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """[H_kv, P]: the attention probabilities [H, Q, T] over `stored_keys(pages)` summed per page
        (over its tokens, the query rows and the query heads of each KV head); 0 for other pages."""
        num_heads, q_len, _ = probs.shape
        n = pages.numel()
        mass = probs[..., : n * self.page_size].reshape(num_heads, q_len, n, self.page_size).sum(dim=(1, 3))
        out = torch.zeros(self.num_kv_heads, self.num_pages)
        out[:, pages] = mass.reshape(self.num_kv_heads, num_heads // self.num_kv_heads, n).sum(dim=1).cpu()
        return out

    def shared(self, keep: torch.Tensor) -> torch.Tensor:
        """[P] bool -> [H_kv, P]: the same pages for every KV head."""
        return keep[None, :].expand(self.num_kv_heads, -1).clone()


@dataclass(slots=True)
class BatchView:
    """What a batched policy (`KVPolicy.keep_batch`) sees for every sequence of one layer at one
    decode step: `StepView`'s fields that a page-summary selector reads, padded to P pages.

    num_pages:  [B] long, complete pages per sequence (pages at or past it are padding)
    length:     [B] long, stored tokens per sequence
    alive:      [B, P] bool, the page exists (False for padding)
    query:      [B, H, Q, D]
    key_min/max: [B, P, H_kv, D] float32 summaries (None on layers without them)
    resident:   [B, P] bool, on the device or being copied there
    """

    num_pages: torch.Tensor
    length: torch.Tensor
    page_size: int
    budget: int
    sink_pages: int
    recent_tokens: int
    alive: torch.Tensor
    query: torch.Tensor
    key_min: torch.Tensor | None
    key_max: torch.Tensor | None
    resident: torch.Tensor
    scale: float

    @classmethod
    def of(cls, view: StepView) -> "BatchView":
        """A batch of one: `view`'s sequence (nothing counts as resident where `view` does not say)."""
        resident = view.resident if view.resident is not None else torch.zeros(view.num_pages, dtype=torch.bool)
        return cls(
            num_pages=torch.tensor([view.num_pages]), length=torch.tensor([view.length]), page_size=view.page_size,
            budget=view.budget, sink_pages=view.sink_pages, recent_tokens=view.recent_tokens, alive=view.alive[None],
            query=view.query[None], key_min=None if view.key_min is None else view.key_min[None],
            key_max=None if view.key_max is None else view.key_max[None], resident=resident[None], scale=view.scale)

    @property
    def budget_pages(self) -> torch.Tensor:
        """[B] long: complete pages that fit the budget beside each tail's tokens."""
        # (torch's functions rather than `-` / `//` on an int and a tensor: those go through Python wrappers)
        room = torch.rsub(self.length.remainder(self.page_size), self.budget)
        return room.div(self.page_size, rounding_mode="floor").clamp(min=0)


@dataclass(slots=True)
class Interpolation:
    """SparQ's mean-value interpolation: out = alpha * attention(kept) + (1 - alpha) * mean(V).

    alpha: [H, Q] the approximate attention mass of the attended keys; mean_values [H_kv, D]."""

    alpha: torch.Tensor
    mean_values: torch.Tensor


class KVPolicy:
    """Chooses, per KV head, the complete pages a decode query attends.

    `evicts`: an eviction policy (its choice may be final: effect="drop" frees what it leaves);
    a query-aware selector (False) re-chooses from every page each step and never drops.
    `keep` returns [H_kv, P] bool with at most `view.budget_pages` pages per head, each alive."""

    name = "base"
    evicts = True
    per_head = False  # True: heads may keep different pages (attended through the device part)
    reads_keys = False  # True: `keep` reads keys (not only summaries and observed mass)
    speculates = False  # True: speculative prefetch (the `selector`'s pages for a predicted query) serves it
    needs_mean_values = False  # True: `StepView.mean_values` is read (the store then tracks value sums)
    binds_merges = False  # merging: True binds a merged token to its most similar kept page (D2O)
    merges = False  # True: each page left out is merged into one token per KV head and attended (store/merging.py)

    def __init__(self, config) -> None:
        self.config = config

    def keep(self, view: StepView) -> torch.Tensor:
        raise NotImplementedError

    # A policy that chooses from page summaries alone may also choose for a whole batch at once:
    # `keep_batch(BatchView) -> [B, P] bool`, one selection per sequence shared by its KV heads,
    # equal to `keep` of each sequence's `StepView`. The store then skips the per-sequence calls
    # (and `interpolation`: a batched policy corrects no output).
    keep_batch = None

    def interpolation(self) -> "Interpolation | None":
        """After `keep`: an output correction to apply (SparQ), or None."""
        return None

    def device_weights(self, num_layers: int) -> list[float] | None:
        """How the device page slots beyond each layer's minimum are shared over layers (relative
        weights), or None: evenly."""
        return None


def newest(view: StepView, k: int) -> torch.Tensor:
    """[P] bool: the k newest alive pages."""
    keep = torch.zeros(view.num_pages, dtype=torch.bool)
    alive = view.alive.nonzero().flatten()
    if k > 0 and alive.numel():
        keep[alive[-k:]] = True
    return keep


def recency(view: StepView) -> torch.Tensor:
    """[P] float: a score that ranks newer pages first."""
    return torch.arange(view.num_pages, dtype=torch.float32)


def sinks(view: StepView, k: int) -> torch.Tensor:
    """[P] bool: the first k pages, where alive."""
    keep = torch.zeros(view.num_pages, dtype=torch.bool)
    keep[: max(0, k)] = True
    return keep & view.alive


def fill(keep: torch.Tensor, score: torch.Tensor, k: int, alive: torch.Tensor) -> torch.Tensor:
    """Add, per row of keep [R, P] (or [P]), the k highest-scoring alive pages not kept yet
    (ties: the newer page). Returns a new tensor."""
    squeeze = keep.dim() == 1
    keep, score = (keep[None], score[None]) if squeeze else (keep, score)
    keep = keep.clone()
    if k > 0:
        num_pages = keep.shape[1]
        # A tiny ramp breaks ties towards newer pages, deterministically.
        ranked = score.double() + torch.arange(num_pages, dtype=torch.float64) * 1e-12
        ranked = ranked.masked_fill(keep | ~alive[None, :], float("-inf"))
        top = ranked.topk(min(k, num_pages), dim=1)
        finite = torch.isfinite(top.values)
        rows = torch.arange(keep.shape[0])[:, None].expand_as(top.indices)
        keep[rows[finite], top.indices[finite]] = True
    return keep[0] if squeeze else keep


def sinks_and_recent(view: "BatchView") -> torch.Tensor:
    """[B, P] bool: the sink pages, then the newest pages of the recent window, together at most
    half of each sequence's page budget (the rest is the policy's to choose). Quest's fixed part,
    and the oracle's."""
    num_pages = view.alive.shape[1]
    fixed = view.budget_pages.div(2, rounding_mode="floor")
    position = torch.arange(num_pages)
    sink_pages = torch.clamp(fixed, max=view.sink_pages)
    required = (position[None, :] < sink_pages[:, None]) & view.alive
    if view.recent_tokens > 0:
        first = (view.length - view.recent_tokens).clamp(min=0).div(view.page_size, rounding_mode="floor")
        window = view.alive & (position[None, :] >= first[:, None]) & ~required
        # The newest `fixed - sinks` window pages: those with at most that many window pages at or after them.
        from_end = window.flip(1).cumsum(dim=1).flip(1)
        required = required | (window & (from_end <= (fixed - required.sum(dim=1))[:, None]))
    return required


def fill_rows(keep: torch.Tensor, score: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`fill` with its own k per row: add to each row of keep [B, P] its k[b] highest-scoring
    allowed pages not kept yet (ties: the newer page). Returns a new tensor."""
    keep = keep.clone()
    k = k.clamp(min=0)
    most = int(k.max()) if k.numel() else 0
    if most > 0:
        num_pages = keep.shape[1]
        ranked = score.double() + torch.arange(num_pages, dtype=torch.float64) * 1e-12
        ranked = ranked.masked_fill(keep | ~allowed, float("-inf"))
        top = ranked.topk(min(most, num_pages), dim=1)
        take = torch.isfinite(top.values) & (torch.arange(top.indices.shape[1])[None, :] < k[:, None])
        rows = torch.arange(keep.shape[0])[:, None].expand_as(top.indices)
        keep[rows[take], top.indices[take]] = True
    return keep
