// SortNet's inference neuron (linf_jax/ops/sort.py): SortDistFwd, SortDistMax, SortDistBwd,
// SortBounds.
//
// SortDistFwd: y[b, o] = sum_j omega[j] d_(j) over the K largest d_i = |x[b, i] - w[o, i]|,
//              largest first (equal values: the first coordinate first), with their coordinates
//              (int32) and sign(x - w) there (int8), [B, out * K] each: the residuals
// SortDistMax: y only (evaluation: nothing to differentiate)
// SortDistBwd: gx[b, i_j] += g[b, o] omega[j] s_j, gw[o, i_j] -= g[b, o] omega[j] s_j
// SortBounds:  (lo, hi): the same weighted top K of max(l - w, w - u, 0) and of
//              max(u - w, w - l) (the exact interval over the box l <= z <= u)
// omega [1, K] is computed by the caller (float64, then cast).
//
// Why a custom call: the XLA code keeps a running top K per pair as K arrays, each updated by a
// branchless insertion network at every coordinate, and XLA's CPU backend compiles each slot's
// update as a loop fusion of its own (K passes over the carry per coordinate, 2K with the
// coordinates). Here, per pair of a register tile, in two passes over the row:
//   1. per lane, the two largest terms (m1 >= m2: 2 VW values of distinct coordinates); tau,
//      the K-th largest of them (a bitonic network on two vectors), is at most the row's K-th
//      largest term: at least K coordinates have a term >= tau (a zero-padded coordinate's 0 is
//      no larger than any real term, so the bound holds with the padding too);
//   2. the candidates, the coordinates with a term >= tau, in coordinate order (a compress per
//      vector on AVX-512): about K of them on Gaussian rows (10.4 at K = 10, n = 1024);
// then the top K of the candidates, larger value first and on equal values the smaller
// coordinate: a bitonic sort of (value, coordinate) pairs when they fit in one vector, else
// insertion in coordinate order below equal values. With 2 VW < K, tau is -1 (every coordinate
// is a candidate). Equal values therefore rank the first coordinate first, and the zero padding
// at the end of a row never displaces one of the K <= n real coordinates.
#include <array>
#include <utility>

#include "common.h"

namespace {

// Lane mask of the lanes of a at or above t (an ordered compare: false for NaN).
inline uint32_t lanes_at_least(vf a, vf t) {
#if defined(__AVX512F__) && LINF_VW == 16
  return _mm512_cmp_ps_mask((__m512)a, (__m512)t, _CMP_GE_OQ);
#elif defined(__AVX__) && LINF_VW == 8
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)t, _CMP_GE_OQ));
#elif defined(__SSE__) && LINF_VW == 4
  return _mm_movemask_ps(_mm_cmpge_ps((__m128)a, (__m128)t));
#else
  uint32_t m = 0;
  for (int k = 0; k < VW; ++k) m |= (uint32_t)(a[k] >= t[k]) << k;
  return m;
#endif
}

// Appends the lanes of a (and their coordinates c) that m selects, in lane order, at dv / di and
// returns how many; dv, di need room for VW values. AVX-512: a compress in a register and a full
// store, no branch; else lane by lane over the set bits.
inline int append_lanes(float* dv, int32_t* di, vf a, vi c, uint32_t m) {
#if defined(__AVX512F__) && LINF_VW == 16
  _mm512_storeu_ps(dv, _mm512_maskz_compress_ps((__mmask16)m, (__m512)a));
  _mm512_storeu_si512(di, _mm512_maskz_compress_epi32((__mmask16)m, (__m512i)c));
  return __builtin_popcount(m);
#else
  int count = 0;
  for (; m; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    dv[count] = a[lane];
    di[count] = c[lane];
    ++count;
  }
  return count;
#endif
}

typedef uint16_t lane_mask16;  // one lane mask per vector (VW <= 16)
constexpr int64_t kMaskScan = 32;  // masks tested at once by for_each_nonzero

// Bit k set where m[k] != 0, for k < kMaskScan.
inline uint32_t nonzero_bits(const lane_mask16* m) {
#if defined(__AVX512BW__)
  const __m512i v = _mm512_loadu_si512(m);
  return _mm512_test_epi16_mask(v, v);
#else
  uint32_t bits = 0;
  for (int k = 0; k < kMaskScan; ++k) bits |= (uint32_t)(m[k] != 0) << k;
  return bits;
#endif
}

// Calls f(k) for each k in [0, count) with m[k] != 0, in increasing order; m is readable up to
// count rounded up to kMaskScan.
template <typename F>
inline void for_each_nonzero(const lane_mask16* m, int64_t count, const F& f) {
  for (int64_t k0 = 0; k0 < count; k0 += kMaskScan) {
    uint32_t bits = nonzero_bits(m + k0);
    if (count - k0 < kMaskScan) bits &= (1u << (count - k0)) - 1;
    for (; bits; bits &= bits - 1) f(k0 + __builtin_ctz(bits));
  }
}

inline vf splat(float t) { return vf{} + t; }

// a > b ? a : b and a < b ? a : b lane by lane (one instruction where the instruction set has
// it; the x86 max and min return b when either is NaN, as these expressions do).
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__) && LINF_VW == 16
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__) && LINF_VW == 8
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__) && LINF_VW == 4
  return (vf)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}

inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__) && LINF_VW == 16
  return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX__) && LINF_VW == 8
  return (vf)_mm256_min_ps((__m256)a, (__m256)b);
#elif defined(__SSE__) && LINF_VW == 4
  return (vf)_mm_min_ps((__m128)a, (__m128)b);
#else
  return a < b ? a : b;
#endif
}

// Lane constants of the networks below, built at compile time: lane i's partner i ^ j, and
// whether lane i keeps the larger of the two at step (k, j) of a bitonic network sorting into
// decreasing order: ((i & j) == 0) == ((i & k) == 0).
using Lanes = std::array<int32_t, VW>;

constexpr Lanes lane_pattern(int kind, int k, int j) {
  Lanes a{};
  for (int i = 0; i < VW; ++i)
    a[i] = kind == 0 ? i : kind == 1 ? (i ^ j) : kind == 2 ? (VW - 1 - i)
         : ((((i & j) == 0) == ((i & k) == 0)) ? -1 : 0);
  return a;
}

template <int kind, int k = 0, int j = 0>
inline vi lanes() {
  static constexpr Lanes a = lane_pattern(kind, k, j);
  vi v;
  std::memcpy(&v, a.data(), sizeof(v));
  return v;
}

inline vi lane_ids() { return lanes<0>(); }

// v[i ^ j] in lane i, and v reversed.
#if defined(__clang__)
template <int j, typename V, int... I>
inline V xor_lanes(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (I ^ j)...);
}
template <typename V, int... I>
inline V reversed(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (VW - 1 - I)...);
}
template <int j, typename V>
inline V partner(V v) { return xor_lanes<j>(v, std::make_integer_sequence<int, VW>{}); }
inline vf reverse(vf v) { return reversed(v, std::make_integer_sequence<int, VW>{}); }
#else
template <int j, typename V>
inline V partner(V v) { return __builtin_shuffle(v, lanes<1, 0, j>()); }
inline vf reverse(vf v) { return __builtin_shuffle(v, lanes<2>()); }
#endif

template <int k, int j>
inline vi keeps_larger() { return lanes<3, k, j>(); }

// The networks run on the N lists of a register tile in lock step: N independent dependency
// chains instead of one (each step's permutes and compares take several cycles of latency).
template <int k, int j, int N>
__attribute__((always_inline)) inline void merge_down(vf* v) {
  if constexpr (j > 0) {
    const vi keep = keeps_larger<k, j>();
    for (int t = 0; t < N; ++t) {
      const vf p = partner<j>(v[t]);
      v[t] = keep ? vmax(v[t], p) : vmin(v[t], p);
    }
    merge_down<k, j / 2, N>(v);
  }
}

template <int k, int N>
__attribute__((always_inline)) inline void sort_down(vf* v) {
  if constexpr (k <= VW) {
    merge_down<k, k / 2, N>(v);
    sort_down<2 * k, N>(v);
  }
}

// tau[t] = the K-th largest of the 2 VW lanes of a[t] and b[t] (1 <= K <= 2 VW): both sorted,
// then the larger (smaller) VW of the union, a bitonic sequence, merged. a and b are clobbered.
template <int N>
inline void kth_largest(vf* a, vf* b, int K, float* tau) {
  sort_down<2, N>(a);
  sort_down<2, N>(b);
  for (int t = 0; t < N; ++t) {
    const vf r = reverse(b[t]);
    a[t] = K <= VW ? vmax(a[t], r) : vmin(a[t], r);
  }
  merge_down<2 * VW, VW / 2, N>(a);
  for (int t = 0; t < N; ++t) tau[t] = a[t][K <= VW ? K - 1 : K - 1 - VW];
}

// The same network on (value, coordinate) pairs, in rank order: the larger value first, on
// equal values the smaller coordinate.
template <int k, int j, int N>
__attribute__((always_inline)) inline void rank_merge(vf* v, vi* c) {
  if constexpr (j > 0) {
    const vi larger = keeps_larger<k, j>();
    for (int t = 0; t < N; ++t) {
      const vf pv = partner<j>(v[t]);
      const vi pc = partner<j>(c[t]);
      const vi first = (v[t] > pv) | ((v[t] == pv) & (c[t] < pc));  // this lane ranks first
      const vi keep = larger == first;
      v[t] = keep ? v[t] : pv;
      c[t] = keep ? c[t] : pc;
    }
    rank_merge<k, j / 2, N>(v, c);
  }
}

template <int k, int N>
__attribute__((always_inline)) inline void rank_sort(vf* v, vi* c) {
  if constexpr (k <= VW) {
    rank_merge<k, k / 2, N>(v, c);
    rank_sort<2 * k, N>(v, c);
  }
}

inline int8_t sort_sign(float d) { return (int8_t)((d > 0.f) - (d < 0.f)); }

// Inserts a (> v[K - 1]) at coordinate c into the descending list v, ix of length K, below every
// equal value; returns the new K-th largest value.
inline float insert(float* v, int32_t* ix, int K, float a, int32_t c) {
  int p = K - 1;
  while (p > 0 && v[p - 1] < a) {
    v[p] = v[p - 1];
    ix[p] = ix[p - 1];
    --p;
  }
  v[p] = a;
  ix[p] = c;
  return v[K - 1];
}

// The top K of each of N lists of candidates (values cv, coordinates ci, in coordinate order,
// counts[t] >= K, cap apart) into vals, idx (ks apart, ks >= max(K, VW)), rank order. A list
// of at most VW candidates is ranked by the vector network (all N at once), a longer one by
// insertion. cv and ci are readable for VW values past each count.
template <int N>
inline void select_top(const float* cv, const int32_t* ci, int64_t cap, const int64_t* counts,
                       int K, float* vals, int32_t* idx, int64_t ks) {
  vf v[N];
  vi c[N];
  for (int t = 0; t < N; ++t) {
    const vi live = lane_ids() < (int32_t)std::min<int64_t>(counts[t], VW);
    std::memcpy(&c[t], ci + t * cap, sizeof(vi));
    v[t] = live ? loadv(cv + t * cap) : splat(-2.f);  // below every term: padding ranks last
    c[t] = live ? c[t] : vi{} + INT32_MAX;
  }
  rank_sort<2, N>(v, c);
  for (int t = 0; t < N; ++t) {
    float* lv = vals + t * ks;
    int32_t* li = idx + t * ks;
    if (counts[t] <= VW) {
      std::memcpy(lv, &v[t], sizeof(vf));
      std::memcpy(li, &c[t], sizeof(vi));
      continue;
    }
    std::fill(lv, lv + K, -1.f);
    std::fill(li, li + K, 0);
    float th = -1.f;
    for (int64_t i = 0; i < counts[t]; ++i)
      if (cv[t * cap + i] > th) th = insert(lv, li, K, cv[t * cap + i], ci[t * cap + i]);
  }
}

// The distances of SortDist*: one input array, one list per pair.
struct AbsTerm {
  static constexpr int NX = 1, NL = 1;
  static inline void eval(const vf* xv, vf w, vf* a) { a[0] = absv(xv[0] - w); }
  static inline void eval1(const float* xs, float w, float* a) { a[0] = std::fabs(xs[0] - w); }
};

// The terms of SortBounds: lower and upper inputs, two lists per pair. With d1 = u - w and
// d2 = w - l: max(l - w, w - u, 0) = max(-d2, -d1, 0) and max(u - w, w - l) = max(d1, d2), the
// same values as the XLA code's (l - w = -d2 and w - u = -d1 exactly in IEEE arithmetic).
struct BoxTerms {
  static constexpr int NX = 2, NL = 2;
  static inline void eval(const vf* xv, vf w, vf* a) {
    const vf d1 = xv[1] - w, d2 = w - xv[0];
    const vf n1 = vf{} - d1, n2 = vf{} - d2;
    const vf lo = n2 > n1 ? n2 : n1;
    a[0] = lo > vf{} ? lo : vf{};
    a[1] = d1 > d2 ? d1 : d2;
  }
  static inline void eval1(const float* xs, float w, float* a) {
    const float d1 = xs[1] - w, d2 = w - xs[0];
    a[0] = std::max(std::max(-d2, -d1), 0.f);
    a[1] = std::max(d1, d2);
  }
};

// One register tile of tb x to pairs over the coordinates [0, nv * VW): vals / idx get the top
// K of each list, [tb][to][NL][ks] with ks = max(K, VW); cv / ci hold the candidates, cap per
// list, and masks the lane masks, mcap (nv rounded up to kMaskScan) per list.
template <typename T, int tb, int to>
inline void topk_tile(const float* const* xs, const float* w, int64_t ld, int64_t nv, int K,
                      float* cv, int32_t* ci, int64_t cap, lane_mask16* masks, int64_t mcap,
                      float* vals, int32_t* idx) {
  constexpr int NX = T::NX, NL = T::NL;
  const int64_t ks = std::max(K, VW);
  // 1. the two largest terms per lane
  vf m1[tb][to][NL], m2[tb][to][NL];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c)
      for (int l = 0; l < NL; ++l) m1[r][c][l] = m2[r][c][l] = splat(-1.f);
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      vf xv[NX];
      for (int k = 0; k < NX; ++k) xv[k] = loadv(xs[k] + r * ld + v * VW);
      for (int c = 0; c < to; ++c) {
        vf a[NL];
        T::eval(xv, wv[c], a);
        for (int l = 0; l < NL; ++l) {
          m2[r][c][l] = vmax(m2[r][c][l], vmin(m1[r][c][l], a[l]));
          m1[r][c][l] = vmax(m1[r][c][l], a[l]);
        }
      }
    }
  }
  constexpr int kLists = tb * to * NL;
  float th[kLists];
  if (K <= 2 * VW) {
    vf a[kLists], b[kLists];  // copies: m1 and m2 stay in registers through the pass above
    for (int r = 0; r < tb; ++r)
      for (int c = 0; c < to; ++c)
        for (int l = 0; l < NL; ++l) {
          a[(r * to + c) * NL + l] = m1[r][c][l];
          b[(r * to + c) * NL + l] = m2[r][c][l];
        }
    kth_largest<kLists>(a, b, K, th);
  } else {
    std::fill(th, th + kLists, -1.f);
  }
  vf tau[tb][to][NL];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c)
      for (int l = 0; l < NL; ++l) tau[r][c][l] = splat(th[(r * to + c) * NL + l]);
  // 2. per vector, the lanes at or above tau (a mask each); then the candidates of the vectors
  //    that have any, recomputed there, in coordinate order
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      vf xv[NX];
      for (int k = 0; k < NX; ++k) xv[k] = loadv(xs[k] + r * ld + v * VW);
      for (int c = 0; c < to; ++c) {
        vf a[NL];
        T::eval(xv, wv[c], a);
        for (int l = 0; l < NL; ++l)
          masks[((r * to + c) * NL + l) * mcap + v] =
              (lane_mask16)lanes_at_least(a[l], tau[r][c][l]);
      }
    }
  }
  const vi ids = lane_ids();
  int64_t counts[kLists];
  for (int list = 0; list < kLists; ++list) {
    const int r = list / (to * NL), c = list / NL % to, l = list % NL;
    float* lv = cv + list * cap;
    int32_t* li = ci + list * cap;
    int64_t count = 0;
    for_each_nonzero(masks + list * mcap, nv, [&](int64_t v) {
      vf xv[NX], a[NL];
      for (int k = 0; k < NX; ++k) xv[k] = loadv(xs[k] + r * ld + v * VW);
      T::eval(xv, loadv(w + c * ld + v * VW), a);
      count += append_lanes(lv + count, li + count, a[l], ids + (int32_t)(v * VW),
                            masks[list * mcap + v]);
    });
    counts[list] = count;
  }
  select_top<kLists>(cv, ci, cap, counts, K, vals, idx, ks);
}

// The tiles of tb x to pairs covering [b0, b1) x [o0, o1), with 1-wide edges (for_tiles with
// this family's tile shape).
template <int TBx, int TOx, typename F>
inline void sort_tiles(int64_t b0, int64_t b1, int64_t o0, int64_t o1, const F& f) {
  using FullB = std::integral_constant<int, TBx>;
  using FullO = std::integral_constant<int, TOx>;
  using Edge = std::integral_constant<int, 1>;
  auto row = [&](auto tb, int64_t b) {
    int64_t o = o0;
    for (; o + TOx <= o1; o += TOx) f(tb, FullO{}, b, o);
    for (; o < o1; ++o) f(tb, Edge{}, b, o);
  };
  int64_t b = b0;
  for (; b + TBx <= b1; b += TBx) row(FullB{}, b);
  for (; b < b1; ++b) row(Edge{}, b);
}

// sum_j omega[j] v[j], the largest weight first (the XLA code's order).
inline float weighted(const float* v, const float* omega, int K) {
  float s = v[0] * omega[0];
  for (int j = 1; j < K; ++j) s = s + v[j] * omega[j];
  return s;
}

// One problem: xs0 [NX] of [B, n], w0 [out, n] -> ys [NL] of [B, out]; with idx and sgn
// ([B, out * K]) for AbsTerm's residuals.
template <typename T>
void topk_matrix(ffi::ThreadPool& pool, const float* const* xs0, const float* w0, int64_t B,
                 int64_t out, int64_t n, int K, const float* omega, float* const* ys,
                 int32_t* idx_out, int8_t* sgn_out) {
  constexpr int NX = T::NX, NL = T::NL;
  if (B == 0 || out == 0) return;
  if (n == 0 || K == 0) {
    for (int l = 0; l < NL; ++l) std::fill(ys[l], ys[l] + B * out, 0.f);
    return;
  }
  const int64_t nv = (n + VW - 1) / VW, ld = nv * VW;
  std::vector<float> bufs[NX], wbuf;
  const float* xs[NX];
  for (int k = 0; k < NX; ++k) xs[k] = padded(xs0[k], B, n, ld, bufs[k]);
  const float* w = padded(w0, out, n, ld, wbuf);
  // Register tiles: the two largest terms per lane take 2 NL vectors per pair, so two lists
  // (the bounds) take half as many input rows.
  constexpr int kTB = NL == 1 ? TB : (TB + 1) / 2, kTO = TO;
  const int64_t cap = ld + VW, ks = std::max(K, VW);
  const int64_t mcap = (nv + kMaskScan - 1) / kMaskScan * kMaskScan;
  run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
    std::vector<float> vals((int64_t)kTB * kTO * NL * ks), cv((int64_t)kTB * kTO * NL * cap);
    std::vector<int32_t> ids(vals.size()), ci(cv.size());
    std::vector<lane_mask16> masks((int64_t)kTB * kTO * NL * mcap, 0);
    sort_tiles<kTB, kTO>(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
      const float* rows[NX];
      for (int k = 0; k < NX; ++k) rows[k] = xs[k] + b * ld;
      topk_tile<T, tb, to>(rows, w + o * ld, ld, nv, K, cv.data(), ci.data(), cap, masks.data(),
                           mcap, vals.data(), ids.data());
      for (int r = 0; r < tb; ++r)
        for (int c = 0; c < to; ++c) {
          const int64_t pair = (b + r) * out + o + c;
          for (int l = 0; l < NL; ++l) {
            const int64_t at = ((r * to + c) * NL + l) * ks;
            ys[l][pair] = weighted(vals.data() + at, omega, K);
            if (idx_out) {
              for (int j = 0; j < K; ++j) {
                const int32_t i = ids[at + j];
                idx_out[pair * K + j] = i;
                sgn_out[pair * K + j] = sort_sign(xs0[0][(b + r) * n + i] - w0[(o + c) * n + i]);
              }
            }
          }
        }
    });
  });
  // Non-finite rows: redo their pairs in scalar code, NaN propagating as in the XLA code.
  auto redo = [&](int64_t b, int64_t o) {
    std::vector<float> v((int64_t)NL * K, -1.f);
    std::vector<int32_t> ix(v.size(), 0);
    float thr[NL];
    bool nan[NL];
    for (int l = 0; l < NL; ++l) thr[l] = -1.f, nan[l] = false;
    for (int64_t i = 0; i < n; ++i) {
      float xi[NX], a[NL];
      for (int k = 0; k < NX; ++k) xi[k] = xs0[k][b * n + i];
      T::eval1(xi, w0[o * n + i], a);
      for (int l = 0; l < NL; ++l) {
        nan[l] = nan[l] || std::isnan(a[l]);
        if (a[l] > thr[l]) thr[l] = insert(&v[l * K], &ix[l * K], K, a[l], (int32_t)i);
      }
    }
    const int64_t pair = b * out + o;
    for (int l = 0; l < NL; ++l) ys[l][pair] = nan[l] ? NAN : weighted(&v[l * K], omega, K);
    if (idx_out) {
      for (int j = 0; j < K; ++j) {
        idx_out[pair * K + j] = ix[j];
        sgn_out[pair * K + j] = sort_sign(xs0[0][b * n + ix[j]] - w0[o * n + ix[j]]);
      }
    }
  };
  if constexpr (NX == 1) redo_non_finite({xs0[0]}, w0, B, out, n, redo);
  else redo_non_finite({xs0[0], xs0[1]}, w0, B, out, n, redo);
}

// One backward problem: gx [B, n], gw [out, n] from idx, sgn [B, out * K] and g [B, out].
void sort_bwd_matrix(ffi::ThreadPool& pool, const int32_t* idx, const int8_t* sgn,
                     const float* g, const float* omega, int64_t B, int64_t out, int64_t n, int K,
                     float* gx, float* gw) {
  if (n == 0) return;
  // gx: each job owns whole input rows; gw: each job owns whole weight rows (fixed order:
  // deterministic sums).
  parallel_for(pool, (B + kScatterRows - 1) / kScatterRows, [&](int64_t job) {
    const int64_t b1 = std::min(B, (job + 1) * kScatterRows);
    for (int64_t b = job * kScatterRows; b < b1; ++b) {
      float* row = gx + b * n;
      std::fill(row, row + n, 0.f);
      for (int64_t o = 0; o < out; ++o) {
        const float gg = g[b * out + o];
        const int64_t at = (b * out + o) * K;
        for (int j = 0; j < K; ++j) row[idx[at + j]] += gg * omega[j] * sgn[at + j];
      }
    }
  });
  parallel_for(pool, (out + kScatterRows - 1) / kScatterRows, [&](int64_t job) {
    const int64_t o0 = job * kScatterRows, o1 = std::min(out, o0 + kScatterRows);
    std::fill(gw + o0 * n, gw + o1 * n, 0.f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = o0; o < o1; ++o) {
        const float gg = g[b * out + o];
        const int64_t at = (b * out + o) * K;
        for (int j = 0; j < K; ++j) gw[o * n + idx[at + j]] -= gg * omega[j] * sgn[at + j];
      }
  });
}

// x [..., B, n], w [..., out, n], omega [..., 1, K] -> y [..., B, out] (and idx, sgn
// [..., B, out * K]).
ffi::Error sort_call(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
                     ffi::Buffer<ffi::F32>& omega, ffi::ResultBuffer<ffi::F32>& y,
                     int32_t* idx, int8_t* sgn) {
  const auto xd = dims_of(x), wd = dims_of(w), od = dims_of(omega), yd = dims_of(*y);
  const int64_t r = yd.size();
  if (r < 2 || xd.size() != yd.size() || wd.size() != yd.size() || od.size() != yd.size() ||
      xd[r - 1] != wd[r - 1] || od[r - 2] != 1)
    return ffi::Error::InvalidArgument(
        "sort_dist: expected x [..., B, n], w [..., out, n] and omega [..., 1, K]");
  const int64_t K = od[r - 1];
  if (K > xd[r - 1] || K < 1)
    return ffi::Error::InvalidArgument("sort_dist: K must be in [1, n]");
  const Batch bt = batch_of({xd, wd, od, yd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("sort_dist: " + bt.error);
  const int64_t B = xd[r - 2], out = wd[r - 2], n = xd[r - 1];
  for (int64_t k = 0; k < bt.count; ++k) {
    const float* xs[1] = {x.typed_data() + bt.offs[0][k]};
    float* ys[1] = {y->typed_data() + bt.offs[3][k]};
    const int64_t ro = bt.offs[3][k] * K;  // the residuals' offset: K per output
    topk_matrix<AbsTerm>(pool, xs, w.typed_data() + bt.offs[1][k], B, out, n, (int)K,
                         omega.typed_data() + bt.offs[2][k], ys, idx ? idx + ro : nullptr,
                         sgn ? sgn + ro : nullptr);
  }
  return ffi::Error::Success();
}

ffi::Error SortDistFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> omega, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::S32> idx, ffi::ResultBuffer<ffi::S8> sgn) {
  return sort_call(pool, x, w, omega, y, idx->typed_data(), sgn->typed_data());
}

ffi::Error SortDistMaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> omega, ffi::ResultBuffer<ffi::F32> y) {
  return sort_call(pool, x, w, omega, y, nullptr, nullptr);
}

// idx, sign [..., B, out * K], g [..., B, out], omega [..., 1, K] -> gx [..., B, n],
// gw [..., out, n].
ffi::Error SortDistBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx,
                           ffi::Buffer<ffi::S8> sgn, ffi::Buffer<ffi::F32> g,
                           ffi::Buffer<ffi::F32> omega, ffi::ResultBuffer<ffi::F32> gx,
                           ffi::ResultBuffer<ffi::F32> gw) {
  const auto id = dims_of(idx), sd = dims_of(sgn), gd = dims_of(g), od = dims_of(omega);
  const auto xd = dims_of(*gx), wd = dims_of(*gw);
  const int64_t r = xd.size();
  if (r < 2 || id.size() != xd.size() || sd != id || gd.size() != xd.size() ||
      od.size() != xd.size() || wd.size() != xd.size() || od[r - 2] != 1)
    return ffi::Error::InvalidArgument("sort_dist backward: inconsistent shapes");
  const int64_t K = od[r - 1], B = xd[r - 2], out = wd[r - 2], n = xd[r - 1];
  if (id[r - 2] != B || id[r - 1] != out * K || gd[r - 2] != B || gd[r - 1] != out ||
      wd[r - 1] != n)
    return ffi::Error::InvalidArgument("sort_dist backward: inconsistent shapes");
  const Batch bt = batch_of({id, gd, od, xd, wd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("sort_dist backward: " + bt.error);
  for (int64_t k = 0; k < bt.count; ++k)
    sort_bwd_matrix(pool, idx.typed_data() + bt.offs[0][k], sgn.typed_data() + bt.offs[0][k],
                    g.typed_data() + bt.offs[1][k], omega.typed_data() + bt.offs[2][k], B, out,
                    n, (int)K, gx->typed_data() + bt.offs[3][k],
                    gw->typed_data() + bt.offs[4][k]);
  return ffi::Error::Success();
}

// lower, upper [..., B, n], w [..., out, n], omega [..., 1, K] -> lo, hi [..., B, out].
ffi::Error SortBoundsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> l, ffi::Buffer<ffi::F32> u,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> omega,
                          ffi::ResultBuffer<ffi::F32> lo, ffi::ResultBuffer<ffi::F32> hi) {
  const auto ld = dims_of(l), ud = dims_of(u), wd = dims_of(w), od = dims_of(omega);
  const auto yd = dims_of(*lo);
  const int64_t r = yd.size();
  if (r < 2 || ld.size() != yd.size() || ud.size() != yd.size() || wd.size() != yd.size() ||
      od.size() != yd.size() || ld[r - 2] != ud[r - 2] || ld[r - 1] != ud[r - 1] ||
      ld[r - 1] != wd[r - 1] || od[r - 2] != 1)
    return ffi::Error::InvalidArgument(
        "sort_dist_bounds: expected lower, upper [..., B, n], w [..., out, n] and omega "
        "[..., 1, K]");
  const int64_t K = od[r - 1];
  if (K > ld[r - 1] || K < 1)
    return ffi::Error::InvalidArgument("sort_dist_bounds: K must be in [1, n]");
  const Batch bt = batch_of({ld, ud, wd, od, yd}, r);
  if (!bt.error.empty()) return ffi::Error::InvalidArgument("sort_dist_bounds: " + bt.error);
  for (int64_t k = 0; k < bt.count; ++k) {
    const float* xs[2] = {l.typed_data() + bt.offs[0][k], u.typed_data() + bt.offs[1][k]};
    float* ys[2] = {lo->typed_data() + bt.offs[4][k], hi->typed_data() + bt.offs[4][k]};
    topk_matrix<BoxTerms>(pool, xs, w.typed_data() + bt.offs[2][k], ld[r - 2], wd[r - 2],
                          ld[r - 1], (int)K, omega.typed_data() + bt.offs[3][k], ys, nullptr,
                          nullptr);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SortDistFwd, SortDistFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SortDistMax, SortDistMaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SortDistBwd, SortDistBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SortBounds, SortBoundsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
