"""The tier protocol: where a complete page can live below the host, and partial attention over it.

Every complete page has one home (`PageHome`, one per layer) that knows its location: the host
tier, or a lower tier (disk, remote) that implements `Tier`. A lower tier stores whole pages in
slots, gives them back (`load`), frees them (`release`) and, because split attention is exact
by log-sum-exp, can attend a query over the pages it holds and return only the partial result
(`attend`): the disk tier runs the CPU kernel over its memory map, a remote lender runs it in its
own process and sends back `(out, lse)` instead of the pages (Infinite-LLM's DistAttention).

A tier that cannot give pages back (a failed disk read, a lender that died) raises `PagesLost`
naming the slots; the store then recomputes those pages from their token ids (offload/recovery.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from offload.kernels import merge_partials, page_exp_sums_kernel, paged_attention
from offload.kernels.torch_ref import paged_attention_blocked


class PagesLost(RuntimeError):
    """A lower tier lost pages: their data cannot be read back (`slots` of tier `tier`)."""

    def __init__(self, tier: str, slots: list[int], cause: BaseException | None = None) -> None:
        self.tier = tier
        self.slots = list(slots)
        self.cause = cause
        reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(f"{tier} tier lost {len(self.slots)} page(s){reason}")

    def __reduce__(self):  # (crosses process boundaries intact)
        return PagesLost, (self.tier, self.slots, self.cause)


class TierFull(RuntimeError):
    """A lower tier has no free slot within its budget."""


@dataclass(slots=True)
class RecoveryCounters:
    recoveries: int = 0  # times a step found lost pages and recomputed them
    recomputed_pages: int = 0  # pages (all layers) put back after recomputing them from token ids


@dataclass(slots=True)
class Partial:
    """Attention of a query block over some pages, to be merged by log-sum-exp.

    out:      [B, H, Q, D] float32 (zeros for rows with no key)
    lse:      [B, H, Q] float32 (-inf for rows with no key)
    page_lse: [B, H, observe, n] float32, the log-sum-exp of each observed row over each page of
              the table it was given (-inf where the table has no page)
    """

    out: torch.Tensor
    lse: torch.Tensor
    page_lse: torch.Tensor


@runtime_checkable
class Tier(Protocol):
    """One layer's complete pages below the host. Slots are the tier's own ids (ints >= 0).

    Pages are `[n, H_kv, page_size, D]` keys and values in the layout's dtype, on the CPU.
    """

    name: str

    @property
    def capacity(self) -> int:
        """Pages this tier may hold (its budget)."""

    @property
    def num_used(self) -> int:
        """Slots holding pages now."""

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> list[int]:
        """Write pages into free slots; return the slots. `TierFull` if they do not fit."""

    def load(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages in `slots` (keys, values), CPU tensors the caller owns. `PagesLost` if any is gone."""

    def release(self, slots: list[int]) -> None:
        """Free slots (their pages are no longer referenced). Never raises for a lost page."""

    def attend(self, query: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, scale: float, observe: int,
               softcap: float | None) -> Partial:
        """Partial attention of `query` [B, H, Q, D] (float32, CPU) over the complete pages in
        `table` [B, n] (slots, -1 padded; sequence b uses its first counts[b]), every key visible
        to every row. `PagesLost` if any page is gone."""

    def readahead(self, slots: list[int]) -> None:
        """A hint that these slots will be read soon (start reading them now); never raises."""

    # Optional: `lost_slots() -> list[int]`, every slot the tier knows it lost (a lender that died),
    # asked after a loss so that pages of every layer on it are recomputed at once.

    def close(self) -> None:
        """Free everything this tier holds."""


def attend_pages(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                 counts: torch.Tensor, scale: float, observe: int, softcap: float | None = None,
                 kernel: str = "auto", threads: int | None = None, device: torch.device | None = None,
                 last: torch.Tensor | None = None) -> Partial:
    """Partial attention of `query` [B, H, Q, D] over complete pages of pools `keys`/`values`
    [slots, H_kv, page_size, D] listed in `table` [B, n] (counts[b] used per sequence): the one
    host-part computation, for the host pool, a disk map or a lender's pool.

    Decode blocks run the paged kernel; a prefill block (observe < Q: many rows per KV byte,
    compute-bound) runs blocked matmuls, the observed rows' page_lse from the same gathered blocks.
    `device` (a GPU) computes a prefill block there instead: its pages cross the link block by
    block, which costs less than the CPU's matmuls (out and lse then stay on `device`).
    `last` [B]: tokens in each sequence's last listed page (default: every page complete)."""
    on_device = device is not None and device.type != "cpu" and observe < query.shape[2]
    q = query.to(device if on_device else keys.device).float()
    bsz, num_heads, q_len, _ = q.shape
    if last is None:
        last = torch.full((bsz,), keys.shape[2], dtype=torch.long)  # every page complete
    page_lse = torch.full((bsz, num_heads, observe, table.shape[1]), float("-inf"))
    args = (table, counts, last, scale)
    if observe == q_len:
        out, lse = paged_attention(q, keys, values, *args, kernel=kernel, page_lse_out=page_lse, validate=False,
                                   threads=threads, softcap=softcap)
    else:  # (the compiled page sums read CPU memory: on the device, the torch sums there)
        out, lse = paged_attention_blocked(q, keys, values, *args, softcap=softcap, page_lse_out=page_lse,
                                           page_sums=None if on_device else page_exp_sums_kernel(kernel, threads))
    return Partial(out, lse, page_lse)


def attend_loaded(load, query: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, scale: float, observe: int,
                  softcap: float | None = None, kernel: str = "auto", threads: int | None = None) -> Partial:
    """Partial attention over the pages of `table` [B, n] (slots, counts[b] per sequence) brought
    here by `load(slots) -> (keys, values)`: a tier's pages read (disk) or pulled (remote)."""
    wanted = [int(s) for b in range(table.shape[0]) for s in table[b, : int(counts[b])]]
    keys, values = load(wanted)
    local = torch.full_like(table, -1)  # the same table over the loaded rows
    row = 0
    for b in range(table.shape[0]):
        n = int(counts[b])
        local[b, :n] = torch.arange(row, row + n)
        row += n
    return attend_pages(query, keys, values, local, counts, scale, observe, softcap, kernel, threads)


def merge_into(total: Partial, part: Partial, columns: torch.Tensor) -> Partial:
    """Merge `part` into `total` by log-sum-exp; part.page_lse's columns go to columns `columns`
    [B, n_part] of total.page_lse (-1: none)."""
    total.out, total.lse = merge_partials(total.out, total.lse, part.out, part.lse)
    if part.page_lse.shape[-1]:
        bsz, heads, observe, _ = part.page_lse.shape
        for b in range(bsz):
            cols = columns[b]
            used = (cols >= 0).nonzero().flatten()
            if used.numel():
                total.page_lse[b][:, :, cols[used]] = part.page_lse[b][:, :, used]
    return total


def empty_partial(bsz: int, num_heads: int, q_len: int, head_dim: int, observe: int, n: int) -> Partial:
    """The partial of no key: zeros, lse -inf; page_lse [B, H, observe, n] all -inf."""
    return Partial(torch.zeros(bsz, num_heads, q_len, head_dim), torch.full((bsz, num_heads, q_len), float("-inf")),
                   torch.full((bsz, num_heads, observe, n), float("-inf")))
