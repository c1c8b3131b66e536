// The machinery that every kernel family of the native library shares (linf.cc, bounds.cc,
// lp.cc, lp_decay.cc): vector types and register tiles per instruction set, the tile sweep, the
// thread pool's job loop, zero padding, the redo of non-finite rows, and the leading (vmapped)
// dimensions of the FFI operands.
//
// The reduction axis i is contiguous in x [B, n] and w [out, n], so the kernels vectorise over i
// (VW lanes) and need no transpose. A register tile holds TB input rows x TO weight rows of
// running reductions; weight rows are taken in chunks that fit the L2 cache, and (chunk, row
// group) jobs are spread over XLA's intra-op thread pool. Rows holding a NaN or an infinity are
// redone by scalar code with XLA's semantics (NaN propagates).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Vector width and register tile per instruction set (linf_jax/native/__init__.py passes them
// for each build target): 16 lanes and 4x2 tiles fit AVX-512's 32 registers of 16 floats.
#ifndef LINF_VW
#define LINF_VW 16
#endif
#ifndef LINF_TB
#define LINF_TB 4
#endif
#ifndef LINF_TO
#define LINF_TO 2
#endif
constexpr int VW = LINF_VW;  // lanes per vector
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
constexpr int TB = LINF_TB;  // input rows per register tile
constexpr int TO = LINF_TO;  // weight rows per register tile
constexpr int64_t kScatterRows = 16;  // rows per job of the scatter and sum passes

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf absv(vf v) {
  vi bits = (vi)v & 0x7fffffff;
  return (vf)bits;
}

// Whether every lane of u is below t (false for a NaN lane): the l_p kernels' test for a
// vector of negligible terms (lp.cc). One compare into a lane mask where the instruction set
// has one, else lane by lane.
inline bool all_below(vf u, vf t) {
#if defined(__AVX512F__) && LINF_VW == 16
  return _mm512_cmp_ps_mask((__m512)u, (__m512)t, _CMP_LT_OQ) == 0xFFFF;
#elif defined(__AVX__) && LINF_VW == 8
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)u, (__m256)t, _CMP_LT_OQ)) == 0xFF;
#elif defined(__SSE__) && LINF_VW == 4
  return _mm_movemask_ps(_mm_cmplt_ps((__m128)u, (__m128)t)) == 0xF;
#else
  for (int k = 0; k < VW; ++k)
    if (!(u[k] < t[k])) return false;
  return true;
#endif
}

// Calls f(tb, to, b, o) for the register tiles covering [b0, b1) x [o0, o1): TB x TO tiles and
// 1-wide edges; tb and to are std::integral_constant, so each tile shape is its own inlined
// code. kOutputsOuter sweeps the weight rows in the outer loop (the l_p backward pass, whose
// gw rows then stay put while the input rows stream past).
template <bool kOutputsOuter = false, typename F>
inline void for_tiles(int64_t b0, int64_t b1, int64_t o0, int64_t o1, const F& f) {
  using Full = std::integral_constant<int, kOutputsOuter ? TO : TB>;
  using Edge = std::integral_constant<int, 1>;
  const int64_t a0 = kOutputsOuter ? o0 : b0, a1 = kOutputsOuter ? o1 : b1;
  const int64_t c0 = kOutputsOuter ? b0 : o0, c1 = kOutputsOuter ? b1 : o1;
  auto inner = [&](auto outer_size, int64_t a) {
    using Inner = std::integral_constant<int, kOutputsOuter ? TB : TO>;
    int64_t c = c0;
    auto call = [&](auto inner_size) {
      if constexpr (kOutputsOuter) f(inner_size, outer_size, c, a);
      else f(outer_size, inner_size, a, c);
    };
    for (; c + Inner::value <= c1; c += Inner::value) call(Inner{});
    for (; c < c1; ++c) call(Edge{});
  };
  int64_t a = a0;
  for (; a + Full::value <= a1; a += Full::value) inner(Full{}, a);
  for (; a < a1; ++a) inner(Edge{}, a);
}

inline bool finite_row(const float* r, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(r[i])) return false;
  return true;
}

// Runs fn(job) for job in [0, jobs) on the calling thread and the pool, and waits for the jobs,
// not for the pool tasks: a task that starts late (its threads busy with other programs, e.g.
// other devices' custom calls) finds no job left and returns, so the caller never waits on a
// task that cannot start. The shared state outlives the call for such late tasks.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t jobs, const F& fn) {
  const int64_t workers = std::min<int64_t>(jobs, std::max<int64_t>(1, pool.num_threads()));
  if (workers <= 1) {
    for (int64_t j = 0; j < jobs; ++j) fn(j);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;
  };
  auto shared = std::make_shared<Shared>();
  // fn lives on the caller's stack: tasks touch it only while holding a claimed job, and the
  // caller returns only after every claimed job is done.
  auto work = [shared, jobs, f = &fn]() {
    int64_t finished = 0;
    for (int64_t j = shared->next.fetch_add(1); j < jobs; j = shared->next.fetch_add(1)) {
      (*f)(j);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->done += finished;
      if (shared->done == jobs) shared->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < workers - 1; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == jobs; });
}

// Coordinates zero-padded to whole vectors when n is not a multiple of VW (a copy; exact for
// every reduction here: padded coordinates give 0, which never rises above a maximum that
// starts at 0, nor below a minimum that starts at 0).
const float* padded(const float* a, int64_t rows, int64_t n, int64_t ld, std::vector<float>& buf) {
  if (ld == n) return a;
  buf.assign(rows * ld, 0.f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&buf[r * ld], a + r * n, n * 4);
  return buf.data();
}

// Spreads tile(b0, b1, o0, o1) over the pool: weight rows in chunks of about 256 KiB (a whole
// number of register tiles, so a chunk stays in L2 while row groups stream past it), input rows
// in groups of 64 when there is enough work to balance the threads.
template <typename F>
void run_jobs(ffi::ThreadPool& pool, int64_t B, int64_t out, int64_t ld, const F& tile) {
  int64_t chunk = std::max<int64_t>(TO, (256 * 1024) / (ld * 4));
  chunk = std::min<int64_t>(out, chunk / TO * TO);
  const int64_t n_chunks = (out + chunk - 1) / chunk;
  const int64_t rows = (B * n_chunks >= 64 * TB) ? 64 : TB;
  const int64_t n_rows = (B + rows - 1) / rows;
  parallel_for(pool, n_chunks * n_rows, [&](int64_t job) {
    const int64_t c = job % n_chunks, r = job / n_chunks;
    const int64_t o0 = c * chunk, o1 = std::min(out, o0 + chunk);
    tile(r * rows, std::min(B, (r + 1) * rows), o0, o1);
  });
}

// Calls redo(b, o) for every pair whose input row (any of xs) or weight row is not finite.
template <typename F>
void redo_non_finite(std::initializer_list<const float*> xs, const float* w, int64_t B,
                     int64_t out, int64_t n, const F& redo) {
  std::vector<int64_t> bad_w;
  for (int64_t o = 0; o < out; ++o)
    if (!finite_row(w + o * n, n)) bad_w.push_back(o);
  for (int64_t b = 0; b < B; ++b) {
    bool bad_x = false;
    for (const float* x : xs) bad_x = bad_x || !finite_row(x + b * n, n);
    if (bad_x) {
      for (int64_t o = 0; o < out; ++o) redo(b, o);
    } else {
      for (int64_t o : bad_w) redo(b, o);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Leading (batch) dimensions. Under jax.vmap the calls get the member / group axes as leading
// dimensions (vmap_method='expand_dims': an unbatched operand gets size-1 dimensions there), so
// a K-member ensemble is one call that loops over its members with no copies, instead of K
// calls with slicing and stacking around them. Operands broadcast over size-1 leading dims.
// ---------------------------------------------------------------------------------------------

struct Batch {
  int64_t count = 1;                       // number of [.., ..] problems
  std::vector<std::vector<int64_t>> offs;  // per operand: element offset of each problem
  std::string error;
};

// dims: each operand's full dimensions (rank >= 2; leading dims broadcast); the result's
// leading dims are the elementwise maximum.
Batch batch_of(const std::vector<std::vector<int64_t>>& dims, int64_t rank) {
  Batch bt;
  const int64_t lead = rank - 2;
  std::vector<int64_t> shape(lead, 1);
  for (const auto& d : dims) {
    if ((int64_t)d.size() != rank) {
      bt.error = "operands of different ranks";
      return bt;
    }
    for (int64_t k = 0; k < lead; ++k) {
      if (d[k] != 1 && shape[k] != 1 && d[k] != shape[k]) {
        bt.error = "leading dimensions do not broadcast";
        return bt;
      }
      shape[k] = std::max(shape[k], d[k]);
    }
  }
  for (int64_t k = 0; k < lead; ++k) bt.count *= shape[k];
  for (const auto& d : dims) {
    std::vector<int64_t> stride(lead, 0);
    int64_t s = d[rank - 2] * d[rank - 1];
    for (int64_t k = lead - 1; k >= 0; --k) {
      stride[k] = d[k] == 1 ? 0 : s;
      s *= d[k];
    }
    std::vector<int64_t> off(bt.count, 0);
    for (int64_t i = 0; i < bt.count; ++i) {
      int64_t rest = i, o = 0;
      for (int64_t k = lead - 1; k >= 0; --k) {
        o += (rest % shape[k]) * stride[k];
        rest /= shape[k];
      }
      off[i] = o;
    }
    bt.offs.push_back(std::move(off));
  }
  return bt;
}

template <typename Buf>
std::vector<int64_t> dims_of(const Buf& b) {
  auto d = b.dimensions();
  return std::vector<int64_t>(d.begin(), d.end());
}

}  // namespace
