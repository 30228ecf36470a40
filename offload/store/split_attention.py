"""Running a `LayerPlan`: the device part and the host part of one layer's attention, merged by LSE.

The host part (pages that are not resident) runs through the paged CPU kernels, on a worker
thread when there is an accelerator (inline when the CPU is the device: there is nothing for it
to overlap with but the same cores), while this thread computes the device part (resident
pages, the tail, the new tokens).
Both return `(out, lse)` and per-key or per-page log-sum-exps of the observed query rows, so the
attention mass each page received comes out of the run itself: criticality never recomputes q.k.
A failed host kernel falls back to the torch kernel; a failure there too is raised.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from offload.kernels.merge import merge_parts
from offload.kernels.torch_ref import dense_attention_scores, prefill_attention_scores
from offload.store.append import write_tails
from offload.store.page_table import PageTable
from offload.store.planner import LayerPlan
from offload.store.residency import log_once
from offload.store.tiers import PagesLost, attend_pages


@dataclass(slots=True)
class HostResult:
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    page_lse: torch.Tensor | None = None  # [B, H, observe, n_host]
    seconds: float = 0.0
    error: BaseException | None = None


@dataclass(slots=True)
class RunResult:
    out: torch.Tensor  # [B, H, T, D] float32, zeros for padding rows
    lse: torch.Tensor  # [B, H, T] float32, -inf for rows with no key
    head_mass: torch.Tensor  # [B, H_kv, max_pages + 1] float32, attention mass per KV head and page (observed rows)

    @property
    def page_mass(self) -> torch.Tensor:
        """[B, max_pages + 1] float32, attention mass per page, summed over heads."""
        return self.head_mass.sum(dim=1)


class SplitAttention:
    """Runs plans of one store: which CPU kernel, how many threads, which worker thread."""

    def __init__(self, cpu_kernel: str, cpu_threads: int | None, executor: Executor | None) -> None:
        self.cpu_kernel = cpu_kernel
        self.cpu_threads = cpu_threads
        self.executor = executor

    def run(self, plan: LayerPlan, table: PageTable, query, new_keys, new_values, scale: float,
            softcap: float | None = None) -> RunResult:
        """query [B, H, T, D]; new_keys/new_values [B, H_kv, T, D] (the step's new tokens).
        softcap: attention logit soft-capping (Gemma 2), in both parts."""
        observe = plan.observe
        has_host = bool(plan.host_counts.any())
        future, host = None, None
        if has_host:
            args = (query, table, plan, scale, observe, None, softcap)
            future = self.executor.submit(self._host_part, *args) if self.executor else None
            host = self._host_part(*args) if future is None else None

        start = time.perf_counter()
        paged, paged_pages, device_slots, device_pos, folded = self._paged_device_part(
            plan, table, query, new_keys, new_values, scale, softcap, has_host)
        layout = table.layout
        parts = []  # the device part's pieces, then the host part's: merged once, by LSE
        pages_lse = []  # (page_lse, logical pages) of each part the paged kernel ran
        key_lse = host_key_pos = None
        if not folded:  # the tail, the new tokens and any gathered pages, attended through a mask
            keys, values, key_pos, host_key_pos = self._gather_device(plan, table, new_keys, new_values, device_slots,
                                                                      device_pos)
            # (plan tensors live on the CPU: copies to a GPU are issued without waiting for its queue)
            new_pos = plan.new_pos.to(key_pos.device, non_blocking=True)
            if _plain_prefill(plan, key_pos, new_pos, query, softcap):
                prefix = key_pos.shape[1] - new_pos.shape[1]
                out_d, lse_d, key_lse = prefill_attention_scores(query, keys, values, key_pos[:, :prefix] >= 0, scale,
                                                                 observe)
            else:
                out_d, lse_d, key_lse = self._masked_device_part(plan, table, query, keys, values, key_pos, new_pos,
                                                                 scale, softcap, observe)
            # (key_lse: the observed rows' scores; a key's score is its own log-sum-exp)
            parts.append((out_d, lse_d))
            table.counters.device_read_bytes += int((host_key_pos >= 0).sum()) * layout.page_bytes // layout.page_size
        if paged is not None:
            parts.append((paged.out.to(query.device), paged.lse.to(query.device)))
            pages_lse.append((paged.page_lse, paged_pages))
        table.counters.device_attn_s += time.perf_counter() - start
        table.counters.host_read_bytes += int(plan.host_counts.sum()) * layout.page_bytes
        num_device = len(parts)
        if has_host:
            if future is not None:
                host = future.result()
            if isinstance(host.error, PagesLost):
                raise host.error  # the store recomputes them (a kernel fallback cannot bring them back)
            if host.error is not None:
                table.counters.failed_kernels += 1
                log_once("kernel", f"the {self.cpu_kernel} host attention kernel failed", host.error)
                host = self._host_part(query, table, plan, scale, observe, "torch", softcap)
                if host.error is not None:
                    raise host.error
            table.counters.host_attn_s += host.seconds
            parts.append((host.out.to(query.device), host.lse.to(query.device)))
            pages_lse.append((host.page_lse, plan.host_pages))
        out, lse, weights = merge_parts(parts)
        if plan.decode:
            share = weights[:num_device].sum(dim=0)  # [B, H, Q], the device part's share of each row
            real = plan.new_pos >= 0
            mass = (share * real.to(share.device, non_blocking=True)[:, None, :]).sum()
            # (on a GPU the sum stays there until stats are read: no wait for its queue here)
            table.counters.mass_device += mass if mass.device.type != "cpu" else float(mass)
            table.counters.mass_rows += int(real.sum()) * share.shape[1]
        # Padding rows see no key: zeros (their lse is -inf in every part, so the merge gave zeros too).
        out = out.masked_fill((plan.new_pos < 0).to(out.device, non_blocking=True)[:, None, :, None], 0.0)
        mass = self._page_mass(table, lse[:, :, lse.shape[2] - observe :], key_lse, host_key_pos, pages_lse)
        return RunResult(out, lse, mass)

    @staticmethod
    def _masked_device_part(plan: LayerPlan, table: PageTable, query, keys, values, key_pos, new_pos, scale, softcap,
                            observe: int):
        """The device part through a [B, Q, T] visibility mask (causal, window, chunk, per-head pages)."""
        visible = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= new_pos[:, :, None])
        if plan.window is not None:  # transformers' sliding window: kv_idx > q_idx - window
            visible &= key_pos[:, None, :] > new_pos[:, :, None] - plan.window
        if plan.chunk is not None:  # transformers' chunked attention: the same chunk of real positions
            visible &= key_pos[:, None, :].div(plan.chunk, rounding_mode="floor") == new_pos[:, :, None].div(
                plan.chunk, rounding_mode="floor")
        if plan.head_keep is not None:  # per-head selections: each KV head sees its own pages
            ps = table.layout.page_size
            page = key_pos.clamp(min=0).div(ps, rounding_mode="floor").clamp(max=table.max_pages)
            head_keep = plan.head_keep.to(key_pos.device)
            seen = head_keep.gather(2, page[:, None, :].expand(-1, head_keep.shape[1], -1))  # [B, H_kv, T_dev]
            visible = visible[:, None, :, :] & seen[:, :, None, :]
        return dense_attention_scores(query, keys, values, visible, scale, softcap, score_rows=observe)

    # ------------------------------------------------------------------ parts
    def _paged_device_part(self, plan: LayerPlan, table: PageTable, query, new_keys, new_values, scale, softcap,
                           has_host: bool):
        """On the CPU the device pool is host memory: its complete pages (every query sees all their
        keys) go through the paged kernel in place rather than gathered into a contiguous copy.

        A decode step of one real token per sequence folds the rest of the device part in: each
        tail joins as its sequence's last page, the new token written into the tail slot first
        (past the stored length, so nothing counts as stored: `append` writes the same token there
        again, and a step run again writes it again), and one paged call is the whole device part.
        Returns (the paged part's Partial or None, its logical pages [B, n] (-1: none), the device
        slots and key positions left for the gathered path, whether the tails and new tokens are in)."""
        slots, positions = plan.device_slots, plan.device_pos
        pool = table.device_pool
        if (pool.device.type != "cpu" or plan.head_keep is not None or plan.window is not None
                or plan.chunk is not None):
            return None, None, slots, positions, False
        ps = table.layout.page_size
        num_dev = slots.shape[1] - 1  # (the last column is the tail)
        page_pos = positions[:, : num_dev * ps : ps]
        counts = (page_pos >= 0).sum(dim=1)
        tails = slots[:, num_dev]
        fold = (plan.decode and new_keys.shape[2] == 1 and plan.gather_ids is None
                and bool((plan.new_pos >= 0).all()) and bool((tails >= 0).all()))
        if not fold:
            if num_dev == 0:
                return None, None, slots, positions, False
            # A layer reading another's KV may find pages reaching its queries' own positions: those
            # need the causal mask, so such a step gathers as before.
            earliest = torch.where(plan.new_pos >= 0, plan.new_pos, torch.iinfo(torch.long).max).amin(dim=1)
            before = bool(((page_pos < 0) | (page_pos + ps <= earliest[:, None])).all())
            if not before or not bool(counts.any()):
                return None, None, slots, positions, False
        # The kernel's helper threads serve one call at a time: beside a host part running at the
        # same time (on the worker) that reads at least as many pages, the device part takes one
        # thread and leaves them.
        smaller = (has_host and self.executor is not None
                   and int(counts.sum()) <= int(plan.host_counts.sum()))
        listed, num, last = slots[:, :num_dev], counts, None
        if fold:
            write_tails(table, new_keys, new_values)
            lengths = table.lengths_of()  # (before this step's token)
            offset = lengths.remainder(ps)
            listed = torch.cat([listed, tails[:, None]], dim=1).scatter_(1, counts[:, None], tails[:, None])
            num, last = counts + 1, offset + 1
        try:
            paged = attend_pages(query, pool.keys, pool.values, listed, num, scale, plan.observe, softcap,
                                 self.cpu_kernel, 1 if smaller else self.cpu_threads, last=last)
        except Exception as exc:  # the gathered torch path is always there
            table.counters.failed_kernels += 1
            log_once("kernel", f"the {self.cpu_kernel} kernel failed (on the device pool)", exc)
            return None, None, slots, positions, False
        read = int(counts.sum()) * table.layout.page_bytes
        pages = torch.where(page_pos >= 0, page_pos.div(ps, rounding_mode="floor"), -1)
        if not fold:
            table.counters.device_read_bytes += read
            return paged, pages, slots[:, num_dev:], positions[:, num_dev * ps :], False
        table.counters.device_read_bytes += read + int(last.sum()) * table.layout.page_bytes // ps
        tail_pages = lengths.div(ps, rounding_mode="floor")[:, None]
        pages = torch.cat([pages, tail_pages], dim=1).scatter_(1, counts[:, None], tail_pages)
        return paged, pages, slots[:, :0], positions[:, :0], True

    def _gather_device(self, plan: LayerPlan, table: PageTable, new_keys, new_values, device_slots, device_pos):
        """Contiguous K/V of the device part's `device_slots` [B, n] (key positions `device_pos`
        [B, n * page_size]), the gathered pages and the new tokens: [B, H_kv, T_dev, D] each, and key
        positions [B, T_dev] (-1 = no key) on the device and on the CPU."""
        pool = table.device_pool
        slots = device_slots.to(pool.device, non_blocking=True)
        bsz, num_kv, head_dim = table.batch_size, table.layout.num_kv_heads, table.layout.head_dim

        def per_head(pages: torch.Tensor) -> torch.Tensor:  # pages [B * n, H_kv, S, D] -> [B, H_kv, n * S, D]
            return pages.reshape(bsz, -1, *pages.shape[1:]).transpose(1, 2).reshape(bsz, num_kv, -1, head_dim)

        key_parts = [per_head(pool.keys[slots.flatten()])]
        value_parts, pos_parts = [per_head(pool.values[slots.flatten()])], [device_pos]
        if plan.gather_ids is not None:  # host pages read here (window pages, per-head selections), masked like the rest
            ps = table.layout.page_size
            real = (plan.gather_pos[:, ::ps] >= 0).flatten()  # (padding entries hold no page: zeros)
            keys = torch.zeros(real.numel(), *table.layout.page_shape, dtype=table.layout.dtype)
            values = torch.zeros_like(keys)
            if bool(real.any()):
                keys[real], values[real] = table.home.read(plan.gather_ids.flatten()[real])
            key_parts.append(per_head(keys).to(pool.device))
            value_parts.append(per_head(values).to(pool.device))
            pos_parts.append(plan.gather_pos)
        keys = torch.cat([*key_parts, new_keys], dim=2)
        values = torch.cat([*value_parts, new_values], dim=2)
        if new_keys.shape[2]:  # (a layer reading stored KV only brings queries, no new keys)
            pos_parts.append(plan.new_pos)
        host_key_pos = torch.cat(pos_parts, dim=1)
        return keys, values, host_key_pos.to(pool.device, non_blocking=True), host_key_pos

    def _host_part(self, query, table: PageTable, plan: LayerPlan, scale, observe, kernel=None, softcap=None) -> HostResult:
        """Attend the host pages; also per-page lse for the observed rows. Never raises: errors are returned."""
        result = HostResult()
        start = time.perf_counter()
        try:
            with torch.inference_mode():  # per thread; this may run on the host worker
                self._host_kernels(result, query, table, plan, scale, observe, kernel or self.cpu_kernel, softcap)
        except Exception as exc:  # reported to the caller, which falls back
            result.error = exc
        result.seconds = time.perf_counter() - start
        return result

    def _host_kernels(self, result: HostResult, query, table: PageTable, plan: LayerPlan, scale, observe, kernel,
                      softcap) -> None:
        # A prefill block on a GPU is computed there (its host pages cross the link block by
        # block); decode steps read the host pages where they are, with the CPU kernel.
        device = query.device if not plan.decode and query.device.type == "cuda" else None
        part = table.home.attend(query if device is not None else query.to("cpu"), plan.host_table, plan.host_counts,
                                 scale, observe, softcap, kernel, device)
        result.out, result.lse, result.page_lse = part.out, part.lse, part.page_lse

    @staticmethod
    def _page_mass(table: PageTable, lse, key_lse, key_pos, pages_lse) -> torch.Tensor:
        """Attention mass per KV head and logical page [B, H_kv, max_pages + 1], summed over the
        query heads of each KV head and the observed rows.

        lse [B, H, O] is the merged log-sum-exp of the observed rows; a key's (or a paged part's
        page's) share of a row is exp(its lse - the row's lse); key_pos [B, T_dev] the device
        part's key positions, on the CPU. pages_lse: (page_lse [B, H, O, n],
        logical pages [B, n], -1 where none) of each part run by the paged kernel."""
        ps = table.layout.page_size
        sink = table.max_pages  # the extra column collects keys of no page
        bsz, num_kv = table.batch_size, table.layout.num_kv_heads
        # Every column a part scored (the device part's keys, the paged parts' pages) with its
        # logical page (sink: none), grouped by device: one exp per device turns them into mass.
        groups: dict[torch.device, tuple[list, list]] = {}
        if key_lse is not None and key_lse.shape[-1] > 0:
            page = key_pos.div(ps, rounding_mode="floor").clamp(max=sink)  # (-1: no key)
            pages_lse = [(key_lse, page), *pages_lse]
        for scores, pages in pages_lse:
            if pages.numel():
                lses, columns = groups.setdefault(scores.device, ([], []))
                lses.append(scores)
                columns.append(torch.where(pages >= 0, pages, sink))
        mass = torch.zeros(bsz, num_kv, table.max_pages + 1, dtype=torch.float32)
        if not groups:
            return mass
        masses, columns = [], []
        for device, (lses, pages) in groups.items():
            scores = torch.cat(lses, dim=-1) if len(lses) > 1 else lses[0]  # [B, H, O, n]
            # A column's share of its row: exp(its lse - the row's); rows with no key (lse -inf) give 0.
            probs = torch.exp(scores - lse.to(device)[..., None]).nan_to_num_(0.0)
            masses.append(probs.sum(dim=2).reshape(bsz, num_kv, -1, probs.shape[-1]).sum(dim=2).cpu())
            columns.extend(pages)
        page = torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]
        values = torch.cat(masses, dim=2) if len(masses) > 1 else masses[0]
        mass.scatter_add_(2, page[:, None, :].expand(-1, num_kv, -1), values)
        mass[:, :, sink] = 0.0
        return mass


def _plain_prefill(plan: LayerPlan, key_pos: torch.Tensor, new_pos: torch.Tensor, query: torch.Tensor,
                   softcap: float | None) -> bool:
    """Whether the device part is an ordinary prefill chunk (`prefill_attention_scores`): on the
    CPU or a GPU, more than one query, every new token real and stored in order as the last keys, every
    earlier key before the first of them, no window, chunk, per-head pages or softcap. Decided from
    the [B, T] positions, never from a [Q, T] mask."""
    q_len = new_pos.shape[1]
    if (plan.decode or q_len < 2 or softcap or plan.window is not None or plan.chunk is not None
            or plan.head_keep is not None or query.device.type not in ("cpu", "cuda") or key_pos.shape[1] < q_len):
        return False
    own = key_pos[:, key_pos.shape[1] - q_len :]
    if not torch.equal(own, new_pos) or not bool((new_pos[:, 1:] - new_pos[:, :-1] == 1).all()):
        return False
    before = key_pos[:, : key_pos.shape[1] - q_len]
    return bool((before < new_pos[:, :1]).all())
