// Powers t^K of the l_p kernels (lp.cc) and the l_p weight decay (lp_decay.cc): K >= 0 is an
// integer exponent by repeated squaring (p = 8: t^8 in the sum, t^7 in the backward pass); K = -1
// is 2^(e log2 t) with the vector exp2/log2 below (polynomials fitted for float32, about 1 ulp,
// and cheaper than a general-purpose exp/log). dispatch_k turns the calls' exponent attribute
// into the template argument.
#pragma once

#include "common.h"

namespace {

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

}  // namespace
