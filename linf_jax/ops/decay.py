"""The direction of the ℓp weight decay, ``∇(½‖w‖_p²)`` per row, once the kernel choice is
made: the native CPU kernel or the XLA code, chosen by an argument
(:func:`linf_jax.ops.lp_decay_direction` makes the choice; :mod:`linf_jax.optim` applies it;
docs/METHOD.md §6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from linf_jax import native
from linf_jax.ops.native_cpu import on_cpu


def lp_decay_direction_with(w, p, use_native: bool):
    """``(|w|/‖w‖_p)^(p−2) · w`` per row (first axis = output neuron), stable for p up to 1000
    (computed from ``u = |w| / max|w|``) and exact at p = ∞ (largest |w| only).

    With ``t = u^(p−2)``: ``‖u‖_p^p = Σ t·u²`` and the factor is ``t · (Σ t·u²)^(−(p−2)/p)``.
    A Python-number p = ∞ (the train step's final phase) is a select that XLA fuses into the
    optimiser's update loop. Any other p, with the native CPU kernels (``use_native``: float32,
    the CPU), is one custom call (``native.lp_decay``: one read of w and one write of the
    direction, a traced p = ∞ included, no ``lax.cond``; XLA's version writes and re-reads
    several w-sized temporaries).
    Without them a Python-number p is specialised (an integer p takes ``t`` by repeated
    multiplication, no exp/log), and a traced p computes ``t`` in log space, ``lax.cond``
    skipping the exp/log at p = ∞."""
    static = isinstance(p, (int, float))
    if static and (p < 2 or math.isnan(p)):
        raise ValueError(f"lp_decay_direction: p={p} is not allowed: p >= 2 or +inf")
    rows = w.reshape(w.shape[0], -1)
    if static and math.isinf(p):  # a select that fuses into the optimiser's update loop
        return _infinite_direction(rows).reshape(w.shape)

    def xla(rows):
        if static:
            return _finite_direction(rows, float(p))
        q = jnp.asarray(p, jnp.float32)
        return jax.lax.cond(jnp.isfinite(q), _finite_direction, _infinite_direction, rows, q)

    if use_native:  # the custom call on the CPU, XLA elsewhere
        k = int(p) - 2 if static and p == int(p) and p <= 10 else None
        return on_cpu(lambda rows: native.lp_decay(rows, p, k), xla, rows).reshape(w.shape)
    return xla(rows).reshape(w.shape)


def _row_abs_max(rows):
    # From w directly (max and −min): |w| is never written out as an array of its own.
    return jnp.maximum(rows.max(axis=1, keepdims=True), -rows.min(axis=1, keepdims=True))


def _finite_direction(rows, p):
    m = _row_abs_max(rows)
    u = jnp.abs(rows) / jnp.where(m > 0, m, 1.0)
    if isinstance(p, float) and p == int(p) and p <= 64:
        t = jax.lax.integer_pow(u, int(p) - 2)  # repeated multiplication; u in [0, 1]
    else:
        t = jnp.where(u > 0, jnp.exp((p - 2.0) * jnp.log(jnp.where(u > 0, u, 1.0))), 0.0)
    s = jnp.maximum((t * u * u).sum(axis=1, keepdims=True), 1.0)  # in [1, n]
    return t * jnp.exp(-(p - 2.0) / p * jnp.log(s)) * rows


def _infinite_direction(rows, p=None):
    del p
    m = _row_abs_max(rows)
    return jnp.where((jnp.abs(rows) == m) & (m > 0), rows, 0.0)
