"""Asking the KV policy which complete pages a decode query attends (`offload.policies`).

`select` builds each sequence's `StepView` from its page table, calls the policy, checks what
it returned, and turns it into what planning needs: the pages each sequence attends, the ones
beyond the required sinks and recent window (recall bookkeeping), per-head masks when KV heads
chose differently, and SparQ's output interpolation. `drop_unkept` applies effect="drop".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from offload.policies import Interpolation, KVPolicy, StepView
from offload.policies.base import BatchView
from offload.policies.oracle import exact_page_mass, oracle_pages
from offload.store.layout import page_tokens
from offload.store.page_table import PageTable


@dataclass(slots=True)
class Selection:
    attend: torch.Tensor  # [B, max_pages] bool: the complete pages attended (sparse mode)
    needed: torch.Tensor  # [B, max_pages] bool: ... of which beyond the required ones (prefetch recall counts these)
    per_sequence: list[torch.Tensor] | None  # per sequence: [H_kv, num_complete] bool, the policy's answer
    head_keep: torch.Tensor | None  # [B, H_kv, max_pages] bool when KV heads chose differently
    interpolation: list[Interpolation | None]
    counts: list[int] | None = None  # a batched policy's answer is attend[:, :counts[b]], made per sequence on demand
    num_kv_heads: int = 1

    @property
    def keep(self) -> list[torch.Tensor]:
        """Per sequence: [H_kv, num_complete] bool, the policy's answer (merging and drops read it)."""
        if self.per_sequence is None:
            self.per_sequence = [self.attend[b, :n][None, :].expand(self.num_kv_heads, -1)
                                 for b, n in enumerate(self.counts)]
        return self.per_sequence


def _open_prompt(table: PageTable) -> None:
    """At the first decode step after a prefill: the prompt's observation becomes what SnapKV-like
    policies read, and per-sequence policy state starts afresh."""
    if table.prompt_open:
        table.prompt_mass = table.last_mass.clone()
        table.prompt_length = list(table.length)
        table.policy_state = [{} for _ in range(table.batch_size)]
        table.prompt_open = False


def view_of(table: PageTable, b: int, policy_budget: int, query: torch.Tensor, layer: int, num_layers: int,
            scale: float) -> StepView:
    """Sequence b's `StepView` (query [H, Q, D])."""
    n = table.num_complete(b)
    ps = table.layout.page_size
    used = table.length[b] % ps
    pool = table.device_pool

    def read_keys(pages: torch.Tensor) -> torch.Tensor:
        return table.home.read(table.page_ids[b, pages].flatten())[0].reshape(*pages.shape, *table.layout.page_shape).float()

    def charge(num_bytes: int) -> None:
        table.counters.policy_read_bytes += int(num_bytes)

    def mean_values() -> torch.Tensor:
        count = int(table.alive(b).sum()) * ps + used
        return (table.value_sum[b] / max(1, count)).to(query.device)

    summaries = table.float_summaries() if table.key_min is not None else None
    layout = table.layout
    tail = (page_tokens(pool.keys[table.tail_slot[b], :, :used][None]).float() if used  # [used, H_kv, D]
            else pool.keys.new_zeros(0, layout.num_kv_heads, layout.head_dim, dtype=torch.float32))
    return StepView(
        layer=layer, num_layers=num_layers, num_pages=n, length=table.length[b], page_size=ps,
        budget=policy_budget, sink_pages=table.rules.sink_pages, recent_tokens=table.rules.recent_tokens,
        alive=table.alive(b), query=query,
        key_min=summaries[0][b, :n] if summaries is not None else None,
        key_max=summaries[1][b, :n] if summaries is not None else None,
        acc_mass=table.acc_mass[b, :, :n], last_mass=table.last_mass[b, :, :n], prompt_mass=table.prompt_mass[b, :, :n],
        prompt_length=table.prompt_length[b], state=table.policy_state[b], scale=scale,
        read_keys=read_keys, tail_keys=tail, charge=charge, mean_values=mean_values,
        resident=table.on_device_mask(n)[b],
    )


def keep_batched(table: PageTable, policy: KVPolicy, query: torch.Tensor, scale: float) -> torch.Tensor | None:
    """[B, width] bool: the complete pages a batched policy (`KVPolicy.keep_batch`) keeps for query
    [B, H, Q, D], in one call for the whole batch (width: the most complete pages of a sequence;
    False past each sequence's own); None when the policy has no batched form."""
    if policy.keep_batch is None:
        return None
    counts = [table.num_complete(b) for b in range(table.batch_size)]
    width = max(counts, default=0)
    if width == 0:
        return torch.zeros(table.batch_size, 0, dtype=torch.bool)
    num_pages = torch.tensor(counts, dtype=torch.long)
    real = table.complete_mask(list(range(table.batch_size)), width)
    alive = (table.page_ids[:, :width] >= 0) & real
    resident = table.on_device_mask(width) & real
    summaries = table.float_summaries() if table.key_min is not None else None
    view = BatchView(
        num_pages=num_pages, length=table.lengths_of(), page_size=table.layout.page_size,
        budget=table.rules.token_budget, sink_pages=table.rules.sink_pages, recent_tokens=table.rules.recent_tokens,
        alive=alive, query=query, key_min=summaries[0][:, :width] if summaries else None,
        key_max=summaries[1][:, :width] if summaries else None, resident=resident, scale=scale)
    keep = policy.keep_batch(view)
    if keep.shape != (table.batch_size, width) or keep.dtype != torch.bool:
        raise RuntimeError(f"policy {policy.name!r} returned {tuple(keep.shape)} {keep.dtype} from keep_batch; "
                           f"expected ({table.batch_size}, {width}) bool")
    if (keep & ~alive).any():
        raise RuntimeError(f"policy {policy.name!r} kept a page that was dropped")
    return keep


def select(table: PageTable, policy: KVPolicy, query: torch.Tensor, layer: int, num_layers: int,
           scale: float, measure: bool = False) -> Selection:
    """The policy's pages for every sequence of this decode step (query [B, H, Q, D]). With
    `measure` (benchmarks), each choice is also compared with exact attention (`measure_choice`)."""
    _open_prompt(table)
    bsz, num_kv = table.batch_size, table.layout.num_kv_heads
    attend = torch.zeros(bsz, table.max_pages, dtype=torch.bool)
    keeps, interps = [], []
    per_head = False
    batched = keep_batched(table, policy, query, scale) if not measure else None
    if batched is not None:  # (one selection for every KV head: checked by keep_batched)
        attend[:, : batched.shape[1]] = batched
        keeps = None  # (made from attend where asked for)
        interps = [None] * bsz
    else:
        for b in range(bsz):
            view = view_of(table, b, table.rules.token_budget, query[b], layer, num_layers, scale)
            keep = policy.keep(view)
            n = view.num_pages
            if keep.shape != (num_kv, n) or keep.dtype != torch.bool:
                raise RuntimeError(f"policy {policy.name!r} returned {tuple(keep.shape)} {keep.dtype}; "
                                   f"expected ({num_kv}, {n}) bool")
            if (keep & ~view.alive[None, :]).any():
                raise RuntimeError(f"policy {policy.name!r} kept a page that was dropped")
            union = keep.any(dim=0)
            per_head |= bool((keep != union[None, :]).any())
            attend[b, :n] = union
            keeps.append(keep)
            interp = policy.interpolation()
            interps.append(interp if interp is not None and not bool(keep.all()) else None)
            if measure:
                measure_choice(table, view, keep)
    needed = attend & ~table.required_mask(list(range(bsz)), table.max_pages)
    head_keep = None
    if per_head:
        head_keep = torch.zeros(bsz, num_kv, table.max_pages, dtype=torch.bool)
        for b, keep in enumerate(keeps):
            head_keep[b, :, : keep.shape[1]] = keep
    return Selection(attend, needed, keeps, head_keep, interps,
                     counts=[table.num_complete(b) for b in range(bsz)], num_kv_heads=num_kv)


def drop_unkept(table: PageTable, selection: Selection) -> None:
    """effect="drop": free, in every tier, each alive complete page no KV head kept (copies must be complete)."""
    for b, keep in enumerate(selection.keep):
        dead = (table.alive(b) & ~keep.any(dim=0)).nonzero().flatten().tolist()
        for p in dead:
            table.drop_page(b, p)


def observe(table: PageTable, head_mass: torch.Tensor, decode: bool, rows: int) -> None:
    """Record a step's attention mass per KV head and page [B, H_kv, max_pages + 1], summed over
    `rows` observed query rows: accumulated as is (H2O), and per row as the last step's (TOVA), so
    a page's stale score from a many-row prefill compares fairly with a one-row decode step's."""
    table.acc_mass += head_mass
    table.last_mass = torch.where(head_mass > 0, head_mass / max(1, rows), table.last_mass)
    if not decode:
        table.prompt_open = True


def interpolate(out: torch.Tensor, lse: torch.Tensor, selection: Selection, valid: torch.Tensor):
    """SparQ: out = alpha * out + (1 - alpha) * mean(V) per sequence that has an interpolation;
    the lse becomes that of the mixture (lse - log alpha). out [B, H, T, D], valid [B, T]."""
    for b, interp in enumerate(selection.interpolation):
        if interp is None:
            continue
        alpha = interp.alpha.to(out.device).clamp(min=1e-30, max=1.0)  # [H, T]
        group = out.shape[1] // interp.mean_values.shape[0]
        mean_v = interp.mean_values.to(out.device).repeat_interleave(group, dim=0)  # [H, D]
        rows = valid[b].to(out.device)[None, :, None]
        mixed = alpha[..., None] * out[b] + (1 - alpha[..., None]) * mean_v[:, None, :]
        out[b] = torch.where(rows, mixed, out[b])
        lse[b] = torch.where(rows[..., 0], lse[b] - alpha.log(), lse[b])
    return out, lse


def measure_choice(table: PageTable, view: StepView, keep: torch.Tensor) -> None:
    """Benchmarks only (it reads every key, uncounted): how a policy's choice compares with exact
    attention over the pages the sequence holds. Counts the oracle's top pages per KV head at the
    same budget and how many of them were kept (selection recall), and the attention mass that
    fell outside the kept pages (mass captured = 1 - missed / rows)."""
    measured = dataclasses.replace(view, charge=lambda num_bytes: None)
    pages = view.alive.nonzero().flatten()
    mass = exact_page_mass(measured, pages)  # [H_kv, P], each query row's mass sums to 1 with the tail's
    oracle = oracle_pages(view, mass)  # (a budget covering every page: all of them)
    counters = table.counters
    counters.oracle_pages += int(oracle.sum())
    counters.oracle_hits += int((oracle & keep).sum())
    counters.mass_missed += float((mass * ~keep).sum())
    counters.mass_measured_rows += view.query.shape[0] * view.query.shape[1]
