"""SortNet's inference neuron (Zhang, Jiang, He, Wang, NeurIPS 2022) as ops: a weighted sum of
the K largest ``|x_i − w_i|``, which generalises the ℓ∞-dist neuron.

With ``d_i = |x_i − w_i|`` sorted decreasingly, ``d_(1) ≥ d_(2) ≥ …``, ``K = min(k, n)`` and a
keep probability ``q ∈ (0, 1]``::

    u(x) = Σ_{j=1..K} ω_j d_(j),   ω_j = q (1 − q)^(j−1) / (1 − (1 − q)^K)

The weights are non-negative and sum to 1, so u is 1-Lipschitz from ℓ∞ to R and
non-decreasing in every ``d_i``; ``q = 1`` or ``K = 1`` is the ℓ∞-dist neuron ``max_i d_i``,
and there every function here calls the ℓ∞ op of :mod:`linf_jax.ops` (bit for bit the same).
The weights are computed in float64, normalised exactly and cast to the operands' dtype; the
official CUDA code's ``1e-10`` added before its division is left out.

Shapes as in :mod:`linf_jax.ops`: x ``[B, n]``, w ``[out, n]`` → ``[B, out]``. ``q`` and ``k``
are static (Python numbers). On the CPU, float32 operands take the native kernels
(``linf_jax/native/sort.cc``: per pair a threshold from the two largest distances of each
vector lane, then only the coordinates at or above it sorted) where the ℓ∞ pass family runs
native, the bounds where the bounds family does (:mod:`linf_jax.ops.dispatch`); the native
kernel is this neuron's top K in the ℓ∞ kernel's register tiles, and was measured about 17×
faster than the XLA code's forward pass and 27× its forward+backward at 512 × 1024 × 1024
(``benchmarks/sort_bench.py``). The XLA code has two shapes, by the platform a program is
lowered for (:func:`linf_jax.ops.xla.switch`):

* **CPU**: a scan over the input coordinates carrying, per output, the running top K as K
  ``[B, tile]`` arrays, updated by the branchless insertion network
  ``r[j] ← max(r[j], min(r[j+1], v))`` (ascending slots, ``r[K−1] ← max(r[K−1], v)``); when
  differentiated, the K source coordinates ride along, selected by the comparisons ``v > r[j]``.
  One coordinate per scan step: XLA's CPU backend compiles each slot's update as a loop fusion
  of its own, which recomputes the updates of the slots above it, so unrolled blocks of
  coordinates were measured slower here than in the ℓ∞ scan. The weight rows are taken in tiles
  that keep the carry near ``CPU_CARRY_ELEMENTS`` elements per array.
* **GPU/TPU**: ``lax.top_k`` over chunks of the ``[B, out, chunk]`` distances, written out
  (``ACCEL_SORT_ELEMENTS`` elements per chunk) after the carried top K.

Ties and padding. The carry starts at −1, below every distance, and a value enters a slot only
when it is strictly larger: of equal distances the earlier coordinate ranks first (first-index
tie-breaking, as ``np.argsort(-d, kind="stable")``; ``lax.top_k`` puts the lower position first
and the carried, earlier coordinates come first). The zero-padded coordinates at the end of the
last chunk (and of the native kernels' last vector) never displace one of the ``K ≤ n`` real
coordinates held.

Backward (custom VJP): ``∂u/∂x_i = ω_j sign(x_i − w_i) = −∂u/∂w_i`` at the coordinate of rank
j (zero where x equals w); gathers and scatter-adds of size ``K × B × out`` at the stored
coordinates, independent of n. Residuals: x, w and the ``[K, B, out]`` coordinates. Under
``vmap`` the CPU program runs the members one after the other
(:func:`linf_jax.ops.xla.members_one_by_one`).

Bounds. u is non-decreasing in every ``d_i``, and over a box each ``d_i`` ranges over
``[max(l − w, w − u, 0), max(u − w, w − l)]`` independently of the others, both ends attained
at once (the clip corner ``z = clip(w, l, u)`` and the far corner), so
``lo = Σ ω_j (d^lo)_(j)`` and ``hi = Σ ω_j (d^hi)_(j)`` are the exact interval of each neuron.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linf_jax import native
from linf_jax.ops import xla
from linf_jax.ops.dispatch import native_ok
from linf_jax.ops.native_cpu import on_cpu

Array = jax.Array

#: CPU shape: ``B·tile`` elements per carry array (a ``[B, tile]`` slot of the running top K).
CPU_CARRY_ELEMENTS = 1 << 14
#: GPU/TPU shape: elements ``B·out·chunk`` of one chunk of distances written out for
#: ``lax.top_k`` (256 MiB at float32).
ACCEL_SORT_ELEMENTS = 1 << 26


# --------------------------------------------------------------------------------------------
# arguments and weights
# --------------------------------------------------------------------------------------------


def check_args(q, k) -> tuple[float, int]:
    """``(q, k)`` as a Python float and int, or a one-line ``ValueError``: q a static number in
    ``(0, 1]``, k (``top_k``) a static integer ``≥ 1``."""
    try:
        qf = None if isinstance(q, (bool, np.bool_, str)) else xla.static_number(q)
    except (ValueError, TypeError):
        qf = None
    if qf is None or not 0.0 < qf <= 1.0:
        raise ValueError(f"q={q!r} is not allowed: the keep probability q must be a static "
                         "number in (0, 1]")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k={k!r} is not allowed: k (top_k) must be a static integer >= 1")
    return qf, int(k)


def sort_weights(q, k, n) -> np.ndarray:
    """``ω_j = q (1 − q)^(j−1) / (1 − (1 − q)^K)`` for ``j = 1..K``, ``K = min(k, n)``: a float64
    NumPy array, non-negative and summing to 1 (``[1, 0, …, 0]`` at q = 1)."""
    q, k = check_args(q, k)
    kk = min(k, int(n))
    if kk < 1:
        raise ValueError(f"n={n!r} is not allowed: the input dimension must be >= 1")
    c = q * (1.0 - q) ** np.arange(kk, dtype=np.float64)
    # Σ_j c_j = 1 − (1 − q)^K in exact arithmetic; dividing by the sum itself makes the float64
    # weights sum to 1 to rounding (and K = 1 exactly [1]).
    return c / c.sum()


def _weighted(vals, q, kk):
    """``Σ_j ω_j d_(j)`` over the slots ``vals`` (K ``[B, out]`` arrays, largest first), the
    largest weight first."""
    om = sort_weights(q, kk, kk).astype(vals[0].dtype)
    y = vals[0] * om[0]
    for j in range(1, kk):
        y = y + vals[j] * om[j]
    return y


def _abs_terms(xs, w):
    """``d = |x − w|`` (broadcasting column or chunk operands)."""
    return jnp.abs(xs[0] - w)


def _lo_terms(xs, w):
    """``min_{l ≤ z ≤ u} |z − w| = max(l − w, w − u, 0)`` for ``xs = (l, u)``."""
    return jnp.maximum(jnp.maximum(xs[0] - w, w - xs[1]), 0.0)


def _hi_terms(xs, w):
    """``max_{l ≤ z ≤ u} |z − w| = max(u − w, w − l)`` for ``xs = (l, u)``."""
    return jnp.maximum(xs[1] - w, w - xs[0])


# --------------------------------------------------------------------------------------------
# CPU shape: the insertion network in a scan over the coordinates
# --------------------------------------------------------------------------------------------


def _insert(vals, v):
    """``v`` inserted into the ascending top K ``vals`` (the smallest dropped), branchless."""
    kk = len(vals)
    new = [jnp.maximum(vals[j], jnp.minimum(vals[j + 1], v)) for j in range(kk - 1)]
    return new + [jnp.maximum(vals[kk - 1], v)]


def _insert_indexed(vals, idx, v, j):
    """:func:`_insert` with the coordinates ``idx``: v enters where it is strictly larger than
    a slot, so an equal earlier coordinate stays above it."""
    kk = len(vals)
    gt = [v > vals[t] for t in range(kk)]
    new_i = [jnp.where(gt[t + 1], idx[t + 1], jnp.where(gt[t], j, idx[t]))
             for t in range(kk - 1)]
    new_i.append(jnp.where(gt[kk - 1], j, idx[kk - 1]))
    return _insert(vals, v), new_i


def cpu_tile(rows) -> int:
    """Weight rows per tile of the CPU scan: about ``CPU_CARRY_ELEMENTS / rows``, a multiple of
    8 in ``[8, 128]``."""
    return max(8, min(128, CPU_CARRY_ELEMENTS // max(xla._planned(rows), 1)) // 8 * 8)


def scan_coordinates(step, init, xs: tuple[Array, ...], w: Array, tile: int | None = None):
    """``carry = step(carry, xjs, wj, j)`` over every input coordinate j, in order: ``xjs`` the
    columns ``[B, 1]`` of the arrays ``xs`` (each ``[B, n]``), ``wj`` the column ``[1, tile]``
    of w. ``init``: a pytree of ``[B, out]`` arrays; the weight rows (and the carry's columns)
    in tiles of ``tile`` (:func:`cpu_tile`)."""
    b = xs[0].shape[0]
    tile = tile or cpu_tile(b)
    xt = jnp.stack([a.T for a in xs], axis=1)  # [n, len(xs), B]

    def run(w_tile, init_tile):
        def body(carry_j, col):
            carry, j = carry_j
            xj, wj = col
            cols = tuple(xj[i][:, None] for i in range(len(xs)))
            return (step(carry, cols, wj[None, :], j), j + 1), None

        (carry, _), _ = lax.scan(body, (init_tile, jnp.int32(0)), (xt, w_tile.T))
        return carry

    return xla.over_out_tiles(run, w, init, tile)


def _topk_cpu(terms, xs, w, kk, indexed):
    """Per term function, ``(values, coordinates)``: the top K of ``terms(xs, w)`` over the
    coordinates, each a list of K ``[B, out]`` arrays, largest first (coordinates None unless
    ``indexed``)."""
    shape = (xs[0].shape[0], w.shape[0])
    start = [jnp.full(shape, -1, jnp.result_type(*xs, w))] * kk
    zeros = [jnp.zeros(shape, jnp.int32)] * kk

    def step(carry, cols, wj, j):
        new = []
        for fn, slots in zip(terms, carry, strict=True):
            v = fn(cols, wj)
            new.append(_insert_indexed(*slots, v, j) if indexed else (_insert(slots[0], v),))
        return tuple(new)

    init = tuple((start, zeros) if indexed else (start,) for _ in terms)
    final = scan_coordinates(step, init, xs, w)
    return tuple((s[0][::-1], s[1][::-1] if indexed else None) for s in final)


# --------------------------------------------------------------------------------------------
# GPU/TPU shape: lax.top_k over chunks of the coordinates
# --------------------------------------------------------------------------------------------


def accel_plan(rows, out: int, n: int) -> tuple[int, int]:
    """``(chunk, steps)``: coordinates per step and steps of the GPU/TPU shape, the widest
    balanced chunks of at most ``ACCEL_SORT_ELEMENTS`` distances (at least one coordinate)."""
    chunk = max(1, min(n, ACCEL_SORT_ELEMENTS // max(xla._planned(rows) * out, 1)))
    steps = -(-n // chunk)
    return -(-n // steps), steps


def _topk_accel(terms, xs, w, kk, indexed):
    """:func:`_topk_cpu` in the GPU/TPU shape."""
    n = w.shape[1]
    chunk, steps = accel_plan(xs[0].shape[0], w.shape[0], n)
    shape = (xs[0].shape[0], w.shape[0], kk)
    dtype = jnp.result_type(*xs, w)

    def step(carry, xcs, wc, start):
        new = []
        cols = tuple(a[:, None, :] for a in xcs)
        for fn, (vals, idx) in zip(terms, carry, strict=True):
            both = jnp.concatenate([vals, fn(cols, wc[None])], axis=-1)  # carried ones first
            top, pos = lax.top_k(both, kk)
            if indexed:
                pos = pos.astype(jnp.int32)
                kept = jnp.take_along_axis(idx, jnp.minimum(pos, kk - 1), axis=-1)
                idx = jnp.where(pos < kk, kept, start + pos - kk)
            new.append((top, idx))
        return tuple(new), None

    init = tuple((jnp.full(shape, -1, dtype), jnp.zeros(shape, jnp.int32)) for _ in terms)
    if steps == 1:
        final = step(init, xs, w, 0)[0]
    else:
        starts = jnp.arange(steps, dtype=jnp.int32) * chunk
        parts = (tuple(xla._chunks(a, chunk, steps) for a in xs), xla._chunks(w, chunk, steps),
                 starts)
        final = lax.scan(lambda c, t: step(c, *t), init, parts)[0]
    return tuple(([v[..., j] for j in range(kk)], [i[..., j] for j in range(kk)]
                  if indexed else None) for v, i in final)


def topk_xla(terms, xs, w, kk: int, indexed: bool):
    """Per term function of ``terms``, ``(values, coordinates)`` of its top K (K ``[B, out]``
    arrays each, largest first), in the shape of the platform lowered for."""
    return xla.switch(
        (xs, w), lambda xs, w: _topk_cpu(terms, xs, w, kk, indexed),
        lambda xs, w: _topk_accel(terms, xs, w, kk, indexed))


# --------------------------------------------------------------------------------------------
# the neuron: value, forward with coordinates, backward
# --------------------------------------------------------------------------------------------


def _flat(rows, idx, n):
    """Flat positions ``rows·n + idx`` into an ``[R, n]`` array."""
    return rows * n + idx


def sort_scatter(x, w, idx, g, q):
    """``(∂x, ∂w)``: ``g·ω_j·sign(x_i − w_i)`` added at ``x[b, i]`` and subtracted at
    ``w[o, i]`` for the coordinate ``i = idx[j, b, o]`` of rank j (``[K, B, out]``): the ℓ∞
    op's scatter with K coordinates per output."""
    kk, b, out = idx.shape
    n = x.shape[1]
    om = jnp.asarray(sort_weights(q, kk, kk), x.dtype)[:, None, None]
    fx = _flat(jnp.arange(b, dtype=jnp.int32)[None, :, None], idx, n)
    fw = _flat(jnp.arange(out, dtype=jnp.int32)[None, None, :], idx, n)
    mode = "promise_in_bounds"
    d = x.ravel().at[fx].get(mode=mode) - w.ravel().at[fw].get(mode=mode)
    gs = (g.astype(x.dtype)[None] * om * jnp.sign(d)).ravel()
    gx = jnp.zeros(b * n, x.dtype).at[fx.ravel()].add(gs, mode=mode)
    gw = jnp.zeros(out * n, w.dtype).at[fw.ravel()].add(-gs, mode=mode)
    return gx.reshape(b, n), gw.reshape(out, n)


def _value(x, w, q, kk):
    (vals, _), = topk_xla((_abs_terms,), (x,), w, kk, False)
    return _weighted(vals, q, kk)


def _value_indexed(x, w, q, kk):
    (vals, idx), = topk_xla((_abs_terms,), (x,), w, kk, True)
    return _weighted(vals, q, kk), jnp.stack(idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def sort_dist_xla(x: Array, w: Array, q: float, kk: int) -> Array:
    """The XLA code of :func:`sort_dist` for ``0 < q < 1`` and ``2 ≤ kk = K ≤ n``."""
    return xla.members_one_by_one(lambda x, w: _value(x, w, q, kk))(x, w)


def _sort_fwd(x, w, q, kk):
    y, idx = xla.members_one_by_one(lambda x, w: _value_indexed(x, w, q, kk))(x, w)
    return y, (x, w, idx)


def _sort_bwd(q, kk, res, g):
    return xla.members_one_by_one(lambda x, w, idx, g: sort_scatter(x, w, idx, g, q))(*res, g)

sort_dist_xla.defvjp(_sort_fwd, _sort_bwd)


# --------------------------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------------------------


def _bounds_value(lower, upper, w, q, kk):
    (lv, _), (hv, _) = topk_xla((_lo_terms, _hi_terms), (lower, upper), w, kk, False)
    return _weighted(lv, q, kk), _weighted(hv, q, kk)


def _bounds_indexed(lower, upper, w, q, kk):
    (lv, li), (hv, hi) = topk_xla((_lo_terms, _hi_terms), (lower, upper), w, kk, True)
    return _weighted(lv, q, kk), _weighted(hv, q, kk), jnp.stack(li), jnp.stack(hi)


def bounds_scatter(lower, upper, w, lo_idx, hi_idx, g_lo, g_hi, q):
    """``(∂lower, ∂upper, ∂w)`` of the bounds: the terms at the K stored coordinates of each
    output (``[K, B, out]``) gathered, differentiated as written (:func:`_lo_terms`,
    :func:`_hi_terms`), weighted by ω and scattered back."""
    kk, b, out = lo_idx.shape
    n = lower.shape[1]
    om = jnp.asarray(sort_weights(q, kk, kk), lower.dtype)[:, None, None]
    rows = jnp.arange(b, dtype=jnp.int32)[None, :, None]
    cols = jnp.arange(out, dtype=jnp.int32)[None, None, :]
    mode = "promise_in_bounds"
    grads = [jnp.zeros(b * n, lower.dtype), jnp.zeros(b * n, upper.dtype),
             jnp.zeros(out * n, w.dtype)]
    for terms, idx, g in ((_lo_terms, lo_idx, g_lo), (_hi_terms, hi_idx, g_hi)):
        fx, fw = _flat(rows, idx, n), _flat(cols, idx, n)
        at = (lower.ravel().at[fx].get(mode=mode), upper.ravel().at[fx].get(mode=mode),
              w.ravel().at[fw].get(mode=mode))
        _, vjp = jax.vjp(lambda lo, up, wv: terms((lo, up), wv), *at)
        parts = vjp(g.astype(lower.dtype)[None] * om)
        for i, (flat, part) in enumerate(zip((fx, fx, fw), parts, strict=True)):
            grads[i] = grads[i].at[flat.ravel()].add(part.ravel(), mode=mode)
    return grads[0].reshape(b, n), grads[1].reshape(b, n), grads[2].reshape(out, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sort_bounds_xla(lower, upper, w, q: float, kk: int):
    """The XLA code of :func:`sort_dist_bounds` for ``0 < q < 1`` and ``2 ≤ kk = K ≤ n``."""
    return xla.members_one_by_one(lambda *a: _bounds_value(*a, q, kk))(lower, upper, w)


def _sort_bounds_fwd(lower, upper, w, q, kk):
    lo, hi, lo_idx, hi_idx = xla.members_one_by_one(lambda *a: _bounds_indexed(*a, q, kk))(
        lower, upper, w)
    return (lo, hi), (lower, upper, w, lo_idx, hi_idx)


def _sort_bounds_bwd(q, kk, res, gs):
    return xla.members_one_by_one(lambda *a: bounds_scatter(*a, q))(*res, *gs)

sort_bounds_xla.defvjp(_sort_bounds_fwd, _sort_bounds_bwd)


# --------------------------------------------------------------------------------------------
# native CPU kernels (linf_jax/native/sort.cc)
# --------------------------------------------------------------------------------------------


def _omega(q, kk):
    return sort_weights(q, kk, kk).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def sort_native(x: Array, w: Array, q: float, kk: int) -> Array:
    """The native kernels of :func:`sort_dist` (float32): the forward pass keeps the K
    coordinates and signs, the backward pass is one custom call doing both scatter-adds."""
    return native.sort_max(x, w, _omega(q, kk))


def _sort_native_fwd(x, w, q, kk):
    y, idx, sign = native.sort_fwd(x, w, _omega(q, kk))
    return y, (x, w, idx, sign)


def _sort_native_bwd(q, kk, res, g):
    x, w, idx, sign = res
    return native.sort_bwd(idx, sign, g, _omega(q, kk), x.shape, w.shape)

sort_native.defvjp(_sort_native_fwd, _sort_native_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sort_bounds_native(lower, upper, w, q: float, kk: int):
    """The native kernel of :func:`sort_dist_bounds`' values (float32); differentiated, the
    XLA code's forward and backward passes (:func:`sort_bounds_xla`)."""
    return native.sort_bounds(lower, upper, w, _omega(q, kk))


sort_bounds_native.defvjp(_sort_bounds_fwd, _sort_bounds_bwd)


# --------------------------------------------------------------------------------------------
# public functions (exported by linf_jax.ops)
# --------------------------------------------------------------------------------------------


def _ops():
    from linf_jax import ops  # the package imports this module: looked up at call time

    return ops


def sort_dist(x: Array, w: Array, q, k: int = 10) -> Array:
    """SortNet's inference neuron ``y[b, o] = Σ_{j ≤ K} ω_j d_(j)`` of the distances
    ``d_i = |x[b, i] − w[o, i]|`` sorted decreasingly, ``K = min(k, n)``, ω of
    :func:`sort_weights`. x ``[B, n]``, w ``[out, n]`` → ``[B, out]``; q a static number in
    ``(0, 1]``, k a static integer ``≥ 1``. ``q = 1`` or ``K = 1``: :func:`linf_jax.ops.linf_dist`.

    Backward: ``∂y/∂x_i = ω_j sign(x_i − w_i) = −∂y/∂w_i`` at the coordinate of rank j (equal
    distances ranked by coordinate, first first; zero gradient where x equals w)."""
    q, k = check_args(q, k)
    x, w = jnp.asarray(x), jnp.asarray(w)
    kk = min(k, x.shape[-1])
    if q == 1.0 or kk <= 1:
        return _ops().linf_dist(x, w)
    # The ℓ∞ family's choice (ops.dispatch): the native kernel is this neuron's running top K
    # in the register tiles of the ℓ∞ kernel.
    if native_ok(x, w, family="linf"):
        return on_cpu(lambda x, w: sort_native(x, w, q, kk),
                      lambda x, w: sort_dist_xla(x, w, q, kk), x, w)
    return sort_dist_xla(x, w, q, kk)


def sort_dist_bounds(lower: Array, upper: Array, w: Array, q, k: int = 10):
    """Exact interval ``(lo, hi)`` of :func:`sort_dist` over the box ``lower ≤ z ≤ upper``, per
    output: ``lo = Σ ω_j (d^lo)_(j)``, ``hi = Σ ω_j (d^hi)_(j)`` with
    ``d^lo_i = max(l_i − w_i, w_i − u_i, 0)`` and ``d^hi_i = max(u_i − w_i, w_i − l_i)``
    (attained at ``z = clip(w, l, u)`` and at the far corner). Each ``[B, out]``;
    differentiable (custom VJP: the terms at the K stored coordinates). ``q = 1`` or ``K = 1``:
    :func:`linf_jax.ops.linf_dist_bounds`."""
    q, k = check_args(q, k)
    lower, upper, w = jnp.asarray(lower), jnp.asarray(upper), jnp.asarray(w)
    kk = min(k, lower.shape[-1])
    if q == 1.0 or kk <= 1:
        return _ops().linf_dist_bounds(lower, upper, w)
    if native_ok(lower, upper, w, family="bounds"):
        return on_cpu(lambda *a: sort_bounds_native(*a, q, kk),
                      lambda *a: sort_bounds_xla(*a, q, kk), lower, upper, w)
    return sort_bounds_xla(lower, upper, w, q, kk)


def grouped_sort_dist(x: Array, w: Array, q, k: int = 10, groups: int = 1) -> Array:
    """Grouped :func:`sort_dist`: x ``[B, n]`` split into ``groups`` contiguous blocks,
    w ``[out, n // groups]``; output unit o sees block ``o // (out // groups)`` only (K is
    ``min(k, n // groups)``)."""
    check_args(q, k)
    if groups == 1:
        return sort_dist(x, w, q, k)
    ops = _ops()
    x, w = jnp.asarray(x), jnp.asarray(w)  # JAX arrays before the vmap (see grouped_dist)
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    y = jax.vmap(lambda xg, wg: sort_dist(xg, wg, q, k))(ops._split_groups(x, groups), wg)
    return ops._merge_groups(y)


def grouped_sort_bounds(lower: Array, upper: Array, w: Array, q, k: int = 10,
                        groups: int = 1):
    """Grouped :func:`sort_dist_bounds`."""
    check_args(q, k)
    if groups == 1:
        return sort_dist_bounds(lower, upper, w, q, k)
    ops = _ops()
    lower, upper, w = jnp.asarray(lower), jnp.asarray(upper), jnp.asarray(w)
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    lo, hi = jax.vmap(lambda lg, ug, wg: sort_dist_bounds(lg, ug, wg, q, k))(
        ops._split_groups(lower, groups), ops._split_groups(upper, groups), wg)
    return ops._merge_groups(lo), ops._merge_groups(hi)


def conv_sort_dist(x: Array, w: Array, q, k: int = 10, *, stride: int = 1, padding: int = 0,
                   dilation: int = 1, groups: int = 1) -> Array:
    """:func:`sort_dist` between every C·k·k patch of NHWC ``x`` and every filter
    ``w [out, C/groups, kh, kw]`` (patches as :func:`linf_jax.ops.extract_patches`, K at most
    ``C/groups·kh·kw``). Returns ``[B, H', W', out]``."""
    check_args(q, k)
    out, _, ks, _ = w.shape
    patches = _ops().extract_patches(x, ks, stride, padding, dilation)
    b, h, wd, f = patches.shape
    y = grouped_sort_dist(patches.reshape(-1, f), w.reshape(out, -1), q, k, groups)
    return y.reshape(b, h, wd, out)


def conv_sort_bounds(lower: Array, upper: Array, w: Array, q, k: int = 10, *, stride: int = 1,
                     padding: int = 0, dilation: int = 1, groups: int = 1):
    """Exact interval of :func:`conv_sort_dist` over an elementwise input box (padded taps are
    the constant 0: lower = upper = 0 there)."""
    check_args(q, k)
    out, _, ks, _ = w.shape
    ops = _ops()
    pl = ops.extract_patches(lower, ks, stride, padding, dilation)
    pu = ops.extract_patches(upper, ks, stride, padding, dilation)
    b, h, wd, f = pl.shape
    lo, hi = grouped_sort_bounds(pl.reshape(-1, f), pu.reshape(-1, f), w.reshape(out, -1), q, k,
                                 groups)
    return lo.reshape(b, h, wd, out), hi.reshape(b, h, wd, out)
