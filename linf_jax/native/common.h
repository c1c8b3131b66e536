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

// tau = delta^(1/e) with delta = 2^-24 / n: in a sum of n terms t^e (t <= 1) that is >= 1, a
// term with t < tau is negligible (below float32's resolution of the sum, all n together; the
// l_p kernels, lp.cc and lp_decay.cc); 0 (nothing negligible) for e <= 0 or a non-finite e.
inline float negligible_below(float e, int64_t n) {
  if (!(e > 0.f) || !std::isfinite(e) || n <= 0) return 0.f;
  return static_cast<float>(std::exp2((-24.0 - std::log2(static_cast<double>(n))) / e));
}

// Lane mask of the lanes of u that are not below t (bit k for lane k; NaN lanes included): the
// l_p kernels' terms that are not negligible (lp.cc).
inline uint32_t lanes_not_below(vf u, vf t) {
#if defined(__AVX512F__) && LINF_VW == 16
  return _mm512_cmp_ps_mask((__m512)u, (__m512)t, _CMP_NLT_UQ);
#elif defined(__AVX__) && LINF_VW == 8
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)u, (__m256)t, _CMP_NLT_UQ));
#elif defined(__SSE__) && LINF_VW == 4
  return _mm_movemask_ps(_mm_cmpnlt_ps((__m128)u, (__m128)t));
#else
  uint32_t m = 0;
  for (int k = 0; k < VW; ++k) m |= (uint32_t)!(u[k] < t[k]) << k;
  return m;
#endif
}

#if defined(__AVX2__) && LINF_VW == 8
// Per 8-bit lane mask, 3 bits per lane: pack, the lanes it selects in order (the permutation
// that moves them to the front); expand, for each lane, how many selected lanes precede it
// (the permutation that moves them back). AVX2 has no compress or expand instruction.
struct LaneTables {
  uint32_t pack[256], expand[256];
  constexpr LaneTables() : pack(), expand() {
    for (int m = 0; m < 256; ++m) {
      uint32_t v = 0, e = 0;
      int k = 0;
      for (int l = 0; l < 8; ++l) {
        e |= (uint32_t)k << (3 * l);
        if (m >> l & 1) v |= (uint32_t)l << (3 * k++);
      }
      pack[m] = v;
      expand[m] = e;
    }
  }
};
constexpr LaneTables kLanes{};

inline __m256i lane_permutation(uint32_t packed) {
  const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)packed), shifts),
                          _mm256_set1_epi32(7));
}
#endif

// Stores the lanes of v that mask selects, in lane order, at dst and returns how many: dst must
// have room for VW values (the rest of them are overwritten with junk). AVX-512: one compress in
// a register and a full store (the compressing store to memory is far slower on AMD CPUs); AVX2:
// a permutation from a table; else lane by lane, without branches.
template <typename V, typename T>
inline int pack_lanes(T* dst, V v, uint32_t mask) {
  static_assert(sizeof(T) == 4 && sizeof(V) == VW * 4, "32-bit lanes");
#if defined(__AVX512F__) && LINF_VW == 16
  _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32((__mmask16)mask, (__m512i)v));
  return __builtin_popcount(mask);
#elif defined(__AVX2__) && LINF_VW == 8
  _mm256_storeu_si256((__m256i*)dst, _mm256_permutevar8x32_epi32(
                                         (__m256i)v, lane_permutation(kLanes.pack[mask])));
  return __builtin_popcount(mask);
#else
  int n = 0;
  for (int k = 0; k < VW; ++k) {
    std::memcpy(dst + n, (const char*)&v + 4 * k, 4);
    n += (mask >> k) & 1;
  }
  return n;
#endif
}

// Whether pack_lanes and expand_lanes are a few instructions (AVX-512, AVX2) rather than lane by
// lane.
#if (defined(__AVX512F__) && LINF_VW == 16) || (defined(__AVX2__) && LINF_VW == 8)
constexpr bool kLaneInstructions = true;
#else
constexpr bool kLaneInstructions = false;
#endif

// The inverse of pack_lanes: the first popcount(mask) values at src, in order, into the lanes
// that mask selects, 0 in the others (reads VW values at src).
inline vf expand_lanes(const float* src, uint32_t mask) {
#if defined(__AVX512F__) && LINF_VW == 16
  return (vf)_mm512_maskz_expand_ps((__mmask16)mask, _mm512_loadu_ps(src));
#elif defined(__AVX2__) && LINF_VW == 8
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)mask), bit), bit);
  const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src),
                                            lane_permutation(kLanes.expand[mask]));
  return (vf)_mm256_and_ps(v, _mm256_castsi256_ps(on));
#else
  vf v;
  int n = 0;
  for (int k = 0; k < VW; ++k) {
    const int on = mask >> k & 1;
    v[k] = on ? src[n] : 0.f;
    n += on;
  }
  return v;
#endif
}

// One lane mask per vector, as stored by the l_p kernels: 16 bits for 16 lanes, else 8.
#if LINF_VW == 16
typedef uint16_t lane_mask;
#else
typedef uint8_t lane_mask;
#endif
constexpr int64_t kMaskRun = 32;  // masks scanned at once by for_each_hit

// *dst = lanes_not_below(u, t); on AVX-512 straight from the mask register to memory.
inline void store_lanes_not_below(lane_mask* dst, vf u, vf t) {
#if defined(__AVX512F__) && LINF_VW == 16
  _store_mask16((__mmask16*)dst, _mm512_cmp_ps_mask((__m512)u, (__m512)t, _CMP_NLT_UQ));
#else
  *dst = (lane_mask)lanes_not_below(u, t);
#endif
}

// Bit k set where m[k] != 0, for k < kMaskRun (reads m[0, kMaskRun)).
inline uint32_t nonzero_masks(const lane_mask* m) {
#if defined(__AVX512BW__) && LINF_VW == 16
  const __m512i v = _mm512_loadu_si512(m);
  return _mm512_test_epi16_mask(v, v);
#elif defined(__AVX2__) && LINF_VW != 16
  const __m256i v = _mm256_loadu_si256((const __m256i*)m);
  return ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256()));
#elif defined(__SSE2__) && LINF_VW != 16
  const __m128i z = _mm_setzero_si128();
  const uint32_t lo = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i*)m), z));
  const uint32_t hi =
      _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i*)(m + 16)), z));
  return ~(lo | hi << 16);
#else
  uint32_t bits = 0;
  for (int k = 0; k < kMaskRun; ++k) bits |= (uint32_t)(m[k] != 0) << k;
  return bits;
#endif
}

// Calls f(k) for each k in [0, count) with m[k] != 0, in increasing order. m must be readable up
// to count rounded up to kMaskRun (what lies beyond count is ignored).
template <typename F>
inline void for_each_hit(const lane_mask* m, int64_t count, const F& f) {
  for (int64_t k0 = 0; k0 < count; k0 += kMaskRun) {
    uint32_t bits = nonzero_masks(m + k0);
    if (count - k0 < kMaskRun) bits &= (1u << (count - k0)) - 1;
    for (; bits; bits &= bits - 1) f(k0 + __builtin_ctz(bits));
  }
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
