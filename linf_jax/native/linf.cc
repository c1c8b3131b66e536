// The l_inf distance: LinfDistFwd, LinfDistMax, LinfDistBwd (docs/METHOD.md §2).
//
// LinfDistFwd: y[b, o] = max_i |x[b, i] - w[o, i]|, the first arg-max i* (int32) and
//              sign(x[b, i*] - w[o, i*]) (int8), the residuals of the backward pass
// LinfDistMax: y only (evaluation: nothing to differentiate)
// LinfDistBwd: gx[b, i*] += g[b, o] s[b, o], gw[o, i*] -= g[b, o] s[b, o] (two scatter-adds)
//
// Why a custom call: XLA's CPU backend compiles the running max and the running arg-max as two
// sibling loop fusions that each recompute |x - w| (BENCHMARKS.md), so there the arg-max costs
// about as much as the forward pass itself. Here one register-tiled loop keeps both: per pair of
// the tile, a vector of running maxima and a vector of the block numbers where each lane last
// rose (strict >, so the first maximum wins); the final horizontal step picks the largest lane
// and, on ties, the smallest coordinate.
#include "common.h"

namespace {

inline int8_t sign_of(float d) { return (int8_t)((d > 0.f) - (d < 0.f)); }

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
