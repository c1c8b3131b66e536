// LpSum and LpBwd: the l_p distance at finite p (docs/METHOD.md §2), the sum pass of the stable
// form and the analytic backward pass.
//   s[b, o]  = sum_i (|d_i| / m[b, o])^p                    (y = m s^(1/p), computed in JAX)
//   G        = sign(d_i) max(|d_i| / y, 1e-30)^(p-1) g[b, o]
//   gx[b, i] = sum_o G,   gw[o, i] = -sum_b G
// The powers, by repeated squaring for an integer p and by exp/log otherwise: powers.h.
//
// Negligible terms (general p). Every term of the sum is u^p with u = |d_i| / m <= 1, and the
// sum is >= 1 (the max term is 1). A term with u^p < delta = 2^-24 / n is skipped: the n terms
// of a sum drop less than n delta = 2^-24 <= 2^-24 s in all, below the rounding of the float32
// sum, and y = m s^(1/p) moves by less than 2^-24 / p relative. A vector of VW terms is skipped
// when every u < tau = delta^(1/p) (0.79 at p = 100 and n = 1024, 0.98 at p = 1000), without
// computing a power. Likewise in the backward pass with t = |d_i| / y <= 1: for each (b, o),
// sum_i t^(p-1) >= sum_i t^p = 1, so skipping the terms with t^(p-1) < delta' = 2^-24 / n drops
// less than 2^-24 of that pair's gradient, measured in its l1 norm (each dropped term of gx or
// gw is below delta' |g[b, o]|). A NaN never counts as negligible. The integer-p path (p <= 8,
// where tau is 0.053 at p = 8 and n = 1024, and little would be skipped) computes every term.
#include "powers.h"

namespace {

// tau = delta^(1/e) with delta = 2^-24 / n: a term t^e with t < tau is negligible (see the
// top); 0 (nothing skipped) for e <= 0 or a non-finite e.
inline float negligible_below(float e, int64_t n) {
  if (!(e > 0.f) || !std::isfinite(e) || n <= 0) return 0.f;
  return static_cast<float>(std::exp2((-24.0 - std::log2(static_cast<double>(n))) / e));
}

// Sum pass: one register tile of tb x to pairs.
template <int K, int tb, int to>
inline void lp_sum_tile(const float* x, const float* w, int64_t ld, int64_t nv, const float* im,
                        float* s, int64_t ldy, float p, float tau) {
  // thr = tau m: |d| < thr is u < tau, tested before the scaling; 0 (never skipped) where m
  // is 0, NaN or infinite
  vf acc[tb][to], thr[tb][to];
  float scale[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      acc[r][c] = vf{};
      scale[r][c] = im[r * ldy + c];
      thr[r][c] = vf{} + (scale[r][c] > 0.f ? tau / scale[r][c] : 0.f);
    }
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(x + r * ld + v * VW);
      for (int c = 0; c < to; ++c) {
        const vf a = absv(xv - wv[c]);
        if constexpr (K < 0)
          if (all_below(a, thr[r][c])) continue;  // every term below delta (see the top)
        acc[r][c] += vpow<K>(a * scale[r][c], p);
      }
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
  const float tau = negligible_below(p, n);
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    for_tiles(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
      lp_sum_tile<K, tb, to>(x + b * ld, w + o * ld, ld, nv, im + b * out + o, s + b * out + o,
                             out, p, tau);
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
                        int64_t ldy, int64_t v0, int64_t v1, float pm1, float tau, float* gx,
                        float* gw, int64_t ld) {
  // thr = tau y: |d| < thr is t < tau, tested before the scaling; 0 (never skipped) where y is
  // 0, NaN or infinite
  float sc[tb][to], gg[tb][to];
  vf thr[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      sc[r][c] = iy[r * ldy + c];
      gg[r][c] = g[r * ldy + c];
      thr[r][c] = vf{} + (sc[r][c] > 0.f ? tau / sc[r][c] : 0.f);
    }
  for (int64_t v = v0; v < v1; ++v) {
    vf wv[to], gwv[to];
    bool touched_w = false;
    for (int c = 0; c < to; ++c) {
      wv[c] = loadv(w + c * ld + v * VW);
      gwv[c] = vf{};
    }
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(x + r * ld + v * VW);
      vf gxv = vf{};
      bool touched_x = false;
      for (int c = 0; c < to; ++c) {
        const vf d = xv - wv[c];
        const vf a = absv(d);
        if constexpr (K < 0)
          if (all_below(a, thr[r][c])) continue;  // every term below delta' (see the top)
        touched_x = true;
        vf t = a * sc[r][c];
        t = t > 1e-30f ? t : vf{} + 1e-30f;
        vf G = vpow<(K < 0 ? -1 : K - 1)>(t, pm1) * gg[r][c];
        // sign(d) * G: 0 where d == 0, the sign bit of d otherwise
        const vi nz = d != 0.f;
        G = (vf)(((vi)G ^ ((vi)d & (int32_t)0x80000000)) & nz);
        gxv += G;
        gwv[c] -= G;
      }
      if (K >= 0 || touched_x) {  // an untouched row adds exactly 0
        touched_w = true;
        vf cur = loadv(gx + r * ld + v * VW);
        cur += gxv;
        std::memcpy(gx + r * ld + v * VW, &cur, sizeof(cur));
      }
    }
    if (K >= 0 || touched_w)
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
  const float pm1 = p - 1.f, tau = negligible_below(pm1, n);
  parallel_for(pool, parts, [&](int64_t part) {
    const int64_t o0 = std::min(out, part * per), o1 = std::min(out, o0 + per);
    float* gxp = gx.data() + part * B * ld;
    for (int64_t v0 = 0; v0 < nv; v0 += vb) {
      const int64_t v1 = std::min(nv, v0 + vb);
      for_tiles<true>(0, B, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
        lp_bwd_tile<K, tb, to>(x + b * ld, w + o * ld, iy + b * out + o, g + b * out + o, out,
                               v0, v1, pm1, tau, gxp + b * ld, gwp + o * ld, ld);
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

}  // namespace

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
