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
from linf_jax.ops.xla import int_root, lp_backward_xla, lp_parts_xla, members_one_by_one

Array = jax.Array


def _native_parts(x, w, p, k):
    """``(m, s)`` of the stable form with the native CPU kernels (:func:`lp_parts_xla`)."""
    m = native.linf_max(x, w)
    return m, native.lp_sum(x, w, 1.0 / jnp.where(m > 0, m, 1.0), p, k)


def _lp_forward(x, w, p, k, use_native):
    if use_native:
        m, s = on_cpu(lambda x, w, p: _native_parts(x, w, p, k),
                      lambda x, w, p: lp_parts_xla(x, w, p, k), x, w, p)
    else:
        m, s = lp_parts_xla(x, w, p, k)
    root = int_root(s, k) if k is not None else jnp.exp(jnp.log(s) / p)
    # s ≥ 1 wherever m > 0 (the max term contributes 1); where m == 0 the distance is 0.
    return jnp.where(m > 0, m * root, 0.0)


def _lp_backward(x, w, y, g, p, k, use_native):
    """∂x[b,i] = Σ_o g·G, ∂w[o,i] = -Σ_b g·G with G = sign(d)(|d|/y)^(p-1), native or in the XLA
    code's shape for the platform (:func:`linf_jax.ops.xla.lp_backward_xla`)."""
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
