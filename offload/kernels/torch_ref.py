"""Plain-torch kernels: the paged host-part kernel (portable fallback) and the dense masked
attention the device part uses. Both return (out float32, lse float32)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch


def dense_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention with its log-sum-exp.

    query:   [B, H, Q, D]
    keys:    [B, H_kv, T, D], values: [B, H_kv, T, D]  (H a multiple of H_kv)
    visible: [B, Q, T] bool, True where query q may attend key t ([B, H_kv, Q, T]: per KV head)
    softcap: if set, scores become softcap * tanh(score / softcap) before the softmax (Gemma 2)
    Returns out [B, H, Q, D] float32 (zeros for rows with no visible key), lse [B, H, Q] float32 (-inf there).
    """
    out, lse, _ = dense_attention_scores(query, keys, values, visible, scale, softcap)
    return out, lse


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logit soft-capping: softcap * tanh(scores / softcap); unchanged when softcap is None/0."""
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def dense_attention_scores(query, keys, values, visible, scale, softcap: float | None = None,
                           score_rows: int | None = None):
    """`dense_attention`, and the masked scores it computed: [B, H, R, T] float32 (-inf where hidden)
    for the last R = `score_rows` query rows (default: all).

    A key's score is its own log-sum-exp, so callers get per-key attention mass without a second q.k.
    When only some rows' scores are wanted (prefill), the output and lse of every row come from
    torch's fused CPU flash-attention kernel and the scores from the plain path for those rows."""
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    if kv_len == 0:
        rows = q_len if score_rows is None else min(score_rows, q_len)
        return (
            torch.zeros(bsz, num_heads, q_len, head_dim, dtype=torch.float32, device=query.device),
            torch.full((bsz, num_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device),
            torch.zeros(bsz, num_heads, rows, 0, dtype=torch.float32, device=query.device),
        )
    if score_rows is not None and score_rows < q_len and not softcap and query.device.type == "cpu":
        out, lse = _fused_attention(query, keys, values, visible, scale)
        rows_visible = visible[..., q_len - score_rows :, :]
        return out, lse, _masked_scores(query[:, :, q_len - score_rows :], keys, rows_visible, scale, softcap)
    out, lse, scores = _dense(query, keys, values, visible, scale, softcap)
    return out, lse, scores if score_rows is None else scores[:, :, max(0, q_len - score_rows) :]


def _fused_attention(query, keys, values, visible, scale):
    """(out, lse) of every row through aten's CPU flash-attention kernel; rows with no visible key
    give zeros and -inf like the plain path."""
    num_heads, num_kv_heads = query.shape[1], keys.shape[1]
    group = num_heads // num_kv_heads
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    # visible [B, Q, T] (every head) or [B, H_kv, Q, T]: an additive mask broadcast over heads
    mask_vis = visible[:, None] if visible.dim() == 3 else visible.repeat_interleave(group, dim=1)
    mask = torch.zeros(mask_vis.shape, dtype=torch.float32, device=query.device).masked_fill_(~mask_vis, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.float().contiguous(), k.contiguous(), v.contiguous(), 0.0, False, attn_mask=mask, scale=scale)
    none = ~mask_vis.any(dim=-1)  # [B, 1 or H, Q]: rows that see no key
    if bool(none.any()):
        none = none.expand(-1, num_heads, -1)
        out = out.masked_fill(none[..., None], 0.0)
        lse = lse.masked_fill(none, float("-inf"))
    return out.float(), lse.float()


def prefill_attention_scores(query, keys, values, seen: torch.Tensor, scale: float, score_rows: int):
    """`dense_attention_scores` for a prefill chunk laid out the usual way, without a [Q, T] mask:
    the last Q keys are the Q queries' own tokens (causal), the earlier ones are seen by every
    row or by none (`seen` [B, T - Q] bool). Flash attention in causal mode (the CPU's, or a
    GPU's memory-efficient kernel) skips the hidden half; the earlier keys are merged in by
    log-sum-exp. No softcap. Returns (out, lse, scores of
    the last `score_rows` rows [B, H, R, T], -inf where hidden)."""
    from offload.kernels.merge import merge_partials

    q_len, kv_len = query.shape[2], keys.shape[2]
    prefix = kv_len - q_len
    group = query.shape[1] // keys.shape[1]
    own_k = keys[:, :, prefix:].float().repeat_interleave(group, dim=1)
    own_v = values[:, :, prefix:].float().repeat_interleave(group, dim=1)
    out, lse = _fused_rows(query, own_k, own_v, True, scale)
    if bool(seen.any()):
        if bool(seen.all()):
            before = _attend_block(query, keys[:, :, :prefix], values[:, :, :prefix], scale)
        elif query.device.type == "cpu":
            before = _fused_attention(query, keys[:, :, :prefix], values[:, :, :prefix],
                                      seen[:, None, :].expand(-1, q_len, -1), scale)
        else:
            before = _attend_seen(query, keys[:, :, :prefix], values[:, :, :prefix], seen, scale)
        out, lse = merge_partials(out, lse, *before)
    rows = min(score_rows, q_len)
    key = torch.arange(kv_len, device=query.device)
    row_visible = torch.cat([seen[:, None, :].expand(-1, rows, -1),
                             (key[None, prefix:] <= key[prefix + q_len - rows :, None]).expand(seen.shape[0], -1, -1)],
                            dim=2)
    return out, lse, _masked_scores(query[:, :, q_len - rows :], keys, row_visible, scale, None)


def _grouped_scores(query, keys, visible, scale, softcap) -> torch.Tensor:
    """Masked scaled scores [B, H_kv, G, Q, T] (-inf where hidden). visible [B, Q, T] (every head)
    or [B, H_kv, Q, T] (per KV head)."""
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    # Group query heads per KV head so K/V are read once per group, never repeated in memory.
    q = query.float().reshape(bsz, num_kv_heads, group * q_len, head_dim)
    scores = soft_cap(torch.matmul(q, keys.float().transpose(-1, -2)) * scale, softcap)  # [B, Hkv, G*Q, T]
    scores = scores.view(bsz, num_kv_heads, group, q_len, kv_len)
    mask = visible[:, None, None, :, :] if visible.dim() == 3 else visible[:, :, None, :, :]
    return scores.masked_fill_(~mask, float("-inf"))


def _masked_scores(query, keys, visible, scale, softcap) -> torch.Tensor:
    """The masked scores of `_dense` alone, [B, H, Q, T] (no softmax, no output)."""
    bsz, num_heads, q_len, _ = query.shape
    return _grouped_scores(query, keys, visible, scale, softcap).view(bsz, num_heads, q_len, keys.shape[2])


def _dense(query, keys, values, visible, scale, softcap):
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    scores = _grouped_scores(query, keys, visible, scale, softcap)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Q]
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.matmul(probs.view(bsz, num_kv_heads, group * q_len, kv_len), values.float())
    out = out.view(bsz, num_heads, q_len, head_dim)
    return out, lse.reshape(bsz, num_heads, q_len), scores.reshape(bsz, num_heads, q_len, kv_len)


def gather_head_major(pages: torch.Tensor, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Pages `ids` of a pool [P, H_kv, page_size, D] -> each KV head's tokens in order:
    [H_kv, len(ids) * page_size, D], on `device` (default: the pool's). The pages are picked where
    they live and cross as they are (one contiguous copy); the transposing copy runs on `device`.
    (Whole pages first, then one transposing copy: an index_select along the pages of the
    transposed pool is one copy, not two, but measured slower in a prefill.)"""
    _, num_kv_heads, page_size, head_dim = pages.shape
    picked = pages.index_select(0, ids.to(pages.device))
    if device is not None:
        picked = picked.to(device)
    return picked.transpose(0, 1).reshape(num_kv_heads, ids.numel() * page_size, head_dim)


def paged_attention_torch(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    last_page_len: torch.Tensor,
    scale: float,
    causal: bool = False,
    page_lse_out: torch.Tensor | None = None,
    threads: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged kernel in plain torch: gather each sequence's pages, then `dense_attention`.

    See `offload.kernels.paged_attention` for the contract. `threads` is accepted for a uniform
    kernel signature and ignored: torch's intra-op pool is process-wide, not ours to resize.
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads, page_size = key_pages.shape[1], key_pages.shape[2]
    out = torch.zeros(bsz, num_heads, q_len, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((bsz, num_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device)
    for b in range(bsz):
        n = int(num_pages[b])
        if n == 0:
            continue
        ids = page_table[b, :n].long()
        kv_len = (n - 1) * page_size + int(last_page_len[b])
        k = gather_head_major(key_pages, ids)[:, :kv_len].unsqueeze(0)
        v = gather_head_major(value_pages, ids)[:, :kv_len].unsqueeze(0)
        key_pos = torch.arange(kv_len, device=query.device)
        if causal:
            query_pos = torch.arange(q_len, device=query.device) + (kv_len - q_len)
            visible = key_pos[None, :] <= query_pos[:, None]
        else:
            visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        o, l = dense_attention(query[b : b + 1], k, v, visible.unsqueeze(0), scale, softcap)
        out[b], lse[b] = o[0], l[0]
        if page_lse_out is not None:
            page_lse_out[b, :, :, :n] = _page_lse(query[b], k[0], visible, scale, page_size, softcap)
    return out, lse


def _page_lse(query, keys, visible, scale, page_size, softcap=None):
    """Per-page log-sum-exp of the scores: query [H, Q, D], keys [Hkv, T, D], visible [Q, T] (None:
    every key) -> [H, Q, ceil(T / page_size)]."""
    num_heads, q_len, _ = query.shape
    num_kv_heads, kv_len, _ = keys.shape
    group = num_heads // num_kv_heads
    q = query.float().reshape(num_kv_heads, group * q_len, -1)
    scores = soft_cap(torch.matmul(q, keys.float().transpose(-1, -2)) * scale, softcap).view(num_heads, q_len, kv_len)
    if visible is not None:
        scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.logsumexp(_per_page(scores, page_size, float("-inf")), dim=-1)


# torch's fused CPU flash attention returns the log-sum-exp as well (private op; used when present).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _has_fused(query: torch.Tensor) -> bool:
    """Whether `_fused_rows` runs where `query` is: torch's CPU flash attention, or a GPU's."""
    return (_FLASH_CPU is not None and query.device.type == "cpu") or query.device.type == "cuda"


def _fused_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool, scale: float):
    """(out, lse) float32 of query [B, H, Q, D] over keys/values [B, H, T, D] (as many heads), by
    the fused kernel of the query's device: torch's CPU flash attention, or on a GPU its
    memory-efficient attention (which returns the log-sum-exp too, padded to a multiple of 32
    rows). causal: query i sees keys up to i (Q == T). A GPU whose kernel refuses the shape (a head
    size or dtype it lacks) gets the plain matmul computation instead, once logged."""
    q, k, v = query.float().contiguous(), keys.float().contiguous(), values.float().contiguous()
    if query.device.type == "cpu":
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, scale=scale)[:2]
        return out.float(), lse.float()
    try:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                          scale=scale)[:2]
    except RuntimeError as exc:
        _log_fallback(exc)
        return _rows_matmul(q, k, v, causal, scale)
    return out, lse[..., : q.shape[2]]


def _rows_matmul(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool, scale: float):
    """`_fused_rows` by plain matmuls (the [Q, T] scores are built): any device, any head size."""
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu_(1)
        scores = scores.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), values), lse


_FALLBACK_LOGGED = False


def _log_fallback(exc: BaseException) -> None:
    global _FALLBACK_LOGGED
    if not _FALLBACK_LOGGED:
        _FALLBACK_LOGGED = True
        logging.getLogger("offload").warning(
            "the GPU's fused attention kernel refused a prefill block (%s: %s); computing it with matmuls",
            type(exc).__name__, exc)


def _attend_seen(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, scale: float):
    """(out, lse) of query [B, H, Q, D] over the keys each sequence's rows all see (`seen` [B, T]
    bool), one fused call per sequence over just those keys; a sequence that sees none gets zeros
    and -inf. No [Q, T] mask is built."""
    bsz, num_heads, q_len, head_dim = query.shape
    out = torch.zeros(bsz, num_heads, q_len, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((bsz, num_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device)
    for b in range(bsz):
        idx = seen[b].nonzero().flatten().to(keys.device)
        if idx.numel():
            o, l = _attend_block(query[b : b + 1], keys[b : b + 1, :, idx], values[b : b + 1, :, idx], scale)
            out[b], lse[b] = o[0], l[0]
    return out, lse


def _attend_block(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, softcap=None):
    """Every key visible. query [B, H, Q, D]; keys/values [B, H_kv, T, D] -> (out, lse) float32."""
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    if _has_fused(query) and not softcap:
        # Every row sees every key, so a KV head's G query heads are G * Q rows of one head: the
        # keys are read as they are, never repeated per query head.
        rows = query.float().reshape(bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim)
        out, lse = _fused_rows(rows, keys, values, False, scale)
        return out.reshape(bsz, num_heads, q_len, head_dim), lse.reshape(bsz, num_heads, q_len)
    visible = torch.ones(1, query.shape[2], keys.shape[2], dtype=torch.bool, device=query.device)
    return dense_attention(query, keys, values, visible, scale, softcap)


# The float32 keys and values `paged_attention_blocked` gathers at a time when not told a block size:
# fewer, larger blocks mean fewer kernel calls and merges; the bound keeps the copy's memory small.
BLOCK_BYTES = 64 << 20


def paged_attention_blocked(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    last_page_len: torch.Tensor,
    scale: float,
    block_tokens: int | None = None,
    softcap: float | None = None,
    page_lse_out: torch.Tensor | None = None,
    page_sums: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal paged attention for long query blocks (chunked prefill): each sequence's pages
    are gathered in blocks of about `block_tokens` keys (None: as many as fill `BLOCK_BYTES` with
    float32 keys and values, 8192 for a Llama-3-8B layout), attended with a fused, blocked kernel
    (torch's CPU flash attention, else matmul + softmax) and merged by log-sum-exp.

    The paged kernels are built for decode (few query rows per KV byte, memory-bound); with
    hundreds of query rows the work is compute-bound and a blocked matmul kernel is faster.
    Same contract as `offload.kernels.paged_attention` with causal=False; `page_lse_out`
    [B, H, R, max_pages] receives the per-page log-sum-exp of the last R query rows (the observed
    ones), computed from the same gathered blocks by `page_sums` (a `page_exp_sums` kernel; None:
    `page_exp_sums_torch`), shifted by each row's log-sum-exp over the block (columns past a
    sequence's pages are left as they are).

    The pages may live elsewhere than the query (the host pool of a GPU model): each block is
    gathered where the pages are and computed where the query is (then `page_sums` must take
    tensors there; None does); out and lse are on the query's device.
    """
    from offload.kernels.merge import merge_partials

    bsz, num_heads, q_len, head_dim = query.shape
    page_size = key_pages.shape[2]
    if block_tokens is None:
        block_tokens = BLOCK_BYTES // (2 * key_pages.shape[1] * head_dim * 4)
    block_pages = max(1, block_tokens // page_size)
    out = torch.zeros(bsz, num_heads, q_len, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((bsz, num_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device)
    for b in range(bsz):
        n = int(num_pages[b])
        ids = page_table[b, :n].long()
        for first in range(0, n, block_pages):
            block = ids[first : first + block_pages]
            count = block.numel() * page_size
            if first + block_pages >= n:  # the row's last page may be partial
                count -= page_size - int(last_page_len[b])
            k = gather_head_major(key_pages, block, query.device)[:, :count]
            v = gather_head_major(value_pages, block, query.device)[:, :count]
            o, l = _attend_block(query[b : b + 1], k[None], v[None], scale, softcap)
            merged_out, merged_lse = merge_partials(out[b : b + 1], lse[b : b + 1], o, l)
            out[b], lse[b] = merged_out[0], merged_lse[0]
            if page_lse_out is not None and page_lse_out.shape[2]:
                observed = slice(q_len - page_lse_out.shape[2], q_len)
                page_lse_out[b, :, :, first : first + block.numel()] = _block_page_lse(
                    query[b, :, observed], k, l[0, :, observed], scale, page_size, softcap, page_sums)
    return out, lse


# A page sum below this is treated as underflowed (a compiled exp may clamp near exp(-87)) and that
# page's log-sum-exp is recomputed exactly, shifted by its own maximum.
_UNDERFLOW = math.exp(-70.0)


def page_exp_sums_torch(query: torch.Tensor, keys: torch.Tensor, shift: torch.Tensor, page_size: int,
                        softcap: float | None = None) -> torch.Tensor:
    """Per-page sums of exp(score - shift): query [H_kv, M, D] float32 already scaled, keys
    [H_kv, T, D], shift [H_kv, M] (at least every score of its row) -> [H_kv, M, ceil(T / page_size)]
    float32, the last page summing the keys it has. The reference for the compiled versions."""
    scores = soft_cap(torch.matmul(query, keys.float().transpose(-1, -2)), softcap)
    return _per_page(scores.sub_(shift[..., None]).exp_(), page_size, 0.0).sum(dim=-1)


def _per_page(scores: torch.Tensor, page_size: int, fill: float) -> torch.Tensor:
    """[..., T] -> [..., ceil(T / page_size), page_size], the last page padded with `fill`."""
    count = scores.shape[-1]
    num_pages = -(-count // page_size)
    if count % page_size:
        scores = torch.nn.functional.pad(scores, (0, num_pages * page_size - count), value=fill)
    return scores.view(*scores.shape[:-1], num_pages, page_size)


def _block_page_lse(query: torch.Tensor, keys: torch.Tensor, row_lse: torch.Tensor, scale: float, page_size: int,
                    softcap=None, page_sums=None) -> torch.Tensor:
    """Per-page log-sum-exp of every row over gathered keys: query [H, R, D], keys [H_kv, T, D]
    (whole pages but the last), row_lse [H, R] each row's log-sum-exp over these keys -> [H, R,
    ceil(T / page_size)] float32.

    row_lse + log(sum of exp(score - row_lse)) per page: no exp overflows (row_lse is at least every
    score) and no reduction for a shift is needed. A page far below its row (a sum under
    `_UNDERFLOW`, about 70 nats) is lost to float32 that way; those pages alone are redone by
    `torch.logsumexp` over their own keys, so every finite value stays exact."""
    num_heads, rows, head_dim = query.shape
    num_kv_heads = keys.shape[0]
    shift = row_lse.float().reshape(num_kv_heads, -1)
    if not bool(torch.isfinite(shift).all()):  # (not from a block where every row sees every key)
        return _page_lse(query, keys, None, scale, page_size, softcap)
    q = (query.float() * scale).reshape(num_kv_heads, (num_heads // num_kv_heads) * rows, head_dim)
    keys = keys.float()
    if page_sums is None or softcap:  # (the compiled sums have no soft-capping)
        sums = page_exp_sums_torch(q, keys, shift, page_size, softcap)
    else:
        sums = page_sums(q, keys, shift, page_size)
    low = sums < _UNDERFLOW
    out = sums.log_().add_(shift[..., None])
    if bool(low.any()):
        out[low] = _page_lse_at(q, keys, low.nonzero(as_tuple=True), page_size, softcap)
    return out.view(num_heads, rows, -1)


def _page_lse_at(query: torch.Tensor, keys: torch.Tensor, where: tuple, page_size: int, softcap=None,
                 chunk: int = 1 << 14) -> torch.Tensor:
    """The exact log-sum-exp of the (KV head, row, page) entries `where` (index tensors), each over
    its own page's keys: query [H_kv, M, D] scaled, keys [H_kv, T, D]; in chunks of `chunk` entries."""
    num_kv_heads, count, head_dim = keys.shape
    num_pages = -(-count // page_size)
    paged = torch.nn.functional.pad(keys, (0, 0, 0, num_pages * page_size - count)).view(
        num_kv_heads, num_pages, page_size, head_dim)
    present = (torch.arange(num_pages * page_size, device=keys.device) < count).view(num_pages, page_size)
    head, row, page = where
    out = torch.empty(head.numel(), dtype=torch.float32, device=keys.device)
    for first in range(0, head.numel(), chunk):
        h, r, p = (t[first : first + chunk] for t in (head, row, page))
        scores = soft_cap(torch.einsum("nd,nsd->ns", query[h, r], paged[h, p]), softcap)
        out[first : first + chunk] = torch.logsumexp(scores.masked_fill(~present[p], float("-inf")), dim=-1)
    return out
