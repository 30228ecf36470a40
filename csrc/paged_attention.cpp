// C++ paged host-part attention: the same kernel as offload/kernels/numba_kernel.py, with
// AVX-512 / AVX2 / scalar variants chosen at run time, run by the calling thread and helper
// threads (`WorkPool`: torch's own OpenMP threads where the build has OpenMP, else threads of
// our own that join when they are awake). Plain C ABI, loaded with ctypes by
// offload/kernels/cpp_kernel.py (ctypes drops the GIL for the call).
//
// Shapes (all row-major, contiguous):
//   q            [B, H, Q, D] float32, not scaled (scale is an argument)
//   key/value    [P, H_kv, S, D] float32 (kind 0) | fp16 bits (kind 1) | bf16 bits (kind 2)
//   page_table   [B, max_pages] int64; num_pages, last_page_len [B] int64
//   out          [B, H, Q, D] float32; lse [B, H, Q] float32; page_lse [B, H, Q, max_pages] or null

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>
#endif

#ifndef OFFLOAD_PREFETCH
#define OFFLOAD_PREFETCH 1  // software-prefetch the next block (builds without it exist to compare)
#endif

// Small helpers of the inner loops are always inlined: an out-of-line call spills the vector
// accumulators it is passed (or that live across it) to the stack on every block.
#define OFFLOAD_INLINE inline __attribute__((always_inline))

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
  std::atomic<int>* error;
  const uint16_t* qb;  // ISA 3, bf16 pages: the query as bf16 bits (element order, unscaled), or null
  float scale;         // the softmax scale (q above is already scaled; qb is not)
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: plain
};

// The per-page exp sums of offload_page_exp_sums (the prefill's observed rows):
//   q [H_kv, M, D] float32, already scaled; keys [H_kv, T, D] float32; shift [H_kv, M] float32, at
//   least every score of its row (the row's log-sum-exp over these keys); out [H_kv, M, ceil(T / S)]
//   the sum over each page's keys of exp(q.k - shift). An item is one KV head and `tile_pages` pages.
struct PageSumArgs {
  const float* q;
  const float* keys;
  const float* shift;
  float* out;
  int64_t rows, tokens, head_dim, page_size, num_pages, tile_pages, tiles;
};

// A work item of either kind: args points at the ItemArgs or PageSumArgs of the call.
typedef void (*ItemFn)(const void*, int64_t, float*);
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

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace isa_avx512bf16 {
#define OFFLOAD_ISA 3
#include "paged_attention_impl.h"
#undef OFFLOAD_ISA
}  // namespace isa_avx512bf16
#pragma GCC pop_options
#endif

int best_isa() {
#ifdef OFFLOAD_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
  return 0;
}

ItemFn item_fn(int isa) {
#ifdef OFFLOAD_X86
  if (isa == 3) return isa_avx512bf16::run_item;
  if (isa == 2) return isa_avx512::run_item;
  if (isa == 1) return isa_avx2::run_item;
#endif
  return isa_scalar::run_item;
}

ItemFn page_sum_fn(int isa) {
#ifdef OFFLOAD_X86
  if (isa == 3) return isa_avx512bf16::page_sum_item;  // (the same code: the keys are float32)
  if (isa == 2) return isa_avx512::page_sum_item;
  if (isa == 1) return isa_avx2::page_sum_item;
#endif
  return isa_scalar::page_sum_item;
}

// Element e of a row -> its position in that variant's storage order (see paged_attention_impl.h).
IndexFn index_fn(int isa) {
#ifdef OFFLOAD_X86
  if (isa == 3) return isa_avx512bf16::storage_index_of;
  if (isa == 2) return isa_avx512::storage_index_of;
  if (isa == 1) return isa_avx2::storage_index_of;
#endif
  return isa_scalar::storage_index_of;
}

// Runs a call's work items on the calling thread and helper threads; items are claimed one at a
// time from a shared ticket, so whoever is awake does the work.
//
// Helpers are OpenMP threads where the build has OpenMP and its OpenMP calls reach the runtime
// torch uses (cpp_kernel.py checks, then sets `use_openmp`): torch's workers, still
// spinning after the model's last matmul, take items at once. Threads of our own would find the
// other core held by that spinning worker and do nothing until the scheduler swaps them in (on two
// cores a call then ran at one thread's speed). Otherwise our own threads: nothing waits on one
// that has not started (the caller only waits for items a helper claimed and is running), so
// when another process holds the cores a call is never held up until a sleeping helper gets its
// next scheduler tick. Between calls one watches for the next for `kSpinMicros` (a decode step
// makes one call per layer, back to back), then sleeps on a condition variable, so an idle pool
// takes no CPU from other processes.
class WorkPool {
 public:
  typedef ItemFn Fn;

  bool use_openmp = false;
  int64_t openmp_calls_ = 0, openmp_late_ = 0;  // calls on the team, and those that waited for it

  void forget_late_team() {  // the next call tries the OpenMP team again
#ifdef _OPENMP
    std::lock_guard<std::mutex> call(call_mu_);
    openmp_skip_ = openmp_backoff_ = 0;
#endif
  }

  // fn(args, i, scratch) for every i in [0, items), on this thread plus up to `helpers` others;
  // scratch is a per-thread buffer of scratch_floats floats.
  void run(Fn fn, const void* args, int64_t items, int helpers, size_t scratch_floats) {
    helpers = (int)std::min<int64_t>(helpers, items - 1);
    std::unique_lock<std::mutex> call(call_mu_, std::defer_lock);
    if (helpers > 0) call.try_lock();  // (a one-thread call never holds the helpers from another)
    if (!call.owns_lock()) {  // one thread asked for, or another call is using the helpers: run alone
      std::vector<float> scratch(scratch_floats);
      for (int64_t i = 0; i < items; ++i) fn(args, i, scratch.data());
      return;
    }
#ifdef _OPENMP
    if (use_openmp && openmp_skip_ == 0) {
      run_openmp(fn, args, items, helpers, scratch_floats);
      return;
    }
    if (openmp_skip_ > 0) --openmp_skip_;
#endif
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while ((int)threads_ < helpers) {
        std::thread(&WorkPool::helper_loop, this, (int)threads_).detach();  // lives as long as the process
        ++threads_;
      }
      gen = gen_.load() + 1;
      fn_ = fn, args_ = args, items_ = items, wanted_ = helpers, scratch_floats_ = scratch_floats;
      done_.store(0);
      ticket_.store((uint64_t)gen << 32);
      gen_.store(gen);
    }
    cv_.notify_all();
    std::vector<float> scratch(scratch_floats);
    int64_t mine = work(gen, fn, args, items, scratch.data());
    // Wait only for items a helper claimed and is running (never for one that has not started).
    for (int spin = 0; done_.load(std::memory_order_acquire) + mine < items; ++spin) {
      if (spin < 64) continue;
      std::this_thread::yield();
    }
  }

 private:
#ifdef _OPENMP
  // The call on an OpenMP team. Its closing barrier waits for every team thread, including one
  // the OS has not run yet or has preempted in the middle of an item: when other processes hold
  // the cores that is a wait for its next scheduler tick (milliseconds, for a call of a fraction
  // of one). So a call where the caller waited for the team longer than two of its own items
  // take (plus kLateMicros) makes the next calls use our own threads, which are never waited for
  // unless running, for twice as many calls each time it happens again (up to kMaxOpenmpSkip);
  // the first call that finds the team prompt again resets that.
  void run_openmp(Fn fn, const void* args, int64_t items, int helpers, size_t scratch_floats) {
    using clock = std::chrono::steady_clock;
    std::atomic<int64_t> next{0};
    int64_t mine = 0;
    const clock::time_point start = clock::now();
    clock::time_point mine_start, mine_done;
#pragma omp parallel num_threads(helpers + 1)
    {
      const bool caller = omp_get_thread_num() == 0;
      if (caller) mine_start = clock::now();
      std::vector<float> scratch(scratch_floats);
      int64_t ran = 0;
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items; ++ran) fn(args, i, scratch.data());
      if (caller) mine = ran, mine_done = clock::now();
    }
    const clock::time_point end = clock::now();
    const auto per_item = (mine_done - mine_start) / std::max<int64_t>(mine, 1);
    const auto late = std::chrono::microseconds(kLateMicros);
    if (mine_start - start > late || end - mine_done > 2 * per_item + late) {  // waited to start, or to finish
      openmp_backoff_ = std::min(2 * openmp_backoff_ + 1, kMaxOpenmpSkip);
      openmp_skip_ = openmp_backoff_;
    } else {
      openmp_backoff_ = 0;
    }
    ++openmp_calls_, openmp_late_ += openmp_backoff_ > 0;
  }
  static constexpr int64_t kLateMicros = 200;  // a spinning or just-woken worker arrives in far less
  static constexpr int64_t kMaxOpenmpSkip = 1024;
  int64_t openmp_skip_ = 0, openmp_backoff_ = 0;  // under call_mu_
#endif

  // Claims and runs items of generation gen until none are left; returns how many it ran.
  int64_t work(uint32_t gen, Fn fn, const void* args, int64_t items, float* scratch) {
    int64_t ran = 0;
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_relaxed);
      do {
        if ((uint32_t)(t >> 32) != gen || (int64_t)(uint32_t)t >= items) return ran;
      } while (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel));
      fn(args, (int64_t)(uint32_t)t, scratch);
      ++ran;
    }
  }

  void helper_loop(int index) {
    std::vector<float> scratch;
    std::unique_lock<std::mutex> lock(mu_);
    uint32_t seen = gen_.load();
    for (;;) {
      lock.unlock();
      const auto start = std::chrono::steady_clock::now();
      for (int spin = 1; gen_.load(std::memory_order_acquire) == seen; ++spin) {
        if (spin % 64 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros)) break;
        pause();
      }
      lock.lock();
      cv_.wait(lock, [&] { return gen_.load() != seen; });
      seen = gen_.load();
      if (index >= wanted_) continue;
      const Fn fn = fn_;
      const void* args = args_;  // valid while this generation has unclaimed items (see run)
      const int64_t items = items_;
      if (scratch.size() < scratch_floats_) scratch.resize(scratch_floats_);
      lock.unlock();
      const int64_t ran = work(seen, fn, args, items, scratch.data());
      if (ran) done_.fetch_add(ran, std::memory_order_acq_rel);
      lock.lock();
    }
  }

  std::mutex call_mu_;  // one call uses the helpers at a time
  std::mutex mu_;
  std::condition_variable cv_;
  size_t threads_ = 0;
  static constexpr int kSpinMicros = 100;
  static void pause() {
#ifdef OFFLOAD_X86
    _mm_pause();
#endif
  }
  std::atomic<uint32_t> gen_{0};  // the current call; written under mu_
  Fn fn_ = nullptr;
  const void* args_ = nullptr;
  int64_t items_ = 0;
  int wanted_ = 0;
  size_t scratch_floats_ = 0;
  std::atomic<uint64_t> ticket_{0};  // generation << 32 | next unclaimed item
  std::atomic<int64_t> done_{0};     // items the helpers finished in this generation
};

// Helper threads do not survive fork(): a child starts with a fresh pool of its own threads (the
// parent's is leaked; GNU OpenMP's team is not usable in a child either).
WorkPool* pool = new WorkPool;
void fresh_pool_after_fork() { pool = new WorkPool; }
struct AtFork {
  AtFork() { pthread_atfork(nullptr, nullptr, fresh_pool_after_fork); }
} at_fork;

}  // namespace

#define OFFLOAD_EXPORT __attribute__((visibility("default")))

extern "C" {

// Best instruction set this CPU supports: 3 AVX-512 with BF16, 2 AVX-512, 1 AVX2, 0 scalar.
OFFLOAD_EXPORT int offload_cpu_best_isa() { return best_isa(); }

// 1 when this build can take its helper threads from OpenMP, else 0.
OFFLOAD_EXPORT int offload_cpu_openmp_built() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Calls run on an OpenMP team so far, and how many of them waited for a late team thread.
OFFLOAD_EXPORT void offload_cpu_openmp_stats(int64_t* calls, int64_t* late) {
  *calls = pool->openmp_calls_, *late = pool->openmp_late_;
}

// The file of the OpenMP runtime this library's OpenMP calls go to ("" without OpenMP).
OFFLOAD_EXPORT const char* offload_cpu_openmp_library() {
#ifdef _OPENMP
  Dl_info info;
  if (dladdr((void*)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
#endif
  return "";
}

// Helpers from OpenMP (1, where built) or our own threads (0), or leave it (-1); returns the
// setting now in force.
OFFLOAD_EXPORT int offload_cpu_use_openmp(int on) {
  if (on >= 0) pool->use_openmp = on && offload_cpu_openmp_built(), pool->forget_late_team();
  return pool->use_openmp;
}

// Per-page sums of exp(score - shift) (shapes: PageSumArgs); returns 0, or 3 where isa is not
// supported here. isa: -1 the best, or force 0/1/2/3 (3 runs 2's code: the keys are float32).
OFFLOAD_EXPORT int offload_page_exp_sums(const float* q, const float* keys, const float* shift, int64_t num_kv_heads,
                                         int64_t rows, int64_t tokens, int64_t head_dim, int64_t page_size, float* out,
                                         int threads, int isa) {
  const int best = best_isa();
  if (isa < 0) isa = best;
  if (isa > best) return 3;
  const int64_t num_pages = (tokens + page_size - 1) / page_size;
  const int64_t tile_pages = std::max<int64_t>(1, 256 / page_size);  // about 256 keys a tile
  const int64_t tiles = (num_pages + tile_pages - 1) / tile_pages;
  if (num_kv_heads * rows * num_pages == 0) return 0;
  PageSumArgs args{q, keys, shift, out, rows, tokens, head_dim, page_size, num_pages, tile_pages, tiles};
  const int64_t padded = (tile_pages * page_size + 31) / 32 * 32;  // a tile's tokens rounded up to 2W
  pool->run(page_sum_fn(isa), &args, num_kv_heads * tiles, std::max(threads, 1) - 1, (size_t)((head_dim + 4) * padded));
  return 0;
}

// Returns 0 on success; 1 a page index out of range; 2 out of memory; 3 isa not supported here.
// isa: -1 picks the best; 0/1/2/3 force one (tests cover every variant this CPU can run).
OFFLOAD_EXPORT int offload_paged_attention(const float* q, const void* key_pages, const void* value_pages, int kind,
                                           const int64_t* page_table, const int64_t* num_pages, const int64_t* last_page_len,
                                           int64_t bsz, int64_t num_heads, int64_t q_len, int64_t head_dim, int64_t num_kv_heads,
                                           int64_t page_size, int64_t max_pages, int64_t num_pages_total, int causal,
                                           float* page_lse, float* out, float* lse, int64_t heads_per_item, int64_t num_groups,
                                           int64_t num_splits, int threads, int isa, float scale, float softcap) {
  const int best = best_isa();
  if (isa < 0) isa = best;
  if (isa > best) return 3;
  const int64_t rows = bsz * num_heads * num_splits * q_len;
  const IndexFn index = index_fn(isa);
  std::vector<float> part_acc, part_m, part_l, q_stored;
  std::vector<uint16_t> q_bf16;
  std::vector<int64_t> order((size_t)head_dim);  // element d sits at order[d] in q and part_acc
  for (int64_t d = 0; d < head_dim; ++d) order[(size_t)d] = index(d, head_dim, kind);
  try {
    q_stored.resize((size_t)(bsz * num_heads * q_len * head_dim));
    if (isa == 3 && kind == 2 && head_dim % 32 == 0) q_bf16.resize(q_stored.size());
    part_acc.resize((size_t)(rows * head_dim));
    part_m.resize((size_t)rows);
    part_l.resize((size_t)rows);
  } catch (const std::bad_alloc&) {
    return 2;
  }
  for (int64_t r = 0; r < bsz * num_heads * q_len; ++r)
    for (int64_t d = 0; d < head_dim; ++d) q_stored[(size_t)(r * head_dim + order[(size_t)d])] = q[r * head_dim + d] * scale;
  // The bf16 dot-product path needs a query that is exactly bf16 (a bf16 model's query is).
  for (int64_t e = 0; e < (int64_t)q_bf16.size(); ++e) {
    uint32_t bits;
    std::memcpy(&bits, q + e, 4);
    if (bits & 0xffffu) {
      q_bf16.clear();
      break;
    }
    q_bf16[(size_t)e] = (uint16_t)(bits >> 16);
  }
  std::atomic<int> error{0};
  ItemArgs args{q_stored.data(), key_pages, value_pages, kind, page_table, num_pages, last_page_len, num_heads, q_len,
                head_dim, num_kv_heads, page_size, max_pages, num_pages_total, causal, page_lse,
                part_acc.data(), part_m.data(), part_l.data(), heads_per_item, num_groups, num_splits, &error,
                q_bf16.empty() ? nullptr : q_bf16.data(), scale, softcap};
  const ItemFn fn = item_fn(isa);
  const int64_t items = bsz * num_groups * num_splits;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  if (threads < 1) threads = 1;

  pool->run(fn, &args, items, threads - 1, (size_t)(4 * page_size));  // scores / weights of 4 query rows

  // Merge the splits by log-sum-exp (exact); rows that saw no key give 0 and -inf. The weighted
  // sum runs in storage order (contiguous, vectorised), one permutation to element order per row.
  std::vector<float> merged((size_t)head_dim);
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
      float* mg = merged.data();
      std::fill(mg, mg + head_dim, 0.f);
      for (int64_t s = 0; s < num_splits; ++s) {
        const float w = std::exp(part_m[base + s * q_len] - m) / total;
        if (w == 0.f) continue;
        const float* acc = part_acc.data() + (base + s * q_len) * head_dim;
        for (int64_t e = 0; e < head_dim; ++e) mg[e] += w * acc[e];
      }
      for (int64_t d = 0; d < head_dim; ++d) o[d] = mg[order[(size_t)d]];
      lse[bh * q_len + qi] = m + std::log(total);
    }
  }
  return error ? 1 : 0;
}

}  // extern "C"
