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
// sum, and y = m s^(1/p) moves by less than 2^-24 / p relative. That is u < tau = delta^(1/p)
// (negligible_below, common.h: 0.79 at p = 100 and n = 1024, 0.98 at p = 1000), tested without
// computing a power. Likewise
// in the backward pass with t = |d_i| / y <= 1: for each (b, o), sum_i t^(p-1) >= sum_i t^p = 1,
// so skipping the terms with t^(p-1) < delta' = 2^-24 / n drops less than 2^-24 of that pair's
// gradient, measured in its l1 norm (each dropped term of gx or gw is below delta' |g[b, o]|).
// A NaN never counts as negligible. The integer-p path (p <= 8, where tau is 0.053 at p = 8 and
// n = 1024, and little would be skipped) computes every term.
//
// Sparse sweeps (general p). At large p few terms matter (about 8 of 1024 per pair at p = 100
// for gaussian differences, one or two at p = 1000), scattered so that a vector of VW lanes
// holds one now and then. So the sweep over a tile's coordinates only compares and stores, per
// pair and vector, the mask of the lanes that matter (no branch on the data); then the vectors
// with such lanes are computed again (the tile's rows are still in L1) and only those lanes
// are packed (pack_lanes) into a buffer shared by the tile's pairs, whose powers are taken on
// whole vectors. A pair whose only term that matters is its maximum so costs a fraction of one
// power, and no chain of work per pair stands between the data-dependent branches. The sum
// pass always sweeps so (no slower even where every term matters: its powers then run in a
// tight loop); the backward pass does below a share of terms that matter, estimated on a
// sample of pairs (kSparseBelow), and above it computes whole vectors as before.
#include "powers.h"

namespace {

// The sum of a vector's lanes, as a tree.
inline float hsum(vf v) {
  float t[VW];
  std::memcpy(t, &v, sizeof(v));
  for (int h = VW / 2; h >= 1; h /= 2)
    for (int k = 0; k < h; ++k) t[k] += t[k + h];
  return t[0];
}

// The sparse sweeps take the coordinates in segments of kSegment vectors (the masks of a tile's
// pairs at a fixed stride) and empty their shared buffer once it holds kFlush lanes.
constexpr int64_t kSegment = 64, kFlush = 8 * VW;
constexpr uint32_t kAllLanes = (1u << VW) - 1;

// A thread's buffers for the sparse sweeps.
struct SparseScratch {
  std::vector<lane_mask> masks;  // per pair of a tile, kSegment masks
  std::vector<float> stage;      // one pair's packed lanes in a segment (sum pass)
  std::vector<float> vals;       // the shared buffer of packed lanes
  std::vector<int32_t> pairs;    // sum pass: each lane's pair
  std::vector<int64_t> tags;     // backward pass: each vector's coordinate, pair and lane mask
  SparseScratch()
      : masks(TB * TO * kSegment),
        stage((kSegment + 1) * VW),
        vals(kFlush + 2 * VW),
        pairs(kFlush + 2 * VW),
        tags(kFlush + VW) {}
};

// Records, per pair k of a tile and vector v of the segment [xs, xs + len * VW), whether each
// lane's |x - w| is not below thr[k]: masks[k * kSegment + v].
template <int tb, int to>
inline void sweep_masks(const float* xs, const float* ws, int64_t ld, int64_t len, const vf* thr,
                        lane_mask* masks) {
  for (int64_t v = 0; v < len; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(ws + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(xs + r * ld + v * VW);
      for (int c = 0; c < to; ++c)
        store_lanes_not_below(masks + (r * to + c) * kSegment + v, absv(xv - wv[c]),
                              thr[r * to + c]);
    }
  }
}

// Sum pass at an integer p: one register tile of tb x to pairs, every term.
template <int K, int tb, int to>
inline void lp_sum_tile(const float* x, const float* w, int64_t ld, int64_t nv, const float* im,
                        float* s, int64_t ldy, float p) {
  vf acc[tb][to];
  float scale[tb][to];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      acc[r][c] = vf{};
      scale[r][c] = im[r * ldy + c];
    }
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[to];
    for (int c = 0; c < to; ++c) wv[c] = loadv(w + c * ld + v * VW);
    for (int r = 0; r < tb; ++r) {
      const vf xv = loadv(x + r * ld + v * VW);
      for (int c = 0; c < to; ++c) acc[r][c] += vpow<K>(absv(xv - wv[c]) * scale[r][c], p);
    }
  }
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      float t = 0.f;
      for (int k = 0; k < VW; ++k) t += acc[r][c][k];
      s[r * ldy + c] = t;
    }
}

// Sum pass at a general p, sparse (see the top). A pair's packed lanes of a segment go to a
// staging buffer, whose whole vectors take their powers at once; the fewer than VW left over
// join the shared buffer, each with its pair's number, and each of its powers is added to its
// pair's sum.
template <int tb, int to>
inline void lp_sum_tile_sparse(const float* x, const float* w, int64_t ld, int64_t nv,
                               const float* im, float* s, int64_t ldy, float p, float tau,
                               SparseScratch& scr) {
  constexpr int np = tb * to;
  lane_mask* const masks = scr.masks.data();
  float* const stage = scr.stage.data();
  float* const vals = scr.vals.data();
  int32_t* const pairs = scr.pairs.data();
  // thr = tau m: |d| < thr is u < tau, tested before the scaling; 0 (nothing skipped) where m
  // is 0, NaN or infinite
  vf thr[np], acc[np];
  float scale[np];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      const int k = r * to + c;
      scale[k] = im[r * ldy + c];
      thr[k] = vf{} + (scale[k] > 0.f ? tau / scale[k] : 0.f);
      acc[k] = vf{};
    }
  vi lane;
  for (int k = 0; k < VW; ++k) lane[k] = k;
  int64_t q = 0;  // lanes in vals and pairs
  auto flush = [&]() {
    for (int64_t j = 0; j < q; j += VW) {
      const vf t = vpow<-1>(loadv(vals + j), p);
      vi pair;
      std::memcpy(&pair, pairs + j, sizeof(pair));
      pair = lane < (int32_t)(q - j) ? pair : -1;
      for (int k = 0; k < np; ++k) acc[k] += (vf)((vi)t & (pair == k));
    }
    q = 0;
  };
  for (int64_t v0 = 0; v0 < nv; v0 += kSegment) {
    const int64_t len = std::min(kSegment, nv - v0);
    const float* xs = x + v0 * VW;
    const float* ws = w + v0 * VW;
    sweep_masks<tb, to>(xs, ws, ld, len, thr, masks);
    for (int k = 0; k < np; ++k) {
      const lane_mask* mb = masks + k * kSegment;
      const float* xr = xs + (k / to) * ld;
      const float* wr = ws + (k % to) * ld;
      int64_t h = 0;
      for_each_hit(mb, len, [&](int64_t v) {
        h += pack_lanes(stage + h, absv(loadv(xr + v * VW) - loadv(wr + v * VW)) * scale[k],
                        mb[v]);
      });
      int64_t j = 0;
      for (; j + VW <= h; j += VW) acc[k] += vpow<-1>(loadv(stage + j), p);
      if (j < h) {
        if (q + (h - j) > kFlush) flush();
        const vf rest = loadv(stage + j);
        const vi pair = vi{} + k;
        std::memcpy(vals + q, &rest, sizeof(rest));
        std::memcpy(pairs + q, &pair, sizeof(pair));
        q += h - j;
      }
    }
  }
  flush();
  for (int k = 0; k < np; ++k) s[(k / to) * ldy + k % to] = hsum(acc[k]);
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
  if constexpr (K < 0) {
    run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
      SparseScratch scr;
      for_tiles(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
        lp_sum_tile_sparse<tb, to>(x + b * ld, w + o * ld, ld, nv, im + b * out + o,
                                   s + b * out + o, out, p, tau, scr);
      });
    });
  } else {
    run_jobs(pool, B, out, ld, [&](int64_t b0, int64_t b1, int64_t o0, int64_t o1) {
      for_tiles(b0, b1, o0, o1, [&](auto tb, auto to, int64_t b, int64_t o) {
        lp_sum_tile<K, tb, to>(x + b * ld, w + o * ld, ld, nv, im + b * out + o,
                               s + b * out + o, out, p);
      });
    });
  }
}

// Backward pass. Output rows are split into kParts fixed parts (whole weight rows each, so
// gw is written by one part only); each part sums its gx terms into its own [B, n] buffer and
// the buffers are added in a fixed order: deterministic whatever thread runs which part.
//
// Every term (an integer p, or a general p where most terms matter): inputs are taken in
// blocks of kIBlock coordinates, so that a part's x and gx blocks stay in cache while it sweeps
// its weight rows, and each tile computes a vector's terms at once (skipping a vector whose
// terms are all negligible at a general p).
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

// Sparse (a general p where few terms matter; see the top): a tile sweeps whole rows, and each
// vector with lanes that matter is recorded (coordinate, pair, lane mask) beside its packed
// scaled differences u = d / y. At a flush the gradients G = sign(u) max(|u|, 1e-30)^(p-1) are
// taken on whole vectors of the buffer, then put back in place vector by vector (expand_lanes)
// and added to gx and gw. Where pack_lanes and expand_lanes are not a few instructions
// (kLaneInstructions false), a vector with kWholeFrom lanes or more that matter is taken whole
// instead, and a lone lane is added by itself.
constexpr int kWholeFrom = 2;

template <int tb, int to>
inline void lp_bwd_tile_sparse(const float* x, const float* w, const float* iy, const float* g,
                               int64_t ldy, int64_t nv, float pm1, float tau, float* gx,
                               float* gw, int64_t ld, SparseScratch& scr) {
  constexpr int np = tb * to;
  lane_mask* const masks = scr.masks.data();
  float* const vals = scr.vals.data();
  int64_t* const tags = scr.tags.data();  // coordinate << 24 | pair << 16 | lane mask
  float sc[np], gg[np];
  vf thr[np];
  for (int r = 0; r < tb; ++r)
    for (int c = 0; c < to; ++c) {
      const int k = r * to + c;
      sc[k] = iy[r * ldy + c];
      gg[k] = g[r * ldy + c];
      thr[k] = vf{} + (sc[k] > 0.f ? tau / sc[k] : 0.f);
    }
  int64_t q = 0, nt = 0;  // lanes in vals, vectors in tags
  auto flush = [&]() {
    for (int64_t j = 0; j < q; j += VW) {
      const vf u = loadv(vals + j);
      vf t = absv(u);
      t = t > 1e-30f ? t : vf{} + 1e-30f;
      vf G = vpow<-1>(t, pm1);
      // sign(u) * G: 0 where u == 0, the sign bit of u otherwise
      const vi nz = u != 0.f;
      G = (vf)(((vi)G ^ ((vi)u & (int32_t)0x80000000)) & nz);
      std::memcpy(vals + j, &G, sizeof(G));
    }
    int64_t pos = 0;
    for (int64_t e = 0; e < nt; ++e) {
      const uint32_t m = tags[e] & 0xffff;
      const int k = (tags[e] >> 16) & 0xff;
      const int64_t i = tags[e] >> 24;
      float* gxr = gx + (k / to) * ld + i;
      float* gwr = gw + (k % to) * ld + i;
      if (kLaneInstructions || m == kAllLanes) {
        const vf G = (m == kAllLanes ? loadv(vals + pos) : expand_lanes(vals + pos, m)) * gg[k];
        vf cur = loadv(gxr) + G;
        std::memcpy(gxr, &cur, sizeof(cur));
        cur = loadv(gwr) - G;
        std::memcpy(gwr, &cur, sizeof(cur));
      } else {
        int64_t at = pos;
        for (uint32_t bits = m; bits; bits &= bits - 1) {
          const int l = __builtin_ctz(bits);
          const float G = vals[at++] * gg[k];
          gxr[l] += G;
          gwr[l] -= G;
        }
      }
      pos += __builtin_popcount(m);
    }
    q = nt = 0;
  };
  for (int64_t v0 = 0; v0 < nv; v0 += kSegment) {
    const int64_t len = std::min(kSegment, nv - v0);
    const float* xs = x + v0 * VW;
    const float* ws = w + v0 * VW;
    sweep_masks<tb, to>(xs, ws, ld, len, thr, masks);
    for (int k = 0; k < np; ++k) {
      const lane_mask* mb = masks + k * kSegment;
      const int r = k / to, c = k % to;
      for_each_hit(mb, len, [&](int64_t v) {
        const int64_t i = (v0 + v) * VW;
        // the gradient rows' lines, wanted at the flush
        __builtin_prefetch(gx + r * ld + i, 1);
        __builtin_prefetch(gw + c * ld + i, 1);
        const vf u = (loadv(xs + r * ld + v * VW) - loadv(ws + c * ld + v * VW)) * sc[k];
        uint32_t m = mb[v];
        if (!kLaneInstructions && __builtin_popcount(m) >= kWholeFrom) m = kAllLanes;
        q += pack_lanes(vals + q, u, m);
        tags[nt++] = i << 24 | (int64_t)k << 16 | m;
        if (q >= kFlush) flush();
      });
    }
  }
  flush();
}

// The share of the terms of the backward pass that are not negligible, estimated on up to 64
// pairs spread over [0, B) x [0, out) in a fixed order (deterministic).
inline double sampled_share(const float* x, const float* w, const float* iy, int64_t B,
                            int64_t out, int64_t n, float tau) {
  const int64_t pairs = std::min<int64_t>(64, B * out);
  int64_t hits = 0;
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t b = pairs == B * out ? k / out : k * B / pairs;
    const int64_t o = pairs == B * out ? k % out : (int64_t)((uint64_t)k * 2654435761u % out);
    const float sc = iy[b * out + o];
    const float thr = sc > 0.f ? tau / sc : 0.f;
    for (int64_t i = 0; i < n; ++i) hits += !(std::fabs(x[b * n + i] - w[o * n + i]) < thr);
  }
  return pairs ? (double)hits / (double)(pairs * n) : 1.0;
}

// Below this share of terms that matter, the sparse tiles; above it, with most lanes of most
// vectors to compute, whole vectors cost less (the crossover, measured on gaussian
// differences: about half where pack_lanes and expand_lanes are instructions, about 0.3 where
// they go lane by lane).
constexpr double kSparseBelow = kLaneInstructions ? 0.5 : 0.3;

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
  if (K < 0 && sampled_share(x0, w0, iy, B, out, n, tau) < kSparseBelow) {
    // Sparse tiles over groups of input rows and chunks of weight rows of about 256 KiB each
    // (the way of run_jobs), so that the gx rows a tile adds to stay in L2 while the weight
    // rows pass.
    const int64_t rows = std::max<int64_t>(TB, (256 * 1024) / (ld * 4) / TB * TB);
    const int64_t chunk = std::max<int64_t>(TO, (256 * 1024) / (ld * 4) / TO * TO);
    parallel_for(pool, parts, [&](int64_t part) {
      const int64_t o0 = std::min(out, part * per), o1 = std::min(out, o0 + per);
      float* gxp = gx.data() + part * B * ld;
      SparseScratch scr;
      for (int64_t b0 = 0; b0 < B; b0 += rows)
        for (int64_t c0 = o0; c0 < o1; c0 += chunk)
          for_tiles(b0, std::min(B, b0 + rows), c0, std::min(o1, c0 + chunk),
                    [&](auto tb, auto to, int64_t b, int64_t o) {
                      lp_bwd_tile_sparse<tb, to>(x + b * ld, w + o * ld, iy + b * out + o,
                                                 g + b * out + o, out, nv, pm1, tau,
                                                 gxp + b * ld, gwp + o * ld, ld, scr);
                    });
    });
  } else {
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
  }
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
