"""The ℓp distance once the kernel choice is made: the stable form's passes with the native
CPU kernels or the XLA code, chosen by an argument (:func:`linf_jax.ops.lp_dist` makes the
choice; :mod:`linf_jax.ops.calibration` times both).

``m · (Σ (|d|/m)^p)^(1/p)`` with ``m = max|d|``: one max pass, one sum pass, and the analytic
backward pass ``∂y/∂d = sign(d)·(|d|/y)^(p−1)`` (docs/METHOD.md §2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from linf_jax import native
from linf_jax.ops.native_cpu import on_cpu
from linf_jax.ops.xla import (
    int_root,
    lp_backward_xla,
    max_abs_diff,
    members_one_by_one,
    pow_p,
    scan_blocks,
)

Array = jax.Array


def _row_max(x: Array, w: Array, use_native: bool) -> Array:
    """``max_i |x_bi - w_oi|`` (no gradient: the ℓp passes' scale)."""
    if use_native:
        return on_cpu(native.linf_max, max_abs_diff, x, w)
    return max_abs_diff(x, w)


def _lp_forward(x, w, p, k, use_native):
    m = _row_max(x, w, use_native)
    inv_m = 1.0 / jnp.where(m > 0, m, 1.0)

    def step(carry, xj, wj, _):  # the scale 1/m rides in the carry, tiled with the weight rows
        s, im = carry
        return s + pow_p(jnp.abs(xj - wj) * im, p, k), im

    def xla_sum(x, w, inv_m):
        return scan_blocks(step, (jnp.zeros_like(inv_m), inv_m), x, w)[0]

    if use_native:
        s = on_cpu(lambda x, w, im: native.lp_sum(x, w, im, p, k), xla_sum, x, w, inv_m)
    else:
        s = xla_sum(x, w, inv_m)
    root = int_root(s, k) if k is not None else jnp.exp(jnp.log(s) / p)
    # s ≥ 1 wherever m > 0 (the max term contributes 1); where m == 0 the distance is 0.
    return jnp.where(m > 0, m * root, 0.0)


def _lp_backward(x, w, y, g, p, k, use_native):
    """∂x[b,i] = Σ_o g·G, ∂w[o,i] = -Σ_b g·G with G = sign(d)(|d|/y)^(p-1), chunked over o and,
    for wide inputs, tiled over i: every coordinate's G needs only its own d and y, so input
    tiles are independent, and each chunk's ``[B, oc, tile]`` temporaries stay bounded
    (``ops.xla.LP_BWD_ELEMENTS``) however wide the input is."""
    if use_native:
        return on_cpu(lambda x, w, y, g: native.lp_bwd(x, w, 1.0 / jnp.where(y > 0, y, 1.0), g,
                                                       p, k),
                      lambda x, w, y, g: lp_backward_xla(x, w, y, g, p, k), x, w, y, g)
    return lp_backward_xla(x, w, y, g, p, k)


def _one_by_one_unless_native(fn, use_native: bool):
    """``fn`` as is for the native kernels (they take vmapped axes as leading dimensions and
    loop over them inside one call), else :func:`members_one_by_one`."""
    return fn if use_native else members_one_by_one(fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lp_dist_with(x, w, p, k: int | None, use_native: bool):
    """``||x[b] - w[o]||_p`` with the sum and backward passes native (``use_native``, float32
    operands, the CPU) or the XLA code: the ℓp distance of :func:`linf_jax.ops.lp_dist` once the
    kernel choice is made. ``k``: an integer p in 1..8 (repeated squaring), or None."""
    fwd = functools.partial(_lp_forward, k=k, use_native=use_native)
    return _one_by_one_unless_native(fwd, use_native)(x, w, p)


def _lp_fwd(x, w, p, k, use_native):
    fwd = functools.partial(_lp_forward, k=k, use_native=use_native)
    y = _one_by_one_unless_native(fwd, use_native)(x, w, p)
    return y, (x, w, y, p)


def _lp_bwd(k, use_native, res, g):
    x, w, y, p = res
    # under vmap on the CPU, one member after the other: batched, the chunk temporaries grow
    # K-fold and fall out of cache (see ops.xla.members_one_by_one)
    bwd = functools.partial(_lp_backward, k=k, use_native=use_native)
    gx, gw = _one_by_one_unless_native(bwd, use_native)(x, w, y, g, p)
    return gx, gw, jnp.zeros_like(p)

lp_dist_with.defvjp(_lp_fwd, _lp_bwd)
