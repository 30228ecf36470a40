// C++ paged host-part attention: the same kernel as offload/kernels/numba_kernel.py, with
// AVX-512 / AVX2 / scalar variants chosen at run time and OpenMP threads. Plain C ABI, loaded
// with ctypes by offload/kernels/cpp_kernel.py (ctypes drops the GIL for the call).
//
// Shapes (all row-major, contiguous):
//   q            [B, H, Q, D] float32, already multiplied by the softmax scale
//   key/value    [P, S, H_kv, D] float32 (kind 0) | fp16 bits (kind 1) | bf16 bits (kind 2)
//   page_table   [B, max_pages] int64; num_pages, last_page_len [B] int64
//   out          [B, H, Q, D] float32; lse [B, H, Q] float32; page_lse [B, H, Q, max_pages] or null

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#ifndef OFFLOAD_PREFETCH
#define OFFLOAD_PREFETCH 1  // software-prefetch the next page (builds without it exist to compare)
#endif
#ifndef OFFLOAD_PF_DIST
#define OFFLOAD_PF_DIST 2  // pages ahead: one page is not enough to cover DRAM latency
#endif
#ifndef OFFLOAD_PF_HINT
#define OFFLOAD_PF_HINT 2  // prefetcht1, into L2: T0 (into L1) measured no better than no prefetch
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OFFLOAD_X86 1
#endif

namespace {

struct ItemArgs {
  const float* q;
  const void* key_pages;
  const void* value_pages;
  int kind;
  const int64_t* page_table;
  const int64_t* num_pages;
  const int64_t* last_page_len;
  int64_t num_heads, q_len, head_dim, num_kv_heads, page_size, max_pages, num_pages_total;
  int causal;
  float* page_lse;
  float* part_acc;
  float* part_m;
  float* part_l;
  int64_t heads_per_item, num_groups, num_splits;
  volatile int* error;
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: plain
};

typedef void (*ItemFn)(const ItemArgs&, int64_t, float*);
typedef int64_t (*IndexFn)(int64_t, int64_t, int);

namespace isa_scalar {
#define OFFLOAD_ISA 0
#include "paged_attention_impl.h"
#undef OFFLOAD_ISA
}  // namespace isa_scalar

#ifdef OFFLOAD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define OFFLOAD_ISA 1
#include "paged_attention_impl.h"
#undef OFFLOAD_ISA
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
#define OFFLOAD_ISA 2
#include "paged_attention_impl.h"
#undef OFFLOAD_ISA
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

int best_isa() {
#ifdef OFFLOAD_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
  return 0;
}

ItemFn item_fn(int isa) {
#ifdef OFFLOAD_X86
  if (isa == 2) return isa_avx512::run_item;
  if (isa == 1) return isa_avx2::run_item;
#endif
  return isa_scalar::run_item;
}

// Element e of a row -> its position in that variant's storage order (see paged_attention_impl.h).
IndexFn index_fn(int isa) {
#ifdef OFFLOAD_X86
  if (isa == 2) return isa_avx512::storage_index_of;
  if (isa == 1) return isa_avx2::storage_index_of;
#endif
  return isa_scalar::storage_index_of;
}

}  // namespace

#define OFFLOAD_EXPORT __attribute__((visibility("default")))

extern "C" {

// Best instruction set this CPU supports: 2 AVX-512, 1 AVX2, 0 scalar.
OFFLOAD_EXPORT int offload_cpu_best_isa() { return best_isa(); }

// Returns 0 on success; 1 a page index out of range; 2 out of memory; 3 isa not supported here.
// isa: -1 picks the best; 0/1/2 force one (tests cover every variant this CPU can run).
OFFLOAD_EXPORT int offload_paged_attention(const float* q, const void* key_pages, const void* value_pages, int kind,
                                           const int64_t* page_table, const int64_t* num_pages, const int64_t* last_page_len,
                                           int64_t bsz, int64_t num_heads, int64_t q_len, int64_t head_dim, int64_t num_kv_heads,
                                           int64_t page_size, int64_t max_pages, int64_t num_pages_total, int causal,
                                           float* page_lse, float* out, float* lse, int64_t heads_per_item, int64_t num_groups,
                                           int64_t num_splits, int threads, int isa, float softcap) {
  const int best = best_isa();
  if (isa < 0) isa = best;
  if (isa > best) return 3;
  const int64_t rows = bsz * num_heads * num_splits * q_len;
  const IndexFn index = index_fn(isa);
  std::vector<float> part_acc, part_m, part_l, q_stored;
  std::vector<int64_t> order((size_t)head_dim);  // element d sits at order[d] in q and part_acc
  for (int64_t d = 0; d < head_dim; ++d) order[(size_t)d] = index(d, head_dim, kind);
  try {
    q_stored.resize((size_t)(bsz * num_heads * q_len * head_dim));
    part_acc.resize((size_t)(rows * head_dim));
    part_m.resize((size_t)rows);
    part_l.resize((size_t)rows);
  } catch (const std::bad_alloc&) {
    return 2;
  }
  for (int64_t r = 0; r < bsz * num_heads * q_len; ++r)
    for (int64_t d = 0; d < head_dim; ++d) q_stored[(size_t)(r * head_dim + order[(size_t)d])] = q[r * head_dim + d];
  volatile int error = 0;
  ItemArgs args{q_stored.data(), key_pages, value_pages, kind, page_table, num_pages, last_page_len, num_heads, q_len,
                head_dim, num_kv_heads, page_size, max_pages, num_pages_total, causal, page_lse,
                part_acc.data(), part_m.data(), part_l.data(), heads_per_item, num_groups, num_splits, &error,
                softcap};
  const ItemFn fn = item_fn(isa);
  const int64_t items = bsz * num_groups * num_splits;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  if (threads < 1) threads = 1;

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> sbuf((size_t)(4 * page_size));  // scores / weights of 4 query rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) fn(args, item, sbuf.data());

    // Merge the splits by log-sum-exp (exact); rows that saw no key give 0 and -inf.
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < bsz * num_heads; ++bh) {
      for (int64_t qi = 0; qi < q_len; ++qi) {
        const int64_t base = bh * num_splits * q_len + qi;  // row of split 0
        float m = NEG_INF;
        for (int64_t s = 0; s < num_splits; ++s) m = std::max(m, part_m[base + s * q_len]);
        float* o = out + (bh * q_len + qi) * head_dim;
        if (m == NEG_INF) {
          std::fill(o, o + head_dim, 0.f);
          lse[bh * q_len + qi] = NEG_INF;
          continue;
        }
        float total = 0.f;
        for (int64_t s = 0; s < num_splits; ++s) total += part_l[base + s * q_len] * std::exp(part_m[base + s * q_len] - m);
        std::fill(o, o + head_dim, 0.f);
        for (int64_t s = 0; s < num_splits; ++s) {
          const float w = std::exp(part_m[base + s * q_len] - m) / total;
          if (w == 0.f) continue;
          const float* acc = part_acc.data() + (base + s * q_len) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) o[d] += w * acc[order[(size_t)d]];
        }
        lse[bh * q_len + qi] = m + std::log(total);
      }
    }
  }
  return error ? 1 : 0;
}

}  // extern "C"
