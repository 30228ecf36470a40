"""The paged host-part attention kernel in Numba: multithreaded, GIL-free, compiled once and
cached on disk.

Work split and merge: see `offload.kernels.cpu_plan`. Each step takes one page's block of one KV
head ([S, D], contiguous: pages are head-major) and every query row of that head together
(`_attend_block`): each key is read once for four rows, each value once for every row, and
values are accumulated four keys per store. Numba has no bf16 or usable fp16 scalar, so 16-bit
pages arrive as uint16 bits: bf16 is converted inline as it is loaded (`_as_float`, the top half
of a float32), fp16 is first rebuilt exactly into an L1 buffer (the exponent-rebias multiply,
subnormals included, inf/nan patched). The softmax's exponentials are a polynomial the compiler
vectorizes (`_exp_nonpositive`); the next block's rows are prefetched while this one computes
(`_prefetch`: scattered pages are latency-bound on one core otherwise). Everything accumulates in
float32.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

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


@intrinsic
def _as_float_jit(typingctx, x):
    """A stored KV element as float32: float32 as it is, uint16 as bf16 bits (the high half of a
    float32). Inline in the loops, so bf16 pages are read once, with no widened copy."""
    if isinstance(x, types.Float):
        return types.float32(x), lambda context, builder, signature, args: args[0]
    if x == types.uint16:
        def codegen(context, builder, signature, args):
            wide = builder.zext(args[0], ir.IntType(32))
            return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
        return types.float32(x), codegen
    return None


def _as_float_python(x):
    """`_as_float_jit` for NUMBA_DISABLE_JIT=1 (debugging the kernel as Python)."""
    if isinstance(x, np.uint16):
        return (np.array(x, np.uint32) << 16).view(np.float32)[()]
    return np.float32(x)


_as_float = _as_float_python if numba.config.DISABLE_JIT else _as_float_jit


@intrinsic
def _prefetch_jit(typingctx, arr, index):
    """Software prefetch (read, keep in L2) of the cache line holding arr.ravel()[index]: the
    next block's lines are requested while this block computes (DRAM latency, not bandwidth,
    limits one core's scattered reads otherwise)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        byte_ptr = builder.bitcast(builder.gep(data, [index]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [byte_ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


def _prefetch_python(arr, index):
    """`_prefetch_jit` for NUMBA_DISABLE_JIT=1: nothing to do."""


_prefetch = _prefetch_python if numba.config.DISABLE_JIT else _prefetch_jit


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _widen_fp16(src, ntok, bits, dst):
    """dst[:ntok] = src[:ntok] (fp16 bits, one page's block of one KV head [S, D]) as float32,
    exactly: the exponent-rebias multiply, subnormals included, inf/nan patched. bits is dst's
    memory seen as uint32."""
    count = ntok * dst.shape[1]
    flat_src = src.ravel()
    flat_bits = bits.ravel()
    flat_dst = dst.ravel()
    for i in range(count):
        flat_bits[i] = (np.uint32(flat_src[i]) & 0x7FFF) << 13
    for i in range(count):
        flat_dst[i] = flat_dst[i] * _FP16_REBIAS
    for i in range(count):
        h = np.uint32(flat_src[i])
        b = flat_bits[i]
        if (h & 0x7C00) == 0x7C00:  # inf / nan
            b |= 0x7F800000
        flat_bits[i] = b | ((h & 0x8000) << 16)


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)  # below this exp leaves float32's normal range: it gives 0


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _exp_nonpositive(x, exponents):
    """x = exp(x) in place for x <= 0 (scores minus their row's max; -inf gives 0), in loops LLVM
    vectorizes (a libm call per element would not): exp(x) = 2^n e^r with n = round(x / ln 2),
    |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial (relative error below 2e-7), and 2^n
    added to the float's exponent bits. exponents: int32 scratch of x's size."""
    for i in range(x.size):
        v = x[i]
        under = v < _EXP_MIN
        v = _EXP_MIN if under else v
        n = math.floor(v * _LOG2E + np.float32(0.5))
        r = v - n * _LN2_HI - n * _LN2_LO
        p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (np.float32(1.0 / 6) + r * (
            np.float32(1.0 / 24) + r * (np.float32(1.0 / 120) + r * np.float32(1.0 / 720))))))
        x[i] = np.float32(0.0) if under else p
        exponents[i] = 0 if under else np.int32(n) << 23
    bits = x.view(np.int32)
    for i in range(x.size):
        bits[i] += exponents[i]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _attend_block(qg, kb, vb, ntok, tlims, scores, exponents, acc, m, l, plse, softcap, kn, vn, prefetch):
    """The query rows of one KV head against one page's block of that head; online softmax.

    qg [R, D] pre-scaled query rows (the group's heads x query positions); kb/vb [S, D] float32 or
    uint16 bf16 bits; row r sees keys t < tlims[r] (<= ntok). acc [R, D], m [R], l [R] are the
    running output, max and sum, updated in place; plse [R] gets each row's log-sum-exp over the
    page (-inf for a row that sees none). scores [R, S] float32 / exponents [R * S] int32 scratch.
    Keys are read once for four rows and values once for every row (four keys per output store)."""
    rows, head_dim = qg.shape
    page_size = scores.shape[1]
    line = 64 // kn.itemsize
    for t in range(ntok):
        if prefetch:  # row t of the next block, keys and values, while this one computes
            for i in range(t * head_dim, (t + 1) * head_dim, line):
                _prefetch(kn, i)
                _prefetch(vn, i)
        r = 0
        while r + 4 <= rows:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for d in range(head_dim):
                k = _as_float(kb[t, d])
                s0 += qg[r, d] * k
                s1 += qg[r + 1, d] * k
                s2 += qg[r + 2, d] * k
                s3 += qg[r + 3, d] * k
            scores[r, t] = s0
            scores[r + 1, t] = s1
            scores[r + 2, t] = s2
            scores[r + 3, t] = s3
            r += 4
        while r < rows:
            s = np.float32(0.0)
            for d in range(head_dim):
                s += qg[r, d] * _as_float(kb[t, d])
            scores[r, t] = s
            r += 1
    for r in range(rows):
        mx = _NEG_INF
        for t in range(page_size):
            s = _NEG_INF
            if t < tlims[r]:
                s = scores[r, t]
                if softcap > 0.0:
                    s = np.float32(softcap * math.tanh(s / softcap))
                mx = max(mx, s)
            scores[r, t] = s
        m_new = max(m[r], mx)
        for t in range(page_size):
            scores[r, t] = scores[r, t] - m_new if m_new != _NEG_INF else _NEG_INF
        alpha = np.float32(math.exp(m[r] - m_new)) if m_new != _NEG_INF else np.float32(1.0)  # 0 when m is -inf
        if alpha != 1.0:
            for d in range(head_dim):
                acc[r, d] *= alpha
        l[r] *= alpha
        m[r] = m_new
    _exp_nonpositive(scores.ravel(), exponents)
    for r in range(rows):
        total = np.float32(0.0)
        for t in range(page_size):
            total += scores[r, t]
        l[r] += total
        plse[r] = m[r] + np.float32(math.log(total)) if total > 0.0 else _NEG_INF
    t = 0
    while t + 4 <= ntok:
        for r in range(rows):
            w0 = scores[r, t]
            w1 = scores[r, t + 1]
            w2 = scores[r, t + 2]
            w3 = scores[r, t + 3]
            for d in range(head_dim):
                acc[r, d] += (w0 * _as_float(vb[t, d]) + w1 * _as_float(vb[t + 1, d])) + (
                    w2 * _as_float(vb[t + 2, d]) + w3 * _as_float(vb[t + 3, d]))
        t += 4
    while t < ntok:
        for r in range(rows):
            w = scores[r, t]
            for d in range(head_dim):
                acc[r, d] += w * _as_float(vb[t, d])
        t += 1


@njit(nogil=True, parallel=True, cache=True, fastmath=_FASTMATH)
def _paged_attention_nb(
    q, key_pages, value_pages, kind, page_table, num_pages, last_page_len, causal,
    want_page_lse, page_lse, heads_per_item, num_groups, num_splits, out, lse, softcap,
):
    """q [B, H, Q, D] float32, pre-scaled; key/value_pages [P, H_kv, S, D] float32 or uint16 bits
    (kind: 0 float32, 1 fp16, 2 bf16); out [B, H, Q, D], lse [B, H, Q], page_lse
    [B, H, Q, max_pages] written in place."""
    bsz, num_heads, q_len, head_dim = q.shape
    num_kv_heads, page_size = key_pages.shape[1], key_pages.shape[2]
    group = num_heads // num_kv_heads
    rows = group * q_len  # one KV head's query rows, contiguous in q and in the partials below
    part_acc = np.empty((bsz, num_splits, num_heads * q_len, head_dim), np.float32)
    part_m = np.empty((bsz, num_splits, num_heads * q_len), np.float32)
    part_l = np.empty((bsz, num_splits, num_heads * q_len), np.float32)
    q_rows = q.reshape(bsz, num_heads * q_len, head_dim)

    for item in prange(bsz * num_groups * num_splits):
        b = item // (num_groups * num_splits)
        hg = (item // num_splits) % num_groups
        split = item % num_splits
        h0 = hg * heads_per_item
        h1 = min(num_kv_heads, h0 + heads_per_item)
        r0, r1 = h0 * rows, h1 * rows
        part_acc[b, split, r0:r1] = 0.0
        part_m[b, split, r0:r1] = _NEG_INF
        part_l[b, split, r0:r1] = 0.0
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
        scores = np.empty((rows, page_size), np.float32)
        exponents = np.empty(rows * page_size, np.int32)
        tlims = np.empty(rows, np.int64)
        plse = np.empty(rows, np.float32)
        for p in range(p0, p1):
            page = page_table[b, p]
            ntok = page_size if p < n - 1 else last_page_len[b]
            for r in range(rows):
                tlims[r] = ntok
                if causal:  # query qi sits at key position kv_len - q_len + qi
                    tlims[r] = max(0, min(ntok, kv_len - q_len + r % q_len - p * page_size + 1))
            for kvh in range(h0, h1):
                # the block after this one (the next KV head, or the next page's first), requested
                # a row at a time while this one computes
                next_page, next_head, prefetch = page, kvh + 1, True
                if kvh + 1 == h1:
                    next_page, next_head, prefetch = page_table[b, min(p + 1, p1 - 1)], h0, p + 1 < p1
                kn, vn = key_pages[next_page, next_head], value_pages[next_page, next_head]
                lo, hi = kvh * rows, (kvh + 1) * rows
                if kind == 1:  # fp16: widened exactly first (no inline conversion)
                    _widen_fp16(key_pages[page, kvh], ntok, kbits, kbuf)
                    _widen_fp16(value_pages[page, kvh], ntok, vbits, vbuf)
                    _attend_block(q_rows[b, lo:hi], kbuf, vbuf, ntok, tlims, scores, exponents,
                                  part_acc[b, split, lo:hi], part_m[b, split, lo:hi], part_l[b, split, lo:hi],
                                  plse, softcap, kn, vn, prefetch)
                else:
                    _attend_block(q_rows[b, lo:hi], key_pages[page, kvh], value_pages[page, kvh], ntok, tlims,
                                  scores, exponents, part_acc[b, split, lo:hi], part_m[b, split, lo:hi],
                                  part_l[b, split, lo:hi], plse, softcap, kn, vn, prefetch)
                if want_page_lse:
                    for r in range(rows):
                        page_lse[b, kvh * group + r // q_len, r % q_len, p] = plse[r]

    # Merge the splits by log-sum-exp (exact); rows that saw no key give 0 and -inf.
    for bh in prange(bsz * num_heads):
        b = bh // num_heads
        h = bh % num_heads
        for qi in range(q_len):
            row = h * q_len + qi
            m = _NEG_INF
            for s in range(num_splits):
                m = max(m, part_m[b, s, row])
            if m == _NEG_INF:
                out[b, h, qi] = 0.0
                lse[b, h, qi] = _NEG_INF
                continue
            total = np.float32(0.0)
            for s in range(num_splits):
                total += part_l[b, s, row] * np.float32(math.exp(part_m[b, s, row] - m))
            o = out[b, h, qi]
            o[:] = 0.0
            for s in range(num_splits):
                w = np.float32(math.exp(part_m[b, s, row] - m)) / total
                if w != 0.0:
                    a = part_acc[b, s, row]
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
        bsz, num_kv_heads, (num_heads // num_kv_heads) * q_len, head_dim, int(counts.max(initial=0)), threads,
        page_size=key_pages.shape[2],
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
