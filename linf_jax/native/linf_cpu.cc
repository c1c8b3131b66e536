// Native CPU kernels for linf_jax.ops (XLA FFI custom calls), built on first use by
// linf_jax/native/__init__.py with the machine's C++ compiler (-O3 -march=native).
//
// LinfDistFwd: y[b, o] = max_i |x[b, i] - w[o, i]|, the first arg-max i* (int32) and
//              sign(x[b, i*] - w[o, i*]) (int8), the residuals of the backward pass
// LinfDistMax: y only (evaluation: nothing to differentiate)
// LinfDistBwd: gx[b, i*] += g[b, o] s[b, o], gw[o, i*] -= g[b, o] s[b, o] (two scatter-adds)
// LinfBounds:  the exact interval (lo, hi) of ||z - w[o]||_inf over the box lower <= z <= upper
//
// Why a custom call: XLA's CPU backend compiles the running max and the running arg-max as two
// sibling loop fusions that each recompute |x - w| (BENCHMARKS.md), so the arg-max doubled the
// forward time. Here one register-tiled loop keeps both.
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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int VW = 16;  // lanes per vector (one AVX-512 register; two AVX2 registers)
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
constexpr int TB = 4;  // input rows per register tile
constexpr int TO = 2;  // weight rows per register tile

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf absv(vf v) {
  vi bits = (vi)v & 0x7fffffff;
  return (vf)bits;
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
    const float d = x[first] - w[first];
    *sgn = (int8_t)((d > 0.f) - (d < 0.f));
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

template <bool kIndex, int tb>
inline void tile_rows(const float* x, const float* w, int64_t ld, int64_t nv, float* y,
                      int32_t* idx, int8_t* sgn, int64_t ldy, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + TO <= o1; o += TO)
    tile<kIndex, tb, TO>(x, w + o * ld, ld, nv, y + o, kIndex ? idx + o : nullptr,
                         kIndex ? sgn + o : nullptr, ldy);
  for (; o < o1; ++o)
    tile<kIndex, tb, 1>(x, w + o * ld, ld, nv, y + o, kIndex ? idx + o : nullptr,
                        kIndex ? sgn + o : nullptr, ldy);
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
    const float d = x[k] - w[k];
    *sgn = (int8_t)((d > 0.f) - (d < 0.f));
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

template <bool kIndex>
ffi::Error linf_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> wb,
                     ffi::ResultBuffer<ffi::F32> yb, int32_t* idx, int8_t* sgn) {
  const auto xd = xb.dimensions(), wd = wb.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("linf_dist: expected x [B, n] and w [out, n]");
  const int64_t B = xd[0], out = wd[0], n = xd[1];
  float* y = yb->typed_data();
  if (B == 0 || out == 0) return ffi::Error::Success();
  if (n == 0) {
    std::fill(y, y + B * out, 0.f);
    if (kIndex) std::fill(idx, idx + B * out, 0);
    if (kIndex) std::fill(sgn, sgn + B * out, 0);
    return ffi::Error::Success();
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> xbuf, wbuf;
  const float* x = padded(xb.typed_data(), B, n, ld, xbuf);
  const float* w = padded(wb.typed_data(), out, n, ld, wbuf);
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    int64_t b = b0;
    for (; b + TB <= b1; b += TB)
      tile_rows<kIndex, TB>(x + b * ld, w, ld, nv, y + b * out, kIndex ? idx + b * out : nullptr,
                            kIndex ? sgn + b * out : nullptr, out, o0, o1);
    for (; b < b1; ++b)
      tile_rows<kIndex, 1>(x + b * ld, w, ld, nv, y + b * out, kIndex ? idx + b * out : nullptr,
                           kIndex ? sgn + b * out : nullptr, out, o0, o1);
  });
  // Non-finite rows: redo their pairs with the scalar loop (NaN propagates as in XLA).
  const float* x0 = xb.typed_data();
  const float* w0 = wb.typed_data();
  redo_non_finite({x0}, w0, B, out, n, [&](int64_t b, int64_t o) {
    scalar_pair(x0 + b * n, w0 + o * n, n, y + b * out + o,
                kIndex ? idx + b * out + o : nullptr, kIndex ? sgn + b * out + o : nullptr);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Interval bounds: for z in the box [l, u], per coordinate min |z - w| = max(l - w, w - u, 0) and
// max |z - w| = max(u - w, w - l). With d1 = u - w and d2 = w - l (l - w = -d2 and w - u = -d1
// exactly in IEEE arithmetic): hi = max_i max(d1, d2), lo = -min(0, min_i min(d1, d2)), the same
// values as the XLA code of ops.py.
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

template <int tb>
inline void bounds_rows(const float* l, const float* u, const float* w, int64_t ld, int64_t nv,
                        float* lo, float* hi, int64_t ldy, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + TO <= o1; o += TO)
    bounds_tile<tb, TO>(l, u, w + o * ld, ld, nv, lo + o, hi + o, ldy);
  for (; o < o1; ++o) bounds_tile<tb, 1>(l, u, w + o * ld, ld, nv, lo + o, hi + o, ldy);
}

// XLA's maximum: NaN if either operand is NaN.
inline float nan_max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? NAN : (a > b ? a : b);
}

ffi::Error LinfBoundsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lb, ffi::Buffer<ffi::F32> ub,
                          ffi::Buffer<ffi::F32> wb, ffi::ResultBuffer<ffi::F32> lob,
                          ffi::ResultBuffer<ffi::F32> hib) {
  const auto ld_ = lb.dimensions(), ud = ub.dimensions(), wd = wb.dimensions();
  if (ld_.size() != 2 || ud.size() != 2 || wd.size() != 2 || ld_[0] != ud[0] ||
      ld_[1] != ud[1] || ld_[1] != wd[1])
    return ffi::Error::InvalidArgument(
        "linf_dist_bounds: expected lower, upper [B, n] and w [out, n]");
  const int64_t B = ld_[0], out = wd[0], n = ld_[1];
  float* lo = lob->typed_data();
  float* hi = hib->typed_data();
  if (B == 0 || out == 0) return ffi::Error::Success();
  if (n == 0) {
    std::fill(lo, lo + B * out, 0.f);
    std::fill(hi, hi + B * out, 0.f);
    return ffi::Error::Success();
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> lbuf, ubuf, wbuf;
  const float* l = padded(lb.typed_data(), B, n, ld, lbuf);
  const float* u = padded(ub.typed_data(), B, n, ld, ubuf);
  const float* w = padded(wb.typed_data(), out, n, ld, wbuf);
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    int64_t b = b0;
    for (; b + TB <= b1; b += TB)
      bounds_rows<TB>(l + b * ld, u + b * ld, w, ld, nv, lo + b * out, hi + b * out, out, o0, o1);
    for (; b < b1; ++b)
      bounds_rows<1>(l + b * ld, u + b * ld, w, ld, nv, lo + b * out, hi + b * out, out, o0, o1);
  });
  const float* l0 = lb.typed_data();
  const float* u0 = ub.typed_data();
  const float* w0 = wb.typed_data();
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
  return ffi::Error::Success();
}

ffi::Error LinfDistFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S32> idx,
                           ffi::ResultBuffer<ffi::S8> sgn) {
  return linf_impl<true>(pool, x, w, y, idx->typed_data(), sgn->typed_data());
}

ffi::Error LinfDistMaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  return linf_impl<false>(pool, x, w, y, nullptr, nullptr);
}

// Rows per job of the scatter passes.
constexpr int64_t kScatterRows = 16;

ffi::Error LinfDistBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idxb,
                           ffi::Buffer<ffi::S8> sgnb, ffi::Buffer<ffi::F32> gb,
                           ffi::ResultBuffer<ffi::F32> gxb, ffi::ResultBuffer<ffi::F32> gwb) {
  const auto gd = gb.dimensions(), xd = gxb->dimensions(), wd = gwb->dimensions();
  if (gd.size() != 2 || xd.size() != 2 || wd.size() != 2 || gd[0] != xd[0] || gd[1] != wd[0] ||
      xd[1] != wd[1])
    return ffi::Error::InvalidArgument("linf_dist backward: inconsistent shapes");
  const int64_t B = xd[0], out = wd[0], n = xd[1];
  const int32_t* idx = idxb.typed_data();
  const int8_t* sgn = sgnb.typed_data();
  const float* g = gb.typed_data();
  float* gx = gxb->typed_data();
  float* gw = gwb->typed_data();
  // gx: each job owns whole input rows; gw: each job owns whole weight rows. Both read the
  // [B, out] residuals row by row.
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
  return ffi::Error::Success();
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
