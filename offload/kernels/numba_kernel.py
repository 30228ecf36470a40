"""The paged host-part attention kernel in Numba: multithreaded, GIL-free, compiled once and
cached on disk.

Work split and merge: see `offload.kernels.cpu_plan`. KV pages are read in their stored dtype
and widened to float32 one page (one KV head) at a time into a small buffer that stays in L1:
Numba has no bf16 or usable fp16 scalar, so 16-bit pages arrive as uint16 bits; bf16 is the top
half of a float32 (shift left 16), fp16 is rebuilt exactly with the exponent-rebias multiply
(subnormals included, inf/nan patched). Everything accumulates in float32.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from offload.kernels.cpu_plan import (
    DTYPE_CODES,
    as_kv_array,
    check_cpu_buffers,
    default_threads,
    index_arrays,
    plan_split,
)

# Not nnan/ninf: masked scores and empty rows are -inf on purpose.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_FP16_REBIAS = np.float32(2.0**112)  # 2**(127 - 15): moves an fp16 exponent to float32's bias
_NEG_INF = np.float32(-np.inf)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _widen_page(src, page, kvh, ntok, kind, bits, dst):
    """dst[:ntok] = src[page, kvh, :ntok, :] as float32. bits is dst's memory seen as uint32."""
    head_dim = dst.shape[1]
    if kind == 0:
        for t in range(ntok):
            for d in range(head_dim):
                dst[t, d] = src[page, kvh, t, d]
    elif kind == 2:  # bf16: the high 16 bits of a float32
        for t in range(ntok):
            for d in range(head_dim):
                bits[t, d] = np.uint32(src[page, kvh, t, d]) << 16
    else:  # fp16
        for t in range(ntok):
            for d in range(head_dim):
                bits[t, d] = (np.uint32(src[page, kvh, t, d]) & 0x7FFF) << 13
            for d in range(head_dim):
                dst[t, d] = dst[t, d] * _FP16_REBIAS
            for d in range(head_dim):
                h = np.uint32(src[page, kvh, t, d])
                b = bits[t, d]
                if (h & 0x7C00) == 0x7C00:  # inf / nan
                    b |= 0x7F800000
                bits[t, d] = b | ((h & 0x8000) << 16)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _attend_page(qrow, kbuf, vbuf, tlim, sbuf, acc, m_old, l_old, softcap):
    """One query row against the first tlim keys of one page; online-softmax update.

    qrow [D] (pre-scaled), kbuf/vbuf [S, D], acc [D] updated in place; softcap > 0 caps the
    scores to softcap * tanh(score / softcap) (Gemma 2). Returns (m_new, l_new, page_lse)."""
    head_dim = qrow.shape[0]
    mx = _NEG_INF
    for t in range(tlim):
        s = np.float32(0.0)
        for d in range(head_dim):
            s += qrow[d] * kbuf[t, d]
        if softcap > 0.0:
            s = np.float32(softcap * math.tanh(s / softcap))
        sbuf[t] = s
        if s > mx:
            mx = s
    m_new = max(m_old, mx)
    if m_new == _NEG_INF:
        return m_old, l_old, _NEG_INF
    total = np.float32(0.0)
    for t in range(tlim):
        e = np.float32(math.exp(sbuf[t] - m_new))
        sbuf[t] = e
        total += e
    alpha = np.float32(math.exp(m_old - m_new))  # 0 when m_old is -inf
    if alpha != 1.0:
        for d in range(head_dim):
            acc[d] *= alpha
    for t in range(tlim):
        w = sbuf[t]
        for d in range(head_dim):
            acc[d] += w * vbuf[t, d]
    return m_new, l_old * alpha + total, m_new + np.float32(math.log(total))


@njit(nogil=True, parallel=True, cache=True, fastmath=_FASTMATH)
def _paged_attention_nb(
    q, key_pages, value_pages, kind, page_table, num_pages, last_page_len, causal,
    want_page_lse, page_lse, heads_per_item, num_groups, num_splits, out, lse, softcap,
):
    """q [B, H, Q, D] float32, pre-scaled; key/value_pages [P, H_kv, S, D] float32 or uint16 bits;
    out [B, H, Q, D], lse [B, H, Q], page_lse [B, H, Q, max_pages] written in place."""
    bsz, num_heads, q_len, head_dim = q.shape
    num_kv_heads, page_size = key_pages.shape[1], key_pages.shape[2]
    group = num_heads // num_kv_heads
    part_acc = np.empty((bsz, num_heads, num_splits, q_len, head_dim), np.float32)
    part_m = np.empty((bsz, num_heads, num_splits, q_len), np.float32)
    part_l = np.empty((bsz, num_heads, num_splits, q_len), np.float32)

    for item in prange(bsz * num_groups * num_splits):
        b = item // (num_groups * num_splits)
        hg = (item // num_splits) % num_groups
        split = item % num_splits
        h0 = hg * heads_per_item
        h1 = min(num_kv_heads, h0 + heads_per_item)
        for h in range(h0 * group, h1 * group):
            part_acc[b, h, split] = 0.0
            part_m[b, h, split] = _NEG_INF
            part_l[b, h, split] = 0.0
        n = num_pages[b]
        if n == 0:
            continue
        kv_len = (n - 1) * page_size + last_page_len[b]
        per_split = (n + num_splits - 1) // num_splits
        p0 = split * per_split
        p1 = min(n, p0 + per_split)
        kbits = np.empty((page_size, head_dim), np.uint32)
        vbits = np.empty((page_size, head_dim), np.uint32)
        kbuf = kbits.view(np.float32)
        vbuf = vbits.view(np.float32)
        sbuf = np.empty(page_size, np.float32)
        for p in range(p0, p1):
            page = page_table[b, p]
            ntok = page_size if p < n - 1 else last_page_len[b]
            for kvh in range(h0, h1):
                _widen_page(key_pages, page, kvh, ntok, kind, kbits, kbuf)
                _widen_page(value_pages, page, kvh, ntok, kind, vbits, vbuf)
                for h in range(kvh * group, (kvh + 1) * group):
                    for qi in range(q_len):
                        tlim = ntok
                        if causal:  # query qi sits at key position kv_len - q_len + qi
                            tlim = min(ntok, kv_len - q_len + qi - p * page_size + 1)
                        if tlim <= 0:
                            if want_page_lse:
                                page_lse[b, h, qi, p] = _NEG_INF
                            continue
                        m_new, l_new, plse = _attend_page(
                            q[b, h, qi], kbuf, vbuf, tlim, sbuf, part_acc[b, h, split, qi],
                            part_m[b, h, split, qi], part_l[b, h, split, qi], softcap,
                        )
                        part_m[b, h, split, qi] = m_new
                        part_l[b, h, split, qi] = l_new
                        if want_page_lse:
                            page_lse[b, h, qi, p] = plse

    # Merge the splits by log-sum-exp (exact); rows that saw no key give 0 and -inf.
    for bh in prange(bsz * num_heads):
        b = bh // num_heads
        h = bh % num_heads
        for qi in range(q_len):
            m = _NEG_INF
            for s in range(num_splits):
                m = max(m, part_m[b, h, s, qi])
            if m == _NEG_INF:
                out[b, h, qi] = 0.0
                lse[b, h, qi] = _NEG_INF
                continue
            total = np.float32(0.0)
            for s in range(num_splits):
                total += part_l[b, h, s, qi] * np.float32(math.exp(part_m[b, h, s, qi] - m))
            o = out[b, h, qi]
            o[:] = 0.0
            for s in range(num_splits):
                w = np.float32(math.exp(part_m[b, h, s, qi] - m)) / total
                if w != 0.0:
                    a = part_acc[b, h, s, qi]
                    for d in range(head_dim):
                        o[d] += w * a[d]
            lse[b, h, qi] = m + np.float32(math.log(total))


def paged_attention_numba(
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
    """Numba paged kernel; contract in `offload.kernels.paged_attention`. threads: None = every
    core this process may use (capped by Numba's pool size)."""
    check_cpu_buffers(query, key_pages, value_pages, page_lse_out, page_table.shape[1])
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key_pages.shape[1]
    table, counts, last = index_arrays(page_table, num_pages, last_page_len)
    threads = min(threads or default_threads(), numba.config.NUMBA_NUM_THREADS)
    split = plan_split(
        bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim, int(counts.max(initial=0)), threads
    )
    q = (query.detach().to(torch.float32) * scale).contiguous().numpy()
    out = torch.empty(bsz, num_heads, q_len, head_dim, dtype=torch.float32)
    lse = torch.empty(bsz, num_heads, q_len, dtype=torch.float32)
    want = page_lse_out is not None
    page_lse = page_lse_out.numpy() if want else np.empty((1, 1, 1, 1), np.float32)
    numba.set_num_threads(threads)  # per calling thread, so concurrent callers do not clash
    _paged_attention_nb(
        q, as_kv_array(key_pages), as_kv_array(value_pages), DTYPE_CODES[key_pages.dtype],
        table, counts, last, bool(causal), want, page_lse,
        split.heads_per_item, split.num_head_groups, split.num_splits, out.numpy(), lse.numpy(),
        np.float32(softcap or 0.0),
    )
    return out, lse
