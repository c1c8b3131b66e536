// LinfBounds: the interval bounds of certification (docs/METHOD.md §3.2), the exact interval
// (lo, hi) of ||z - w[o]||_inf over the box lower <= z <= upper. Per coordinate, for z in [l, u],
// min |z - w| = max(l - w, w - u, 0) and max |z - w| = max(u - w, w - l). With d1 = u - w and
// d2 = w - l (l - w = -d2 and w - u = -d1 exactly in IEEE arithmetic): hi = max_i max(d1, d2),
// lo = -min(0, min_i min(d1, d2)), the same values as the XLA code of ops/xla.py.
#include "common.h"

namespace {

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LinfBounds, LinfBoundsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
