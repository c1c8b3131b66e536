// LpDecay (docs/METHOD.md §6): the direction of the optimiser's l_p weight decay, row by row (one
// row per output neuron), the gradient of 1/2 ||w_o||_p^2:
//   d[o, i] = (|w_oi| / ||w_o||_p)^(p-2) w_oi = t_i s^(-(p-2)/p) w_oi,
//   u_i = |w_oi| / m, m = max_i |w_oi|, t_i = u_i^(p-2), s = max(sum_i t_i u_i^2, 1)
// and at p = inf w_oi where |w_oi| = m > 0 (0 elsewhere). One read of w and one write of d: a row
// (a few KiB) stays in L1 over the three passes (max, sum, scale), and t is kept in the output
// row between them, so each exp/log is done once. K >= 0: p - 2 as an integer (repeated
// squaring); K = -1: the p of the operand (exp/log, or the select at p = inf; powers.h). Rows
// holding a NaN or an infinity take the same formula in scalar code (NaN propagates as in XLA's
// version).
#include "powers.h"

namespace {

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
void decay_row(const float* w, int64_t n, float p, float tau, float* d,
               float* row /* ld floats */) {
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
  // t into the (padded) row buffer, its sum, then d = t f w; where tau > 0 (see decay_matrix),
  // a vector whose u are all below tau gets t = 0 without its powers
  const float inv = 1.f / m;
  vf acc{};
  if (K < 0 && tau > 0.f) {
    const vf thr = vf{} + tau;
    for (int64_t v = 0; v < nv; ++v) {
      const vf u = absv(loadv(row + v * VW)) * inv;
      vf t{};
      if (!all_below(u, thr)) {
        t = vpow<K>(u, p - 2.f);
        acc += t * u * u;
      }
      std::memcpy(row + v * VW, &t, sizeof(t));
    }
  } else {
    for (int64_t v = 0; v < nv; ++v) {
      const vf u = absv(loadv(row + v * VW)) * inv;
      const vf t = vpow<K>(u, p - 2.f);
      acc += t * u * u;
      std::memcpy(row + v * VW, &t, sizeof(t));
    }
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
  // Negligible terms (general p; lp.cc states the rule): with u <= 1 and s >= 1, a term whose
  // u^(p-1) < 2^-24 / n (u < tau) adds below 2^-24 / n of s, and its d = t f w, below 2^-24 / n
  // of the row's largest |d| (f m, at u = 1); it is dropped (d = 0), so the row's s and its d,
  // in its l1 norm against the largest |d|, lose less than 2^-24 in all. A vector is tested
  // only where tau >= 0.7 (p of about 67 and more at n = 1024): below, a vector whose lanes
  // are all below tau is too rare for the test to pay (measured: BENCHMARKS.md).
  float tau = K < 0 ? negligible_below(p - 1.f, n) : 0.f;
  if (tau < 0.7f) tau = 0.f;
  parallel_for(pool, (out + rows - 1) / rows, [&](int64_t job) {
    std::vector<float> row(ld);
    const int64_t o1 = std::min(out, (job + 1) * rows);
    for (int64_t o = job * rows; o < o1; ++o)
      decay_row<K>(w + o * n, n, p, tau, d + o * n, row.data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpDecay, LpDecayImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("k"));
