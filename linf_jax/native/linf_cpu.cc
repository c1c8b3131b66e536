// Native CPU kernels for linf_jax.ops (XLA FFI custom calls), built on first use by
// linf_jax/native/__init__.py with the machine's C++ compiler (-O3 and the -march of the chosen
// instruction set). The method they serve: docs/METHOD.md §2 (distances), §3.2 (bounds), §6
// (weight decay).
//
// LinfDistFwd: y[b, o] = max_i |x[b, i] - w[o, i]|, the first arg-max i* (int32) and
//              sign(x[b, i*] - w[o, i*]) (int8), the residuals of the backward pass
// LinfDistMax: y only (evaluation: nothing to differentiate)
// LinfDistBwd: gx[b, i*] += g[b, o] s[b, o], gw[o, i*] -= g[b, o] s[b, o] (two scatter-adds)
// LinfBounds:  the exact interval (lo, hi) of ||z - w[o]||_inf over the box lower <= z <= upper
// LpSum:       s[b, o] = sum_i (|x[b, i] - w[o, i]| / m[b, o])^p, the sum pass of the stable l_p
// LpBwd:       the analytic l_p backward pass, (gx, gw)
// LpDecay:     the direction of the optimiser's l_p weight decay, (|w|/||w||_p)^(p-2) w per row
// All take leading (vmapped) dimensions; see "Leading (batch) dimensions" below.
//
// Why a custom call: XLA's CPU backend compiles the running max and the running arg-max as two
// sibling loop fusions that each recompute |x - w| (BENCHMARKS.md), so there the arg-max costs
// about as much as the forward pass itself. Here one register-tiled loop keeps both.
//
// Design. The reduction axis i is contiguous in x [B, n] and w [out, n], so the kernel vectorises
// over i (VW lanes) and needs no transpose. A register tile of TB input rows x TO weight rows
// keeps, per pair, a vector of running maxima and a vector of the block numbers where each lane
// last rose (strict >, so the first maximum wins); the final horizontal step picks the largest
// lane and, on ties, the smallest coordinate. Weight rows are taken in chunks that fit the L2
// cache, and (chunk, row group) jobs are spread over XLA's intra-op thread pool. Rows holding a
// NaN or an infinity are redone by a scalar loop with XLA's semantics (NaN propagates).
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

inline int8_t sign_of(float d) { return (int8_t)((d > 0.f) - (d < 0.f)); }

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

// Horizontal step: the maximum over lanes, and the smallest coordinate (block * VW + lane)
// among the lanes that hold it.
inline void finish(const vf& m, const vi& blk, const float* x, const float* w, float* y,
                   int32_t* idx, int8_t* sgn) {
  float best = m[0];
  for (int l = 1; l < VW; ++l) best = m[l] > best ? m[l] : best;
  if (idx) {
    int32_t first = INT32_MAX;
    for (int l = 0; l < VW; ++l) {
      int32_t c = blk[l] * VW + l;
      if (m[l] == best && c < first) first = c;
    }
    *idx = first;
    *sgn = sign_of(x[first] - w[first]);
  }
  *y = best;
}

// One tile of tb x to pairs (tb <= TB, to <= TO), coordinates [0, nv * VW).
template <bool kIndex, int tb, int to>
inline void tile(const float* x, const float* w, int64_t ld, int64_t nv, float* y,
                 int32_t* idx, int8_t* sgn, int64_t ldy) {
  vf m[tb][to];
  vi blk[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      m[r][c] = vf{};
      blk[r][c] = vi{};
    }
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    const vi cur = vi{} + (int32_t)v;
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(x + r * ld + v * VW);
      for (int c = 0; c < to; ++c) {
        const vf a = absv(xv - wv[c]);
        if (kIndex) {
          const vi up = a > m[r][c];
          m[r][c] = up ? a : m[r][c];
          blk[r][c] = up ? cur : blk[r][c];
        } else {
          m[r][c] = a > m[r][c] ? a : m[r][c];
        }
      }
    }
  }
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c)
      finish(m[r][c], blk[r][c], x + r * ld, w + c * ld, y + r * ldy + c,
             kIndex ? idx + r * ldy + c : nullptr, kIndex ? sgn + r * ldy + c : nullptr);
}

// Scalar pair with XLA's semantics: NaN propagates (and is reported at its first coordinate).
inline void scalar_pair(const float* x, const float* w, int64_t n, float* y, int32_t* idx,
                        int8_t* sgn) {
  float m = 0.f;
  int32_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i] - w[i]);
    if (std::isnan(a)) {
      m = a;
      k = (int32_t)i;
      break;
    }
    if (a > m) {
      m = a;
      k = (int32_t)i;
    }
  }
  *y = m;
  if (idx) {
    *idx = k;
    *sgn = sign_of(x[k] - w[k]);
  }
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

// One [B, n] x [out, n] problem.
template <bool kIndex>
void linf_matrix(ffi::ThreadPool& pool, const float* x0, const float* w0, int64_t B, int64_t out,
                 int64_t n, float* y, int32_t* idx, int8_t* sgn) {
  if (B == 0 || out == 0) return;
  if (n == 0) {
    std::fill(y, y + B * out, 0.f);
    if (kIndex) std::fill(idx, idx + B * out, 0);
    if (kIndex) std::fill(sgn, sgn + B * out, 0);
    return;
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> xbuf, wbuf;
  const float* x = padded(x0, B, n, ld, xbuf);
  const float* w = padded(w0, out, n, ld, wbuf);
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    for_tiles(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
      const int64_t at = b * out + o;
      tile<kIndex, tb, to>(x + b * ld, w + o * ld, ld, nv, y + at, kIndex ? idx + at : nullptr,
                           kIndex ? sgn + at : nullptr, out);
    });
  });
  // Non-finite rows: redo their pairs with the scalar loop (NaN propagates as in XLA).
  redo_non_finite({x0}, w0, B, out, n, [&](int64_t b, int64_t o) {
    scalar_pair(x0 + b * n, w0 + o * n, n, y + b * out + o,
                kIndex ? idx + b * out + o : nullptr, kIndex ? sgn + b * out + o : nullptr);
  });
}

// ---------------------------------------------------------------------------------------------
// Interval bounds: for z in the box [l, u], per coordinate min |z - w| = max(l - w, w - u, 0) and
// max |z - w| = max(u - w, w - l). With d1 = u - w and d2 = w - l (l - w = -d2 and w - u = -d1
// exactly in IEEE arithmetic): hi = max_i max(d1, d2), lo = -min(0, min_i min(d1, d2)), the same
// values as the XLA code of ops/xla.py.
// ---------------------------------------------------------------------------------------------

template <int tb, int to>
inline void bounds_tile(const float* l, const float* u, const float* w, int64_t ld, int64_t nv,
                        float* lo, float* hi, int64_t ldy) {
  vf h[tb][to], nl[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) h[r][c] = nl[r][c] = vf{};
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      const vf lv = loadv(l + r * ld + v * VW), uv = loadv(u + r * ld + v * VW);
      for (int c = 0; c < to; ++c) {
        const vf d1 = uv - wv[c], d2 = wv[c] - lv;
        const vf mx = d1 > d2 ? d1 : d2, mn = d1 < d2 ? d1 : d2;
        h[r][c] = mx > h[r][c] ? mx : h[r][c];
        nl[r][c] = mn < nl[r][c] ? mn : nl[r][c];
      }
    }
  }
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      float a = h[r][c][0], b = nl[r][c][0];
      for (int k = 1; k < VW; ++k) {
        a = h[r][c][k] > a ? h[r][c][k] : a;
        b = nl[r][c][k] < b ? nl[r][c][k] : b;
      }
      hi[r * ldy + c] = a;
      lo[r * ldy + c] = 0.f - b;  // +0, not -0, where the box reaches w
    }
}

// XLA's maximum: NaN if either operand is NaN.
inline float nan_max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? NAN : (a > b ? a : b);
}

// One [B, n] box x [out, n] problem.
void bounds_matrix(ffi::ThreadPool& pool, const float* l0, const float* u0, const float* w0,
                   int64_t B, int64_t out, int64_t n, float* lo, float* hi) {
  if (B == 0 || out == 0) return;
  if (n == 0) {
    std::fill(lo, lo + B * out, 0.f);
    std::fill(hi, hi + B * out, 0.f);
    return;
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> lbuf, ubuf, wbuf;
  const float* l = padded(l0, B, n, ld, lbuf);
  const float* u = padded(u0, B, n, ld, ubuf);
  const float* w = padded(w0, out, n, ld, wbuf);
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    for_tiles(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
      bounds_tile<tb, to>(l + b * ld, u + b * ld, w + o * ld, ld, nv, lo + b * out + o,
                          hi + b * out + o, out);
    });
  });
  redo_non_finite({l0, u0}, w0, B, out, n, [&](int64_t b, int64_t o) {
    float a = 0.f, c = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float li = l0[b * n + i], ui = u0[b * n + i], wi = w0[o * n + i];
      a = nan_max(a, nan_max(li - wi, wi - ui));
      c = nan_max(c, nan_max(ui - wi, wi - li));
    }
    lo[b * out + o] = a;
    hi[b * out + o] = c;
  });
}

// One backward problem: gx [B, n], gw [out, n] from the [B, out] residuals and cotangent.
void bwd_matrix(ffi::ThreadPool& pool, const int32_t* idx, const int8_t* sgn, const float* g,
                int64_t B, int64_t out, int64_t n, float* gx, float* gw) {
  if (n == 0) return;  // gx, gw have no elements
  // gx: each job owns whole input rows; gw: each job owns whole weight rows. Both read the
  // [B, out] residuals row by row, in a fixed order (deterministic sums).
  parallel_for(pool, (B + kScatterRows - 1) / kScatterRows, [&](int64_t job) {
    const int64_t b1 = std::min(B, (job + 1) * kScatterRows);
    for (int64_t b = job * kScatterRows; b < b1; ++b) {
      float* row = gx + b * n;
      std::fill(row, row + n, 0.f);
      for (int64_t o = 0; o < out; ++o) row[idx[b * out + o]] += g[b * out + o] * sgn[b * out + o];
    }
  });
  parallel_for(pool, (out + kScatterRows - 1) / kScatterRows, [&](int64_t job) {
    const int64_t o0 = job * kScatterRows, o1 = std::min(out, o0 + kScatterRows);
    std::fill(gw + o0 * n, gw + o1 * n, 0.f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = o0; o < o1; ++o)
        gw[o * n + idx[b * out + o]] -= g[b * out + o] * sgn[b * out + o];
  });
}

// ---------------------------------------------------------------------------------------------
// l_p, finite p: the sum pass of the stable form and the analytic backward pass.
//   s[b, o]  = sum_i (|d_i| / m[b, o])^p                    (y = m s^(1/p), computed in JAX)
//   G        = sign(d_i) max(|d_i| / y, 1e-30)^(p-1) g[b, o]
//   gx[b, i] = sum_o G,   gw[o, i] = -sum_b G
// Powers: K >= 1 is an integer p by repeated squaring (p = 8: t^8 in the sum, t^7 in the
// backward pass); K = -1 is 2^(p log2 t) with the vector exp2/log2 below (polynomials fitted
// for float32, about 1 ulp, and cheaper than a general-purpose exp/log).
// ---------------------------------------------------------------------------------------------

// 2^x: x = n + f with n = round(x), f in [-0.5, 0.5]; 2^f by a degree-5 polynomial (a
// Chebyshev fit, 1.1e-7 relative error), 2^n put into the exponent field. 0 below -126 (the
// smallest normal; XLA flushes too), x clamped at 127.9 (t^e <= 1 wherever it is used here).
inline vf vexp2(vf x) {
  x = x < 127.9f ? x : vf{} + 127.9f;
  const vi under = x < -126.f;
  x = under ? vf{} : x;
  const vf magic = vf{} + 12582912.f;  // 1.5 * 2^23: (x + magic) - magic rounds to an integer
  const vf n = (x + magic) - magic;
  const vf f = x - n;
  vf y = vf{} + 1.3400432165e-3f;
  y = y * f + 9.6760370979e-3f;
  y = y * f + 5.5503272142e-2f;
  y = y * f + 2.4022107356e-1f;
  y = y * f + 6.9314720671e-1f;
  y = y * f + 1.0000000755f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  y = y * (vf)e;
  return under ? vf{} : y;
}

// log2(x) for normal x > 0 (the callers clamp to >= 1e-30): x = 2^e m with m in [sqrt(1/2),
// sqrt(2)), log2(m) = f P(f) with f = m - 1 and P a degree-8 Chebyshev fit (1.8e-8 absolute
// error, below float32's own rounding of the result).
inline vf vlog2(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 127;
  vf m = (vf)((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const vi big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const vf f = m - 1.f;
  vf y = vf{} + 1.2614846620e-1f;
  y = y * f - 2.0742103504e-1f;
  y = y * f + 2.1566985897e-1f;
  y = y * f - 2.3892033982e-1f;
  y = y * f + 2.8791832448e-1f;
  y = y * f - 3.6070482810e-1f;
  y = y * f + 4.8091060994e-1f;
  y = y * f - 7.2134733336e-1f;
  y = y * f + 1.4426950038f;
  return y * f + __builtin_convertvector(e, vf);
}

// t^K for t >= 0: K >= 0 an integer power by repeated squaring (the order of ops/xla.py's
// _int_pow); K = -1: 2^(e log2 t), 0 at t = 0.
template <int K>
inline vf vpow(vf t, float e) {
  if constexpr (K < 0) {
    const vi pos = t > 0.f;
    const vf r = vexp2(e * vlog2(pos ? t : vf{} + 1.f));
    return pos ? r : vf{};
  } else if constexpr (K == 0) {
    return vf{} + 1.f;
  } else {
    vf result{}, base = t;
    bool have = false;
    int k = K;
    while (k) {
      if (k & 1) {
        result = have ? result * base : base;
        have = true;
      }
      k >>= 1;
      if (k) base = base * base;
    }
    return result;
  }
}

// Sum pass: one register tile of tb x to pairs.
template <int K, int tb, int to>
inline void lp_sum_tile(const float* x, const float* w, int64_t ld, int64_t nv, const float* im,
                        float* s, int64_t ldy, float p) {
  vf acc[tb][to], scale[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      acc[r][c] = vf{};
      scale[r][c] = vf{} + im[r * ldy + c];
    }
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(x + r * ld + v * VW);
      for (int c = 0; c < to; ++c)
        acc[r][c] += vpow<K>(absv(xv - wv[c]) * scale[r][c], p);
    }
  }
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      float t = 0.f;
      for (int k = 0; k < VW; ++k) t += acc[r][c][k];
      s[r * ldy + c] = t;
    }
}

template <int K>
void lp_sum_matrix(ffi::ThreadPool& pool, const float* x0, const float* w0, const float* im,
                   int64_t B, int64_t out, int64_t n, float p, float* s) {
  if (B == 0 || out == 0) return;
  if (n == 0) {
    std::fill(s, s + B * out, 0.f);
    return;
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> xbuf, wbuf;
  const float* x = padded(x0, B, n, ld, xbuf);
  const float* w = padded(w0, out, n, ld, wbuf);
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    for_tiles(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
      lp_sum_tile<K, tb, to>(x + b * ld, w + o * ld, ld, nv, im + b * out + o, s + b * out + o,
                             out, p);
    });
  });
}

// Backward pass. Output rows are split into kParts fixed parts (whole weight rows each, so
// gw is written by one part only); each part sums its gx terms into its own [B, n] buffer and
// the buffers are added in a fixed order: deterministic whatever thread runs which part.
// Inputs are taken in blocks of kIBlock coordinates, so that a part's x and gx blocks stay in
// cache while it sweeps its weight rows.
constexpr int kIBlock = 256;

template <int K, int tb, int to>
inline void lp_bwd_tile(const float* x, const float* w, const float* iy, const float* g,
                        int64_t ldy, int64_t v0, int64_t v1, float pm1, float* gx, float* gw,
                        int64_t ld) {
  float sc[tb][to], gg[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      sc[r][c] = iy[r * ldy + c];
      gg[r][c] = g[r * ldy + c];
    }
  for (int64_t v = v0; v < v1; ++v) {
    vf wv[to], gwv[to];
    for (int c = 0; c < to; ++c) {
      wv[c] = loadv(w + c * ld + v * VW);
      gwv[c] = vf{};
    }
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(x + r * ld + v * VW);
      vf gxv = vf{};
      for (int c = 0; c < to; ++c) {
        const vf d = xv - wv[c];
        vf t = absv(d) * sc[r][c];
        t = t > 1e-30f ? t : vf{} + 1e-30f;
        vf G = vpow<(K < 0 ? -1 : K - 1)>(t, pm1) * gg[r][c];
        // sign(d) * G: 0 where d == 0, the sign bit of d otherwise
        const vi nz = d != 0.f;
        G = (vf)(((vi)G ^ ((vi)d & (int32_t)0x80000000)) & nz);
        gxv += G;
        gwv[c] -= G;
      }
      vf cur = loadv(gx + r * ld + v * VW);
      cur += gxv;
      std::memcpy(gx + r * ld + v * VW, &cur, sizeof(cur));
    }
    for (int c = 0; c < to; ++c) {
      vf cur = loadv(gw + c * ld + v * VW);
      cur += gwv[c];
      std::memcpy(gw + c * ld + v * VW, &cur, sizeof(cur));
    }
  }
}

constexpr int64_t kParts = 4;

template <int K>
void lp_bwd_matrix(ffi::ThreadPool& pool, const float* x0, const float* w0, const float* iy,
                   const float* g, int64_t B, int64_t out, int64_t n, float p, float* gx_out,
                   float* gw_out) {
  if (n == 0) return;
  if (B == 0 || out == 0) {
    std::fill(gx_out, gx_out + B * n, 0.f);
    std::fill(gw_out, gw_out + out * n, 0.f);
    return;
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> xbuf, wbuf;
  const float* x = padded(x0, B, n, ld, xbuf);
  const float* w = padded(w0, out, n, ld, wbuf);
  const int64_t parts = std::min<int64_t>(kParts, (out + TO - 1) / TO);
  const int64_t per = ((out + parts - 1) / parts + TO - 1) / TO * TO;  // rows per part
  // gw is accumulated in place when its rows need no padding (each part owns its rows).
  std::vector<float> gx(parts * B * ld, 0.f), gw_pad;
  float* gwp = gw_out;
  if (ld == n) {
    std::fill(gw_out, gw_out + out * n, 0.f);
  } else {
    gw_pad.assign(out * ld, 0.f);
    gwp = gw_pad.data();
  }
  const int64_t vb = kIBlock / VW;
  const float pm1 = p - 1.f;
  parallel_for(pool, parts, [&](int64_t part) {
    const int64_t o0 = std::min(out, part * per), o1 = std::min(out, o0 + per);
    float* gxp = gx.data() + part * B * ld;
    for (int64_t v0 = 0; v0 < nv; v0 += vb) {
      const int64_t v1 = std::min(nv, v0 + vb);
      for_tiles<true>(0, B, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
        lp_bwd_tile<K, tb, to>(x + b * ld, w + o * ld, iy + b * out + o, g + b * out + o, out,
                               v0, v1, pm1, gxp + b * ld, gwp + o * ld, ld);
      });
    }
  });
  // gx = sum of the parts in order; gw copied out of its padded rows.
  parallel_for(pool, (B + kScatterRows - 1) / kScatterRows, [&](int64_t job) {
    const int64_t b1 = std::min(B, (job + 1) * kScatterRows);
    for (int64_t b = job * kScatterRows; b < b1; ++b)
      for (int64_t i = 0; i < n; ++i) {
        float t = gx[b * ld + i];
        for (int64_t q = 1; q < parts; ++q) t += gx[q * B * ld + b * ld + i];
        gx_out[b * n + i] = t;
      }
  });
  if (ld != n)
    for (int64_t o = 0; o < out; ++o) std::memcpy(gw_out + o * n, gwp + o * ld, n * 4);
}

// ---------------------------------------------------------------------------------------------
// LpDecay: the direction of the optimiser's l_p weight decay, row by row (one row per output
// neuron), the gradient of 1/2 ||w_o||_p^2:
//   d[o, i] = (|w_oi| / ||w_o||_p)^(p-2) w_oi = t_i s^(-(p-2)/p) w_oi,
//   u_i = |w_oi| / m, m = max_i |w_oi|, t_i = u_i^(p-2), s = max(sum_i t_i u_i^2, 1)
// and at p = inf w_oi where |w_oi| = m > 0 (0 elsewhere). One read of w and one write of d: a row
// (a few KiB) stays in L1 over the three passes (max, sum, scale), and t is kept in the output
// row between them, so each exp/log is done once. K >= 0: p - 2 as an integer (repeated
// squaring); K = -1: the p of the operand (exp/log, or the select at p = inf). Rows holding a
// NaN or an infinity take the same formula in scalar code (NaN propagates as in XLA's version).
// ---------------------------------------------------------------------------------------------

template <int K>
void decay_row_scalar(const float* w, int64_t n, float p, float* d) {
  float m = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= std::isnan(w[i]);
    m = std::max(m, std::fabs(w[i]));
  }
  if (nan) m = NAN;
  if (K < 0 && std::isinf(p)) {
    for (int64_t i = 0; i < n; ++i) d[i] = (std::fabs(w[i]) == m && m > 0.f) ? w[i] : 0.f;
    return;
  }
  const float scale = m > 0.f ? m : 1.f;
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float u = std::fabs(w[i]) / scale;
    const float t = K >= 0 ? std::pow(u, (float)K) : (u > 0.f ? std::exp((p - 2.f) * std::log(u)) : 0.f);
    d[i] = t;
    s += t * u * u;
  }
  const float f = std::exp(-(p - 2.f) / p * std::log(std::max(s, 1.f)));
  for (int64_t i = 0; i < n; ++i) d[i] = d[i] * f * w[i];
}

template <int K>
void decay_row(const float* w, int64_t n, float p, float* d, float* row /* ld floats */) {
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::memcpy(row, w, n * 4);
  std::fill(row + n, row + ld, 0.f);  // padding: u = 0 adds nothing to the max or the sum
  vf mv{};
  vi finite = vi{} - 1;
  for (int64_t v = 0; v < nv; ++v) {
    const vf a = absv(loadv(row + v * VW));
    finite &= a < INFINITY;  // false for inf and NaN
    mv = a > mv ? a : mv;
  }
  bool ok = true;
  float m = 0.f;
  for (int l = 0; l < VW; ++l) {
    ok &= finite[l] != 0;
    m = std::max(m, mv[l]);
  }
  if (!ok) return decay_row_scalar<K>(w, n, p, d);
  if (m == 0.f) {  // a zero row decays by 0 (every t u^2 and w is 0)
    std::fill(d, d + n, 0.f);
    return;
  }
  if (K < 0 && std::isinf(p)) {
    for (int64_t i = 0; i < n; ++i) d[i] = std::fabs(w[i]) == m ? w[i] : 0.f;
    return;
  }
  // t into the (padded) row buffer, its sum, then d = t f w
  const float inv = 1.f / m;
  vf acc{};
  for (int64_t v = 0; v < nv; ++v) {
    const vf u = absv(loadv(row + v * VW)) * inv;
    const vf t = vpow<K>(u, p - 2.f);
    acc += t * u * u;
    std::memcpy(row + v * VW, &t, sizeof(t));
  }
  float s = 0.f;
  for (int l = 0; l < VW; ++l) s += acc[l];
  const float f = std::exp(-(p - 2.f) / p * std::log(std::max(s, 1.f)));
  for (int64_t i = 0; i < n; ++i) d[i] = row[i] * f * w[i];
}

template <int K>
void decay_matrix(ffi::ThreadPool& pool, const float* w, int64_t out, int64_t n, float p,
                  float* d) {
  if (out == 0 || n == 0) return;
  const int64_t ld = (n + VW - 1) / VW * VW;
  const int64_t rows = std::max<int64_t>(1, (64 * 1024) / (ld * 4));  // about 64 KiB per job
  parallel_for(pool, (out + rows - 1) / rows, [&](int64_t job) {
    std::vector<float> row(ld);
    const int64_t o1 = std::min(out, (job + 1) * rows);
    for (int64_t o = job * rows; o < o1; ++o) decay_row<K>(w + o * n, n, p, d + o * n, row.data());
  });
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

// x [..., B, n], w [..., out, n] -> y (and idx, sign) [..., B, out].
template <bool kIndex>
ffi::Error linf_call(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
                     ffi::ResultBuffer<ffi::F32>& y, int32_t* idx, int8_t* sgn) {
  const auto xd = dims_of(x), wd = dims_of(w), yd = dims_of(*y);
  const int64_t r = yd.size();
  if (r < 2 || xd.size() != yd.size() || wd.size() != yd.size() || xd[r - 1] != wd[r - 1])
    return ffi::Error::InvalidArgument("linf_dist: expected x [..., B, n] and w [..., out, n]");
  const Batch bt = batch_of({xd, wd, yd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("linf_dist: " + bt.error);
  const int64_t B = xd[r - 2], out = wd[r - 2], n = xd[r - 1];
  for (int64_t k = 0; k < bt.count; ++k) {
    const int64_t yo = bt.offs[2][k];
    linf_matrix<kIndex>(pool, x.typed_data() + bt.offs[0][k], w.typed_data() + bt.offs[1][k], B,
                        out, n, y->typed_data() + yo, kIndex ? idx + yo : nullptr,
                        kIndex ? sgn + yo : nullptr);
  }
  return ffi::Error::Success();
}

ffi::Error LinfDistFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S32> idx,
                           ffi::ResultBuffer<ffi::S8> sgn) {
  return linf_call<true>(pool, x, w, y, idx->typed_data(), sgn->typed_data());
}

ffi::Error LinfDistMaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  return linf_call<false>(pool, x, w, y, nullptr, nullptr);
}

// idx, sign, g [..., B, out] -> gx [..., B, n], gw [..., out, n].
ffi::Error LinfDistBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx,
                           ffi::Buffer<ffi::S8> sgn, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gw) {
  const auto id = dims_of(idx), sd = dims_of(sgn), gd = dims_of(g);
  const auto xd = dims_of(*gx), wd = dims_of(*gw);
  const int64_t r = xd.size();
  if (r < 2 || id.size() != xd.size() || sd != id || gd.size() != xd.size() ||
      wd.size() != xd.size() || id[r - 2] != xd[r - 2] || id[r - 1] != wd[r - 2] ||
      gd[r - 2] != xd[r - 2] || gd[r - 1] != wd[r - 2] || xd[r - 1] != wd[r - 1])
    return ffi::Error::InvalidArgument("linf_dist backward: inconsistent shapes");
  const Batch bt = batch_of({id, gd, xd, wd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("linf_dist backward: " + bt.error);
  for (int64_t k = 0; k < bt.count; ++k)
    bwd_matrix(pool, idx.typed_data() + bt.offs[0][k], sgn.typed_data() + bt.offs[0][k],
               g.typed_data() + bt.offs[1][k], xd[r - 2], wd[r - 2], xd[r - 1],
               gx->typed_data() + bt.offs[2][k], gw->typed_data() + bt.offs[3][k]);
  return ffi::Error::Success();
}

// lower, upper [..., B, n], w [..., out, n] -> lo, hi [..., B, out].
ffi::Error LinfBoundsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> l, ffi::Buffer<ffi::F32> u,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> lo,
                          ffi::ResultBuffer<ffi::F32> hi) {
  const auto ld = dims_of(l), ud = dims_of(u), wd = dims_of(w), yd = dims_of(*lo);
  const int64_t r = yd.size();
  if (r < 2 || ld.size() != yd.size() || ud.size() != yd.size() || wd.size() != yd.size() ||
      ld[r - 2] != ud[r - 2] || ld[r - 1] != ud[r - 1] || ld[r - 1] != wd[r - 1])
    return ffi::Error::InvalidArgument(
        "linf_dist_bounds: expected lower, upper [..., B, n] and w [..., out, n]");
  const Batch bt = batch_of({ld, ud, wd, yd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("linf_dist_bounds: " + bt.error);
  for (int64_t k = 0; k < bt.count; ++k)
    bounds_matrix(pool, l.typed_data() + bt.offs[0][k], u.typed_data() + bt.offs[1][k],
                  w.typed_data() + bt.offs[2][k], ld[r - 2], wd[r - 2], ld[r - 1],
                  lo->typed_data() + bt.offs[3][k], hi->typed_data() + bt.offs[3][k]);
  return ffi::Error::Success();
}

template <typename F>
ffi::Error dispatch_k(int32_t k, const F& f) {
  switch (k) {
    case -1: f(std::integral_constant<int, -1>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: return ffi::Error::InvalidArgument("lp_dist: k must be -1 (general p) or 1..8");
  }
  return ffi::Error::Success();
}

// x [..., B, n], w [..., out, n], inv_m [..., B, out], p [..., 1, 1] -> s [..., B, out].
ffi::Error LpSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> im, ffi::Buffer<ffi::F32> p,
                     ffi::ResultBuffer<ffi::F32> s, int32_t k) {
  const auto xd = dims_of(x), wd = dims_of(w), md = dims_of(im), pd = dims_of(p),
             sd = dims_of(*s);
  const int64_t r = sd.size();
  if (r < 2 || xd.size() != sd.size() || wd.size() != sd.size() || md != sd ||
      pd.size() != sd.size() || pd[r - 1] != 1 || pd[r - 2] != 1 || xd[r - 1] != wd[r - 1])
    return ffi::Error::InvalidArgument("lp_dist: inconsistent shapes");
  const Batch bt = batch_of({xd, wd, md, pd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("lp_dist: " + bt.error);
  return dispatch_k(k, [&](auto kk) {
    for (int64_t i = 0; i < bt.count; ++i)
      lp_sum_matrix<decltype(kk)::value>(
          pool, x.typed_data() + bt.offs[0][i], w.typed_data() + bt.offs[1][i],
          im.typed_data() + bt.offs[2][i], xd[r - 2], wd[r - 2], xd[r - 1],
          p.typed_data()[bt.offs[3][i]], s->typed_data() + bt.offs[2][i]);
  });
}

// x, w, inv_y [..., B, out], g [..., B, out], p [..., 1, 1] -> gx [..., B, n], gw [..., out, n].
ffi::Error LpBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> iy, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> p,
                     ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gw, int32_t k) {
  const auto xd = dims_of(x), wd = dims_of(w), yd = dims_of(iy), gd = dims_of(g),
             pd = dims_of(p), gxd = dims_of(*gx), gwd = dims_of(*gw);
  const int64_t r = gxd.size();
  if (r < 2 || xd.size() != gxd.size() || wd.size() != gxd.size() || yd.size() != gxd.size() ||
      gd.size() != gxd.size() || pd.size() != gxd.size() || gwd.size() != gxd.size() ||
      xd[r - 1] != wd[r - 1] || yd[r - 2] != xd[r - 2] || yd[r - 1] != wd[r - 2] ||
      gd[r - 2] != xd[r - 2] || gd[r - 1] != wd[r - 2] || gxd[r - 2] != xd[r - 2] ||
      gxd[r - 1] != xd[r - 1] || gwd[r - 2] != wd[r - 2] || gwd[r - 1] != wd[r - 1])
    return ffi::Error::InvalidArgument("lp_dist backward: inconsistent shapes");
  const Batch bt = batch_of({xd, wd, yd, gd, pd, gxd, gwd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("lp_dist backward: " + bt.error);
  return dispatch_k(k, [&](auto kk) {
    for (int64_t i = 0; i < bt.count; ++i)
      lp_bwd_matrix<decltype(kk)::value>(
          pool, x.typed_data() + bt.offs[0][i], w.typed_data() + bt.offs[1][i],
          iy.typed_data() + bt.offs[2][i], g.typed_data() + bt.offs[3][i], xd[r - 2], wd[r - 2],
          xd[r - 1], p.typed_data()[bt.offs[4][i]], gx->typed_data() + bt.offs[5][i],
          gw->typed_data() + bt.offs[6][i]);
  });
}

// w [..., out, n], p [..., 1, 1] -> d [..., out, n]; k: p - 2 as an integer in 0..8, or -1.
ffi::Error LpDecayImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> p,
                       ffi::ResultBuffer<ffi::F32> d, int32_t k) {
  const auto wd = dims_of(w), pd = dims_of(p), dd = dims_of(*d);
  const int64_t r = dd.size();
  if (r < 2 || wd != dd || pd.size() != dd.size() || pd[r - 1] != 1 || pd[r - 2] != 1)
    return ffi::Error::InvalidArgument("lp_decay: expected w [..., out, n] and p [..., 1, 1]");
  const Batch bt = batch_of({wd, pd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("lp_decay: " + bt.error);
  auto run = [&](auto kk) {
    for (int64_t i = 0; i < bt.count; ++i)
      decay_matrix<decltype(kk)::value>(pool, w.typed_data() + bt.offs[0][i], wd[r - 2],
                                        wd[r - 1], p.typed_data()[bt.offs[1][i]],
                                        d->typed_data() + bt.offs[0][i]);
  };
  if (k == 0) {
    run(std::integral_constant<int, 0>{});
    return ffi::Error::Success();
  }
  return dispatch_k(k, run);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LinfDistFwd, LinfDistFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LinfDistMax, LinfDistMaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LinfDistBwd, LinfDistBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LinfBounds, LinfBoundsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpSum, LpSumImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpBwd, LpBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpDecay, LpDecayImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("k"));
