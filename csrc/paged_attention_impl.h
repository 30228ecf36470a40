// The paged attention work item, written once and compiled once per instruction set:
// paged_attention.cpp includes this file inside a namespace per ISA, with OFFLOAD_ISA set
// (3 = AVX-512 + BF16, 2 = AVX-512, 1 = AVX2 + FMA + F16C, 0 = portable scalar) under a matching
// `#pragma GCC target`, so one binary carries every variant and picks one at run time.
// Work split, shapes and the online-softmax update: see offload/kernels/cpu_plan.py.

#if OFFLOAD_ISA >= 2
typedef __m512 vec;
static const int W = 16;
static OFFLOAD_INLINE vec vload(const float* p) { return _mm512_loadu_ps(p); }
static OFFLOAD_INLINE void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static OFFLOAD_INLINE vec vset1(float x) { return _mm512_set1_ps(x); }
static OFFLOAD_INLINE vec vzero() { return _mm512_setzero_ps(); }
static OFFLOAD_INLINE vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static OFFLOAD_INLINE vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static OFFLOAD_INLINE float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static OFFLOAD_INLINE vec vload_bf16(const uint16_t* p) {
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
static OFFLOAD_INLINE vec vload_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static OFFLOAD_INLINE void vpair_bf16(const uint16_t* p, vec& even, vec& odd) {  // 2W bf16 -> evens, odds
  const __m512i x = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
}
static OFFLOAD_INLINE vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static OFFLOAD_INLINE vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static OFFLOAD_INLINE vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static OFFLOAD_INLINE vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static OFFLOAD_INLINE vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static OFFLOAD_INLINE vec vfnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
static OFFLOAD_INLINE vec vpow2(vec p, vec n) { return _mm512_scalef_ps(p, n); }  // p * 2**n
// r[u] = sum of the lanes of a[u], u < 16: a transpose tree (unpack, unpack, 2 x shuffle) with
// 15 adds in all instead of 16 horizontal sums.
static OFFLOAD_INLINE vec vsum_lanes(const vec* a) {
  vec b[8], c[4];
  for (int k = 0; k < 8; ++k)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const vec d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
  const vec d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xdd));
}
#elif OFFLOAD_ISA == 1
typedef __m256 vec;
static const int W = 8;
static OFFLOAD_INLINE vec vload(const float* p) { return _mm256_loadu_ps(p); }
static OFFLOAD_INLINE void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static OFFLOAD_INLINE vec vset1(float x) { return _mm256_set1_ps(x); }
static OFFLOAD_INLINE vec vzero() { return _mm256_setzero_ps(); }
static OFFLOAD_INLINE vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static OFFLOAD_INLINE vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static OFFLOAD_INLINE float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static OFFLOAD_INLINE vec vload_bf16(const uint16_t* p) {
  __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
static OFFLOAD_INLINE vec vload_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static OFFLOAD_INLINE void vpair_bf16(const uint16_t* p, vec& even, vec& odd) {  // 2W bf16 -> evens, odds
  const __m256i x = _mm256_loadu_si256((const __m256i*)p);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
}
static OFFLOAD_INLINE vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static OFFLOAD_INLINE vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static OFFLOAD_INLINE vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static OFFLOAD_INLINE vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static OFFLOAD_INLINE vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static OFFLOAD_INLINE vec vfnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
static OFFLOAD_INLINE vec vpow2(vec p, vec n) {  // p * 2**n, n in [-126, 127]
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// r[u] = sum of the lanes of a[u], u < 8 (see the AVX-512 version).
static OFFLOAD_INLINE vec vsum_lanes(const vec* a) {
  vec b[4], c[2];
  for (int k = 0; k < 4; ++k)
    b[k] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm256_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 2; ++k) {
    const __m256d x = _mm256_castps_pd(b[2 * k]), y = _mm256_castps_pd(b[2 * k + 1]);
    c[k] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}
#else
static const int W = 0;  // no vector body: every loop below runs its scalar tail
#endif

#if OFFLOAD_ISA > 0
// exp(x) for x <= 0 (scores minus their max): 2**n * e**r with |r| <= ln2/2 and a degree-6
// Taylor polynomial (relative error ~2e-7, float32 rounding). x is clamped at -87 (e**-87 is
// below float32 resolution next to the max term, which is 1).
static OFFLOAD_INLINE vec vexp(vec x) {
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

// max of s[0:n), n >= 1.
static OFFLOAD_INLINE float row_max(const float* s, int64_t n) {
  int64_t i = 0;
  float mx = s[0];
#if OFFLOAD_ISA > 0
  if (n >= W) {
    vec m = vload(s);
    for (i = W; i + W <= n; i += W) m = vmax(m, vload(s + i));
    float tmp[W > 0 ? W : 1];
    vstore(tmp, m);
    for (int u = 0; u < W; ++u) mx = std::max(mx, tmp[u]);
  }
#endif
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  return mx;
}

// s[0:n) = exp(s[0:n) - m); returns their sum.
static OFFLOAD_INLINE float exp_shift_sum(float* s, int64_t n, float m) {
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

static OFFLOAD_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static OFFLOAD_INLINE float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

// Exact fp16 -> fp32: move exponent+mantissa into place and rebias by 2**112 (this also
// normalises subnormals); inf/nan get the full exponent back; then the sign.
static OFFLOAD_INLINE float fp16_to_float(uint16_t h) {
  float f = bits_to_float((uint32_t)(h & 0x7fff) << 13) * 5.192296858534828e33f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((h & 0x7c00) == 0x7c00) u |= 0x7f800000u;
  u |= (uint32_t)(h & 0x8000) << 16;
  return bits_to_float(u);
}

// Key and value rows are read in place, in their stored dtype, and widened in registers. A row
// is consumed in blocks of 2W elements as two vectors: float32 and fp16 in element order; bf16
// as (even elements, odd elements), one shift or one mask per W elements of a single 2W load.
// The query is stored in the same order (`storage_index`), so dot products are unchanged, and
// the accumulators come out in it too (the merge pass restores element order). A remainder of
// fewer than 2W elements is read in element order.
template <int KIND>
struct Row {
  static OFFLOAD_INLINE float at(const void* r, int64_t i) {
    if (KIND == 0) return ((const float*)r)[i];
    const uint16_t h = ((const uint16_t*)r)[i];
    return KIND == 2 ? bf16_to_float(h) : fp16_to_float(h);
  }
#if OFFLOAD_ISA > 0
  static OFFLOAD_INLINE void pair(const void* r, int64_t i, vec& lo, vec& hi) {  // elements [i, i + 2W)
    if (KIND == 0) {
      lo = vload((const float*)r + i), hi = vload((const float*)r + i + W);
    } else if (KIND == 1) {
      lo = vload_fp16((const uint16_t*)r + i), hi = vload_fp16((const uint16_t*)r + i + W);
    } else {
      vpair_bf16((const uint16_t*)r + i, lo, hi);
    }
  }
  static OFFLOAD_INLINE vec one(const void* r, int64_t i) {  // elements [i, i + W), element order
    if (KIND == 0) return vload((const float*)r + i);
    return KIND == 1 ? vload_fp16((const uint16_t*)r + i) : vload_bf16((const uint16_t*)r + i);
  }
#endif
};

// Where element e of a head_dim-d row sits in the order above (bf16 only; identity otherwise).
static OFFLOAD_INLINE int64_t storage_index(int64_t e, int64_t d, int kind) {
  const int64_t blk = 2 * (W > 0 ? W : 1);
  if (kind != 2 || W == 0 || e >= d / blk * blk) return e;
  const int64_t o = e % blk;
  return e - o + (o & 1) * W + (o >> 1);
}

// Software prefetch of the block processed next (the next KV head of this page, or the first
// of the next page), a few lines at each step of the current block's arithmetic (`tick`), so
// the misses overlap the math instead of queueing behind each other. With head-major pages
// ([page, KV head, token, D]) a block is one contiguous run of S rows.
struct Prefetcher {
  const char* k = nullptr;
  const char* v = nullptr;
  size_t row_stride = 0, row_bytes = 0;
  size_t block_rows = 0;
  size_t row = 0, col = 0, rows = 0;  // the next line: keys and values at row * row_stride + col
  int per_score_block = 0, per_value_row = 0;

  // Blocks of n_rows rows of `bytes` each, `stride` apart; the block's arithmetic makes
  // score_blocks ticks of per_score_block lines, then value_rows ticks of per_value_row. Once per
  // work item: the same for every block.
  void plan(size_t stride, int64_t n_rows, size_t bytes, int64_t score_blocks, int64_t value_rows) {
    row_stride = stride, row_bytes = bytes, block_rows = OFFLOAD_PREFETCH ? (size_t)n_rows : 0;
    const int64_t pairs = (int64_t)(block_rows * ((bytes + 63) / 64));  // a tick line = a key and a value line
    // half the lines during the scores, the rest in the first half of the value pass
    per_score_block = (int)((pairs / 2 + score_blocks - 1) / std::max<int64_t>(score_blocks, 1));
    per_value_row = (int)((pairs + value_rows - 1) / std::max<int64_t>(value_rows, 1));
  }
  // The next block: keys at kp, values at vp (same offsets).
  void aim(const char* kp, const char* vp) { k = kp, v = vp, row = col = 0, rows = block_rows; }
  void none() { row = rows = 0; }
  OFFLOAD_INLINE void tick(int lines) {
    for (int u = 0; u < lines && row < rows; ++u) {
      const size_t off = row * row_stride + col;
      __builtin_prefetch(k + off, 0, 2);
      __builtin_prefetch(v + off, 0, 2);
      col += 64;
      if (col >= row_bytes) col = 0, ++row;
    }
  }
};

#if OFFLOAD_ISA > 0
static const int T = W == 16 ? 4 : 2;  // keys per score block: 4 rows x T keys = W accumulators
#endif

// s[j * sstride + t] = q[j] . k[t] for NR <= 4 query rows j and n keys (key row stride ks
// bytes). Each key chunk is loaded and widened once for the NR rows; the 4 x T dot products of
// a block of T keys are independent accumulators, reduced together by a transpose tree.
template <int KIND, int NR>
static OFFLOAD_INLINE void scores_rows(const float* const q[4], const char* k, size_t ks, int64_t n, int64_t d, float* s,
                               int64_t sstride, Prefetcher& pf) {
  const int nr = NR;
  int64_t t = 0;
#if OFFLOAD_ISA > 0
  for (; t + T <= n; t += T) {
    pf.tick(pf.per_score_block);
    vec acc[4 * T];
#pragma GCC unroll 16
    for (int u = 0; u < 4 * T; ++u) acc[u] = vzero();
    int64_t i = 0;
    for (; i + 2 * W <= d; i += 2 * W) {
      vec lo[T], hi[T];
#pragma GCC unroll 4
      for (int u = 0; u < T; ++u) Row<KIND>::pair(k + (t + u) * ks, i, lo[u], hi[u]);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const vec qa = vload(q[j] + i), qb = vload(q[j] + i + W);
#pragma GCC unroll 4
        for (int u = 0; u < T; ++u) acc[j * T + u] = vfma(qb, hi[u], vfma(qa, lo[u], acc[j * T + u]));
      }
    }
    for (; i + W <= d; i += W) {
      vec kv[T];
#pragma GCC unroll 4
      for (int u = 0; u < T; ++u) kv[u] = Row<KIND>::one(k + (t + u) * ks, i);
      for (int j = 0; j < nr; ++j) {
        const vec qa = vload(q[j] + i);
#pragma GCC unroll 4
        for (int u = 0; u < T; ++u) acc[j * T + u] = vfma(qa, kv[u], acc[j * T + u]);
      }
    }
    float r[4 * T];
    vstore(r, vsum_lanes(acc));
    if (W < 4 * T) vstore(r + W, vsum_lanes(acc + W));
    for (int j = 0; j < nr; ++j)
      for (int u = 0; u < T; ++u) {
        float x = r[j * T + u];
        for (int64_t e = i; e < d; ++e) x += q[j][e] * Row<KIND>::at(k + (t + u) * ks, e);
        s[j * sstride + t + u] = x;
      }
  }
#endif
  for (; t < n; ++t) {
    const char* kr = k + t * ks;
    for (int j = 0; j < nr; ++j) {
      float x = 0.f;
      int64_t i = 0;
#if OFFLOAD_ISA > 0
      vec a = vzero();
      for (; i + 2 * W <= d; i += 2 * W) {
        vec lo, hi;
        Row<KIND>::pair(kr, i, lo, hi);
        a = vfma(vload(q[j] + i + W), hi, vfma(vload(q[j] + i), lo, a));
      }
      for (; i + W <= d; i += W) a = vfma(vload(q[j] + i), Row<KIND>::one(kr, i), a);
      x = vsum(a);
#endif
      for (; i < d; ++i) x += q[j][i] * Row<KIND>::at(kr, i);
      s[j * sstride + t] = x;
    }
  }
}

template <int KIND>
static OFFLOAD_INLINE void scores(int nr, const float* const q[4], const char* k, size_t ks, int64_t n, int64_t d, float* s,
                          int64_t sstride, Prefetcher& pf) {
  switch (nr) {
    case 1: scores_rows<KIND, 1>(q, k, ks, n, d, s, sstride, pf); break;
    case 2: scores_rows<KIND, 2>(q, k, ks, n, d, s, sstride, pf); break;
    case 3: scores_rows<KIND, 3>(q, k, ks, n, d, s, sstride, pf); break;
    default: scores_rows<KIND, 4>(q, k, ks, n, d, s, sstride, pf); break;
  }
}

#if OFFLOAD_ISA == 3
// q.k for bf16 keys and a bf16 query (every query element exactly a bf16, checked by the caller):
// vdpbf16ps multiplies bf16 pairs exactly and accumulates in float32, so the scores are those of
// the float32 path up to summation order, with half the multiply-adds and no widening. The
// query rows qb are bf16 bits in element order, unscaled; d % 32 == 0. Same blocking as
// scores_rows: 4 rows x 4 keys of independent accumulators, reduced by one transpose tree.
static OFFLOAD_INLINE vec vdot_bf16(vec acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

template <int NR>
static OFFLOAD_INLINE void scores_dp_rows(const uint16_t* const qb[4], const char* k, size_t ks, int64_t n, int64_t d,
                                  float scale, float* s, int64_t sstride, Prefetcher& pf) {
  int64_t t = 0;
  const vec vscale = vset1(scale);
  for (; t + 4 <= n; t += 4) {
    pf.tick(pf.per_score_block);
    vec acc[16];
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) acc[u] = vzero();
    for (int64_t i = 0; i < d; i += 32) {
      __m512i kv[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) kv[u] = _mm512_loadu_si512(k + (t + u) * ks + i * 2);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const __m512i qv = _mm512_loadu_si512(qb[j] + i);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[j * 4 + u] = vdot_bf16(acc[j * 4 + u], qv, kv[u]);
      }
    }
    float r[16];
    vstore(r, vmul(vsum_lanes(acc), vscale));
    for (int j = 0; j < NR; ++j)
      for (int u = 0; u < 4; ++u) s[j * sstride + t + u] = r[j * 4 + u];
  }
  for (; t < n; ++t) {
    for (int j = 0; j < NR; ++j) {
      vec acc = vzero();
      for (int64_t i = 0; i < d; i += 32)
        acc = vdot_bf16(acc, _mm512_loadu_si512(qb[j] + i), _mm512_loadu_si512(k + t * ks + i * 2));
      s[j * sstride + t] = vsum(acc) * scale;
    }
  }
}

static OFFLOAD_INLINE void scores_dp(int nr, const uint16_t* const qb[4], const char* k, size_t ks, int64_t n, int64_t d,
                             float scale, float* s, int64_t sstride, Prefetcher& pf) {
  switch (nr) {
    case 1: scores_dp_rows<1>(qb, k, ks, n, d, scale, s, sstride, pf); break;
    case 2: scores_dp_rows<2>(qb, k, ks, n, d, scale, s, sstride, pf); break;
    case 3: scores_dp_rows<3>(qb, k, ks, n, d, scale, s, sstride, pf); break;
    default: scores_dp_rows<4>(qb, k, ks, n, d, scale, s, sstride, pf); break;
  }
}
#endif

#if OFFLOAD_ISA > 0
// One pass of accumulate_rows over elements [i, i + NV * W): NR x NV accumulators in registers
// for all n value rows; NV even reads pairs (storage order), NV == 1 one vector (element order).
template <int KIND, int NR, int NV>
static OFFLOAD_INLINE void accumulate_pass(float* const acc[4], const float alpha[4], const float* w, int64_t wstride,
                                   const char* v, size_t vs, int64_t n, int64_t i, Prefetcher& pf) {
  vec a[NR][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) a[j][c] = vmul(vload(acc[j] + i + c * W), vset1(alpha[j]));
  for (int64_t t = 0; t < n; ++t) {
    const char* vr = v + t * vs;
    pf.tick(pf.per_value_row);
    vec vv[NV];
    if (NV == 1) {
      vv[0] = Row<KIND>::one(vr, i);
    } else {
#pragma GCC unroll 4
      for (int c = 0; c + 1 < NV; c += 2) Row<KIND>::pair(vr, i + c * W, vv[c], vv[c + 1]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const vec p = vset1(w[j * wstride + t]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) a[j][c] = vfma(p, vv[c], a[j][c]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vstore(acc[j] + i + c * W, a[j][c]);
}
#endif

// acc[j] = acc[j] * alpha[j] + sum_t w[j * wstride + t] * v[t] for NR <= 4 rows j and n value
// rows (row stride vs bytes): each value chunk is loaded and widened once for the NR rows.
template <int KIND, int NR>
static OFFLOAD_INLINE void accumulate_rows(float* const acc[4], const float alpha[4], const float* w, int64_t wstride,
                                   const char* v, size_t vs, int64_t n, int64_t d, Prefetcher& pf) {
  int64_t i = 0;
#if OFFLOAD_ISA > 0
  constexpr int NV = W == 16 ? 4 : 2;  // vectors per pass: NR x NV accumulators fit the registers
  for (; i + NV * W <= d; i += NV * W) accumulate_pass<KIND, NR, NV>(acc, alpha, w, wstride, v, vs, n, i, pf);
  for (; i + 2 * W <= d; i += 2 * W) accumulate_pass<KIND, NR, 2>(acc, alpha, w, wstride, v, vs, n, i, pf);
  for (; i + W <= d; i += W) accumulate_pass<KIND, NR, 1>(acc, alpha, w, wstride, v, vs, n, i, pf);
#endif
  for (; i < d; ++i) {
    for (int j = 0; j < NR; ++j) {
      float a = acc[j][i] * alpha[j];
      for (int64_t t = 0; t < n; ++t) a += w[j * wstride + t] * Row<KIND>::at(v + t * vs, i);
      acc[j][i] = a;
    }
  }
}

template <int KIND>
static OFFLOAD_INLINE void accumulate(int nr, float* const acc[4], const float alpha[4], const float* w, int64_t wstride,
                              const char* v, size_t vs, int64_t n, int64_t d, Prefetcher& pf) {
  switch (nr) {
    case 1: accumulate_rows<KIND, 1>(acc, alpha, w, wstride, v, vs, n, d, pf); break;
    case 2: accumulate_rows<KIND, 2>(acc, alpha, w, wstride, v, vs, n, d, pf); break;
    case 3: accumulate_rows<KIND, 3>(acc, alpha, w, wstride, v, vs, n, d, pf); break;
    default: accumulate_rows<KIND, 4>(acc, alpha, w, wstride, v, vs, n, d, pf); break;
  }
}

// One work item (see cpu_plan.py). q is in storage order (storage_index) and so is part_acc.
// Thread scratch: sbuf [4 * S] scores / weights of 4 rows.
template <int KIND>
static void run_item_kind(const ItemArgs& a, int64_t item, float* sbuf) {
  const int64_t D = a.head_dim, S = a.page_size, Hkv = a.num_kv_heads, Q = a.q_len;
  const int64_t G = a.num_heads / Hkv, NS = a.num_splits, R = G * Q;
  const int64_t b = item / (a.num_groups * NS);
  const int64_t hg = (item / NS) % a.num_groups, split = item % NS;
  const int64_t h0 = hg * a.heads_per_item, h1 = std::min(Hkv, h0 + a.heads_per_item);
  const float NEG_INF = -std::numeric_limits<float>::infinity();
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
  const size_t es = KIND == 0 ? 4 : 2;
  const size_t row_bytes = (size_t)D * es;  // one token of one KV head
  const size_t block_bytes = (size_t)S * row_bytes;  // one KV head of one page: contiguous
  const size_t page_bytes = (size_t)Hkv * block_bytes;
  const char* kbase = (const char*)a.key_pages;
  const char* vbase = (const char*)a.value_pages;
  Prefetcher pf;
  {  // ticks per block: 4 rows at a time, scores 4 keys per tick, values one row per tick and pass
    const int64_t passes = (D + 4 * (W > 0 ? W : 1) - 1) / (4 * (W > 0 ? W : 1));
    const int64_t row_groups = (R + 3) / 4;
    pf.plan(row_bytes, S, row_bytes, row_groups * ((S + 3) / 4), row_groups * S * passes);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t page = a.page_table[b * a.max_pages + p];
    if (page < 0 || page >= a.num_pages_total) {
      *a.error = 1;
      return;
    }
    const int64_t ntok = p < n - 1 ? S : a.last_page_len[b];
    const int64_t next = p + 1 < p1 ? a.page_table[b * a.max_pages + p + 1] : -1;
    const bool next_ok = next >= 0 && next < a.num_pages_total;
    for (int64_t kvh = h0; kvh < h1; ++kvh) {
      const size_t off0 = (size_t)page * page_bytes + (size_t)kvh * block_bytes;
      const int64_t pf_page = kvh + 1 < h1 ? page : next, pf_head = kvh + 1 < h1 ? kvh + 1 : h0;
      if (kvh + 1 < h1 || next_ok) {
        const size_t off = (size_t)pf_page * page_bytes + (size_t)pf_head * block_bytes;
        pf.aim(kbase + off, vbase + off);
      } else {
        pf.none();
      }
      const char* kp = kbase + off0;
      const char* vp = vbase + off0;
      // The G query heads x Q rows of this KV head, 4 at a time: scores, then the page's
      // online-softmax step per row, then P.V for the 4 rows from each loaded value row.
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const int nr = (int)std::min<int64_t>(4, R - r0);
        const float* qr[4];
        const uint16_t* qbr[4];
        float* acc[4];
        float alpha[4] = {1.f, 1.f, 1.f, 1.f};
        int64_t tl[4], row[4];
        int64_t tmax = 0;
        for (int j = 0; j < nr; ++j) {
          const int64_t h = kvh * G + (r0 + j) / Q, qi = (r0 + j) % Q;
          tl[j] = ntok;
          if (a.causal) tl[j] = std::max<int64_t>(0, std::min(ntok, kv_len - Q + qi - p * S + 1));
          tmax = std::max(tmax, tl[j]);
          qr[j] = a.q + ((b * a.num_heads + h) * Q + qi) * D;
          qbr[j] = a.qb ? a.qb + ((b * a.num_heads + h) * Q + qi) * D : nullptr;
          row[j] = ((b * a.num_heads + h) * NS + split) * Q + qi;
          acc[j] = a.part_acc + row[j] * D;
        }
#if OFFLOAD_ISA == 3
        if (KIND == 2 && a.qb) {
          if (tmax > 0) scores_dp(nr, qbr, kp, row_bytes, tmax, D, a.scale, sbuf, S, pf);
        } else
#endif
        if (tmax > 0) scores<KIND>(nr, qr, kp, row_bytes, tmax, D, sbuf, S, pf);
        if (a.softcap > 0.f)  // logit soft-capping, on the scaled scores, before the softmax
          for (int j = 0; j < nr; ++j)
            for (int64_t t = 0; t < tl[j]; ++t) sbuf[j * S + t] = a.softcap * std::tanh(sbuf[j * S + t] / a.softcap);
        for (int j = 0; j < nr; ++j) {
          const int64_t h = kvh * G + (r0 + j) / Q, qi = (r0 + j) % Q;
          float* plse = a.page_lse ? a.page_lse + ((b * a.num_heads + h) * Q + qi) * a.max_pages + p : nullptr;
          float* s = sbuf + j * S;
          const float m_old = a.part_m[row[j]];
          const float m_new = tl[j] > 0 ? std::max(m_old, row_max(s, tl[j])) : NEG_INF;
          if (m_new == NEG_INF) {  // nothing visible (or -inf scores): leave the row as it is
            std::fill(s, s + tmax, 0.f);
            if (plse) *plse = NEG_INF;
            continue;
          }
          const float total = exp_shift_sum(s, tl[j], m_new);
          std::fill(s + tl[j], s + tmax, 0.f);  // causally hidden keys weigh nothing
          if (m_new != m_old) {  // the max rarely moves after the first pages: no exp then
            alpha[j] = std::exp(m_old - m_new);  // 0 when m_old is -inf
            a.part_m[row[j]] = m_new;
          }
          a.part_l[row[j]] = a.part_l[row[j]] * alpha[j] + total;
          if (plse) *plse = m_new + std::log(total);
        }
        if (tmax > 0) accumulate<KIND>(nr, acc, alpha, sbuf, S, vp, row_bytes, tmax, D, pf);
      }
    }
  }
}

static void run_item(const void* args, int64_t item, float* sbuf) {
  const ItemArgs& a = *static_cast<const ItemArgs*>(args);
  if (a.kind == 0) return run_item_kind<0>(a, item, sbuf);
  if (a.kind == 1) return run_item_kind<1>(a, item, sbuf);
  return run_item_kind<2>(a, item, sbuf);
}

// sum of s[0:n).
static OFFLOAD_INLINE float sum_of(const float* s, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if OFFLOAD_ISA > 0
  if (n >= W) {
    vec acc = vload(s);
    for (i = W; i + W <= n; i += W) acc = vadd(acc, vload(s + i));
    total = vsum(acc);
  }
#endif
  for (; i < n; ++i) total += s[i];
  return total;
}

// One item of offload_page_exp_sums (shapes: PageSumArgs): KV head h, pages [p0, p1). The tile's
// keys are first transposed into scratch ([D][Tp], Tp its token count rounded up to 2W, zero
// padded), so W consecutive keys' scores are D fused multiply-adds on whole vectors, shared by four
// query rows at a time; exp(score - shift) of a row's tile goes to scratch, then is summed per page.
// Nothing the size of rows x tokens is ever written to memory (the torch version writes the scores
// and reads them back three times). The vector exp clamps at -87: the caller treats any page sum
// below exp(-70) as underflowed and recomputes it exactly (offload/kernels/torch_ref.py).
static void page_sum_item(const void* args, int64_t item, float* sbuf) {
  const PageSumArgs& a = *static_cast<const PageSumArgs*>(args);
  const int64_t D = a.head_dim, S = a.page_size, M = a.rows, T = a.tokens, P = a.num_pages;
  const int64_t h = item / a.tiles, p0 = (item % a.tiles) * a.tile_pages, p1 = std::min(P, p0 + a.tile_pages);
  const int64_t t0 = p0 * S, n = std::min(T, p1 * S) - t0;
  const int64_t step = W > 0 ? 2 * W : 1, Tp = (n + step - 1) / step * step;
  float* kt = sbuf;           // [D][Tp]
  float* e = sbuf + D * Tp;   // [4][Tp]
  const float* keys = a.keys + (h * T + t0) * D;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * Tp + j] = keys[j * D + d];
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * Tp + n, kt + (d + 1) * Tp, 0.f);
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t nr = std::min<int64_t>(4, M - m0);
    const float* qr[4];
    float sh[4];
    for (int64_t r = 0; r < 4; ++r) {  // rows past M repeat the first (computed, never stored)
      const int64_t m = h * M + m0 + (r < nr ? r : 0);
      qr[r] = a.q + m * D, sh[r] = a.shift[m];
    }
#if OFFLOAD_ISA > 0
    for (int64_t t = 0; t < Tp; t += 2 * W) {
      vec acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = vzero();
      for (int64_t d = 0; d < D; ++d) {
        const vec k0 = vload(kt + d * Tp + t), k1 = vload(kt + d * Tp + t + W);
        for (int r = 0; r < 4; ++r) {
          const vec qd = vset1(qr[r][d]);
          acc[r][0] = vfma(qd, k0, acc[r][0]);
          acc[r][1] = vfma(qd, k1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        const vec s = vset1(sh[r]);
        vstore(e + r * Tp + t, vexp(vsub(acc[r][0], s)));
        vstore(e + r * Tp + t + W, vexp(vsub(acc[r][1], s)));
      }
    }
#else
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qr[r][d] * kt[d * Tp + t];
        e[r * Tp + t] = std::exp(dot - sh[r]);
      }
#endif
    for (int64_t r = 0; r < nr; ++r) {
      float* o = a.out + (h * M + m0 + r) * P;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t start = (p - p0) * S;
        o[p] = sum_of(e + r * Tp + start, std::min(S, n - start));
      }
    }
  }
}

static int64_t storage_index_of(int64_t e, int64_t d, int kind) { return storage_index(e, d, kind); }
