"""Merged pages (`KVPolicy.merges`, e.g. `kvmerger`): a page the policy leaves out becomes one
merged token per KV head, attended as a third partial beside the device and host parts and
combined with them by log-sum-exp like every other partial.

A page is merged once, when it first leaves a head's kept set (its keys and values are read from
the host and counted as bytes the policy read); the merged tokens live in the page table, so a
dropped page's merged token outlives the page.
"""

from __future__ import annotations

import math

import torch

from offload.kernels.torch_ref import dense_attention
from offload.store.page_table import PageTable


def merge_page(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys/values of one page [H_kv, ps, D] -> the merged key and value [H_kv, D]: Gaussian-kernel
    weighted means around the pivot (the medoid: the token with the highest mean cosine similarity
    to the page's other keys, so an outlier never leads)."""
    k, v = keys.float().transpose(0, 1), values.float().transpose(0, 1)  # [ps, H_kv, D]
    unit = torch.nn.functional.normalize(k, dim=-1).transpose(0, 1)  # [H_kv, ps, D]
    similarity = torch.matmul(unit, unit.transpose(1, 2)).mean(dim=-1)  # [H_kv, ps]
    pivot = k.gather(0, similarity.argmax(dim=-1)[None, :, None].expand(1, -1, k.shape[-1]))  # [1, H_kv, D]
    dist = ((k - pivot) ** 2).sum(dim=-1)  # [ps, H_kv]
    sigma2 = dist.mean(dim=0, keepdim=True).clamp(min=1e-12)
    weight = torch.exp(-dist / (2 * sigma2))
    weight = weight / weight.sum(dim=0, keepdim=True)
    return (weight[..., None] * k).sum(dim=0), (weight[..., None] * v).sum(dim=0)


def merge_unkept(table: PageTable, keep: list[torch.Tensor], bind_threshold: float | None = None) -> None:
    """Merge every alive page some KV head no longer keeps (keep[b]: [H_kv, num_complete]).

    With `bind_threshold` (D2O), each merged token is also bound, per KV head, to the kept page
    whose key centre is most similar to it (cosine >= the threshold), or to none (-1): then it is
    attended only while that page is kept, and a page bound nowhere is discarded."""
    table.reserve_merged()  # (made when the request opened; here for tables made otherwise)
    for b, kept in enumerate(keep):
        n = kept.shape[1]
        new = (table.alive(b) & ~kept.all(dim=0) & ~table.merged_valid[b, :n]).nonzero().flatten()
        if not new.numel():
            continue
        ids = table.page_ids[b, new]
        keys, values = table.home.read(ids)  # [m, H_kv, ps, D]
        for i, page in enumerate(new.tolist()):
            table.merged_k[b, page], table.merged_v[b, page] = merge_page(keys[i], values[i])
        table.merged_valid[b, new] = True
        table.counters.merged_pages += new.numel()
        table.counters.policy_read_bytes += new.numel() * table.layout.page_bytes
        if bind_threshold is not None:
            _bind(table, b, new, kept, bind_threshold)


def _bind(table: PageTable, b: int, pages: torch.Tensor, kept: torch.Tensor, threshold: float) -> None:
    """Per KV head, the kept page (other than itself) most similar to each merged page, or -1."""
    n = kept.shape[1]
    centre = ((table.key_min[b, :n].float() + table.key_max[b, :n].float()) / 2).cpu()  # [n, H_kv, D]
    merged = torch.nn.functional.normalize(table.merged_k[b, pages], dim=-1)  # [m, H_kv, D]
    similarity = torch.einsum("mhd,nhd->hmn", merged, torch.nn.functional.normalize(centre, dim=-1))
    allowed = kept[:, None, :].expand(-1, pages.numel(), -1).clone()  # [H_kv, m, n]
    allowed[:, torch.arange(pages.numel()), pages] = False
    similarity = similarity.masked_fill(~allowed, float("-inf"))
    best, target = similarity.max(dim=-1)  # [H_kv, m]
    bound = torch.where(best >= threshold, target, torch.full_like(target, -1))
    table.merged_into[b, pages] = bound.T  # bound nowhere (every head -1): discarded


def attend_merged(table: PageTable, query: torch.Tensor, keep: list[torch.Tensor], new_valid: torch.Tensor,
                  scale: float, binds: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out [B, H, T, D], lse [B, H, T]) of the queries over the merged tokens of the pages each KV
    head left out (each weighing as page_size tokens), or None if there are none."""
    if table.merged_k is None:
        return None
    bsz, num_heads, q_len, head_dim = query.shape
    out = torch.zeros(bsz, num_heads, q_len, head_dim)
    lse = torch.full((bsz, num_heads, q_len), float("-inf"))
    found = False
    for b, kept in enumerate(keep):
        n = kept.shape[1]
        pages = table.merged_valid[b, :n].nonzero().flatten()
        if not pages.numel():
            continue
        shown = ~kept[:, pages]  # [H_kv, m]: a head sees a merged token where it left the page out
        if binds:
            target = table.merged_into[b, pages].T  # [H_kv, m]: ... and (D2O) its page is still kept
            shown &= (target >= 0) & kept.gather(1, target.clamp(min=0, max=n - 1))
        if not shown.any():
            continue
        found = True
        mk = table.merged_k[b, pages].permute(1, 0, 2)[None]  # [1, H_kv, m, D]
        mv = table.merged_v[b, pages].permute(1, 0, 2)[None]
        visible = shown[None, :, None, :] & new_valid[b].cpu()[None, None, :, None]  # [1, H_kv, T, m]
        out_b, lse_b = dense_attention(query[b : b + 1].cpu(), mk, mv, visible, scale)
        out[b] = out_b[0]
        lse[b] = lse_b[0] + math.log(table.layout.page_size)  # each merged token weighs page_size tokens
    if not found:
        return None
    return out.to(query.device), lse.to(query.device)
