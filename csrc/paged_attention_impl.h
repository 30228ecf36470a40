// The paged attention work item, written once and compiled once per instruction set:
// paged_attention.cpp includes this file inside a namespace per ISA, with OFFLOAD_ISA set
// (2 = AVX-512, 1 = AVX2 + FMA + F16C, 0 = portable scalar) under a matching
// `#pragma GCC target`, so one binary carries every variant and picks one at run time.
// Work split, shapes and the online-softmax update: see offload/kernels/cpu_plan.py.

#if OFFLOAD_ISA == 2
typedef __m512 vec;
static const int W = 16;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vload_bf16(const uint16_t* p) {
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
static inline vec vload_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vfnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vec vpow2(vec p, vec n) { return _mm512_scalef_ps(p, n); }  // p * 2**n
#elif OFFLOAD_ISA == 1
typedef __m256 vec;
static const int W = 8;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vec vload_bf16(const uint16_t* p) {
  __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
static inline vec vload_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vfnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vec vpow2(vec p, vec n) {  // p * 2**n, n in [-126, 127]
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
static const int W = 0;  // no vector body: every loop below runs its scalar tail
#endif

#if OFFLOAD_ISA > 0
// exp(x) for x <= 0 (scores minus their max): 2**n * e**r with |r| <= ln2/2 and a degree-6
// Taylor polynomial (relative error ~2e-7, float32 rounding). x is clamped at -87 (e**-87 is
// below float32 resolution next to the max term, which is 1).
static inline vec vexp(vec x) {
  x = vmax(vmin(x, vset1(88.f)), vset1(-87.f));
  vec n = vround(vmul(x, vset1(1.44269504088896341f)));
  vec r = vfnma(n, vset1(0.693145751953125f), x);
  r = vfnma(n, vset1(1.428606765330187045e-06f), r);
  vec p = vset1(1.f / 720);
  p = vfma(p, r, vset1(1.f / 120));
  p = vfma(p, r, vset1(1.f / 24));
  p = vfma(p, r, vset1(1.f / 6));
  p = vfma(p, r, vset1(0.5f));
  p = vfma(p, r, vset1(1.f));
  p = vfma(p, r, vset1(1.f));
  return vpow2(p, n);
}
#endif

// s[0:n) = exp(s[0:n) - m); returns their sum.
static inline float exp_shift_sum(float* s, int64_t n, float m) {
  int64_t i = 0;
  float total = 0.f;
#if OFFLOAD_ISA > 0
  vec acc = vzero(), vm = vset1(m);
  for (; i + W <= n; i += W) {
    vec e = vexp(vsub(vload(s + i), vm));
    vstore(s + i, e);
    acc = vadd(acc, e);
  }
  total = vsum(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    total += s[i];
  }
  return total;
}

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

// Exact fp16 -> fp32: move exponent+mantissa into place and rebias by 2**112 (this also
// normalises subnormals); inf/nan get the full exponent back; then the sign.
static inline float fp16_to_float(uint16_t h) {
  float f = bits_to_float((uint32_t)(h & 0x7fff) << 13) * 5.192296858534828e33f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((h & 0x7c00) == 0x7c00) u |= 0x7f800000u;
  u |= (uint32_t)(h & 0x8000) << 16;
  return bits_to_float(u);
}

// dst[0:d) = src[0:d) widened to float32. kind: 0 fp32, 1 fp16, 2 bf16.
static inline void widen_row(const void* src, int kind, int64_t d, float* dst) {
  int64_t i = 0;
  if (kind == 0) {
    std::memcpy(dst, src, (size_t)d * 4);
    return;
  }
  const uint16_t* s = (const uint16_t*)src;
#if OFFLOAD_ISA > 0
  if (kind == 2)
    for (; i + W <= d; i += W) vstore(dst + i, vload_bf16(s + i));
  else
    for (; i + W <= d; i += W) vstore(dst + i, vload_fp16(s + i));
#endif
  for (; i < d; ++i) dst[i] = kind == 2 ? bf16_to_float(s[i]) : fp16_to_float(s[i]);
}

// s[j * sstride + t] = q[j] . k[t] for 4 query rows j and n keys (key row stride ks): each key
// row is loaded once for the 4 rows, and the 4 dot products are independent chains.
static inline void scores4(const float* const q[4], const float* k, int64_t ks, int64_t n, int64_t d, float* s,
                           int64_t sstride) {
  for (int64_t t = 0; t < n; ++t) {
    const float* kr = k + t * ks;
    float r0 = 0.f, r1 = 0.f, r2 = 0.f, r3 = 0.f;
    int64_t i = 0;
#if OFFLOAD_ISA > 0
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (; i + W <= d; i += W) {
      const vec kv = vload(kr + i);
      a0 = vfma(vload(q[0] + i), kv, a0);
      a1 = vfma(vload(q[1] + i), kv, a1);
      a2 = vfma(vload(q[2] + i), kv, a2);
      a3 = vfma(vload(q[3] + i), kv, a3);
    }
    r0 = vsum(a0), r1 = vsum(a1), r2 = vsum(a2), r3 = vsum(a3);
#endif
    for (; i < d; ++i) {
      r0 += q[0][i] * kr[i], r1 += q[1][i] * kr[i], r2 += q[2][i] * kr[i], r3 += q[3][i] * kr[i];
    }
    s[t] = r0, s[sstride + t] = r1, s[2 * sstride + t] = r2, s[3 * sstride + t] = r3;
  }
}

// acc[j] = acc[j] * alpha[j] + sum_t w[j * wstride + t] * v[t] for 4 rows j, n value rows
// (row stride vs); each value row is loaded once for the 4 rows.
static inline void accumulate4(float* const acc[4], const float alpha[4], const float* w, int64_t wstride,
                               const float* v, int64_t vs, int64_t n, int64_t d) {
  int64_t i = 0;
#if OFFLOAD_ISA > 0
  for (; i + W <= d; i += W) {
    vec a0 = vmul(vload(acc[0] + i), vset1(alpha[0])), a1 = vmul(vload(acc[1] + i), vset1(alpha[1]));
    vec a2 = vmul(vload(acc[2] + i), vset1(alpha[2])), a3 = vmul(vload(acc[3] + i), vset1(alpha[3]));
    for (int64_t t = 0; t < n; ++t) {
      const vec vv = vload(v + t * vs + i);
      a0 = vfma(vset1(w[t]), vv, a0);
      a1 = vfma(vset1(w[wstride + t]), vv, a1);
      a2 = vfma(vset1(w[2 * wstride + t]), vv, a2);
      a3 = vfma(vset1(w[3 * wstride + t]), vv, a3);
    }
    vstore(acc[0] + i, a0), vstore(acc[1] + i, a1), vstore(acc[2] + i, a2), vstore(acc[3] + i, a3);
  }
#endif
  for (; i < d; ++i) {
    for (int j = 0; j < 4; ++j) {
      float a = acc[j][i] * alpha[j];
      for (int64_t t = 0; t < n; ++t) a += w[j * wstride + t] * v[t * vs + i];
      acc[j][i] = a;
    }
  }
}

// One work item (see cpu_plan.py). Thread scratch: kbuf, vbuf [S, D]; sbuf [4 * S + D].
static void run_item(const ItemArgs& a, int64_t item, float* kbuf, float* vbuf, float* sbuf) {
  const int64_t D = a.head_dim, S = a.page_size, Hkv = a.num_kv_heads, Q = a.q_len;
  const int64_t G = a.num_heads / Hkv, NS = a.num_splits, R = G * Q;
  const int64_t b = item / (a.num_groups * NS);
  const int64_t hg = (item / NS) % a.num_groups, split = item % NS;
  const int64_t h0 = hg * a.heads_per_item, h1 = std::min(Hkv, h0 + a.heads_per_item);
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  float* dummy_acc = sbuf + 4 * S;  // stands in for missing rows of the last block of 4
  // partials: acc [B, H, NS, Q, D], m and l [B, H, NS, Q]
  for (int64_t h = h0 * G; h < h1 * G; ++h) {
    int64_t row = ((b * a.num_heads + h) * NS + split) * Q;
    std::fill(a.part_acc + row * D, a.part_acc + (row + Q) * D, 0.f);
    std::fill(a.part_m + row, a.part_m + row + Q, NEG_INF);
    std::fill(a.part_l + row, a.part_l + row + Q, 0.f);
  }
  const int64_t n = a.num_pages[b];
  if (n == 0) return;
  const int64_t kv_len = (n - 1) * S + a.last_page_len[b];
  const int64_t per_split = (n + NS - 1) / NS;
  const int64_t p0 = split * per_split, p1 = std::min(n, p0 + per_split);
  const size_t es = a.kind == 0 ? 4 : 2;
  const size_t token_bytes = (size_t)(Hkv * D) * es;
  const char* kbase = (const char*)a.key_pages;
  const char* vbase = (const char*)a.value_pages;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t page = a.page_table[b * a.max_pages + p];
    if (page < 0 || page >= a.num_pages_total) {
      *a.error = 1;
      return;
    }
    const int64_t ntok = p < n - 1 ? S : a.last_page_len[b];
    // The next page, prefetched one KV head at a time while this page's heads compute: spread
    // out, the prefetches overlap the arithmetic instead of stalling on full miss queues.
    const int64_t next = p + 1 < p1 ? a.page_table[b * a.max_pages + p + 1] : -1;
    const bool prefetch = OFFLOAD_PREFETCH && next >= 0 && next < a.num_pages_total;
    for (int64_t kvh = h0; kvh < h1; ++kvh) {
      const size_t off0 = (size_t)(page * S) * token_bytes + (size_t)(kvh * D) * es;
      if (prefetch) {
        const size_t noff = (size_t)(next * S) * token_bytes + (size_t)(kvh * D) * es;
        for (int64_t t = 0; t < S; ++t)
          for (size_t c = 0; c < (size_t)D * es; c += 64) {
            __builtin_prefetch(kbase + noff + t * token_bytes + c, 0, 3);
            __builtin_prefetch(vbase + noff + t * token_bytes + c, 0, 3);
          }
      }
      const float *kp = kbuf, *vp = vbuf;
      int64_t stride = D;
      if (a.kind == 0) {  // float32 pages are used in place
        kp = (const float*)(kbase + off0), vp = (const float*)(vbase + off0), stride = Hkv * D;
      } else {
        for (int64_t t = 0; t < ntok; ++t) {
          widen_row(kbase + off0 + t * token_bytes, a.kind, D, kbuf + t * D);
          widen_row(vbase + off0 + t * token_bytes, a.kind, D, vbuf + t * D);
        }
      }
      // The G query heads x Q rows of this KV head, 4 at a time.
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const float* qr[4];
        float* acc[4];
        float alpha[4];
        int64_t tl[4], row[4];
        float* plse[4];
        int64_t tmax = 0;
        for (int j = 0; j < 4; ++j) {
          const int64_t r = r0 + j;
          if (r >= R) {
            qr[j] = qr[0], acc[j] = dummy_acc, tl[j] = 0, row[j] = -1, plse[j] = nullptr;
            continue;
          }
          const int64_t h = kvh * G + r / Q, qi = r % Q;
          tl[j] = ntok;
          if (a.causal) tl[j] = std::max<int64_t>(0, std::min(ntok, kv_len - Q + qi - p * S + 1));
          qr[j] = a.q + ((b * a.num_heads + h) * Q + qi) * D;
          row[j] = ((b * a.num_heads + h) * NS + split) * Q + qi;
          acc[j] = a.part_acc + row[j] * D;
          plse[j] = a.page_lse ? a.page_lse + ((b * a.num_heads + h) * Q + qi) * a.max_pages + p : nullptr;
          tmax = std::max(tmax, tl[j]);
        }
        if (tmax == 0) {
          for (int j = 0; j < 4; ++j)
            if (plse[j]) *plse[j] = NEG_INF;
          continue;
        }
        scores4(qr, kp, stride, tmax, D, sbuf, S);
        for (int j = 0; j < 4; ++j) {
          float* s = sbuf + j * S;
          float mx = NEG_INF;
          for (int64_t t = 0; t < tl[j]; ++t) mx = std::max(mx, s[t]);
          const float m_old = row[j] >= 0 ? a.part_m[row[j]] : NEG_INF;
          const float m_new = std::max(m_old, mx);
          if (m_new == NEG_INF) {  // nothing visible (or -inf scores): leave the row as it is
            alpha[j] = 1.f;
            std::fill(s, s + tmax, 0.f);
            if (plse[j]) *plse[j] = NEG_INF;
            continue;
          }
          const float total = exp_shift_sum(s, tl[j], m_new);
          std::fill(s + tl[j], s + tmax, 0.f);  // causally hidden keys weigh nothing
          alpha[j] = std::exp(m_old - m_new);  // 0 when m_old is -inf
          a.part_m[row[j]] = m_new;
          a.part_l[row[j]] = a.part_l[row[j]] * alpha[j] + total;
          if (plse[j]) *plse[j] = tl[j] > 0 ? m_new + std::log(total) : NEG_INF;
        }
        accumulate4(acc, alpha, sbuf, S, vp, stride, tmax, D);
      }
    }
  }
}
