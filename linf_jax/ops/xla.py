"""The XLA code of the distance kernels, shaped for the platform it is lowered for.

What runs on accelerators, and on the CPU where the native kernels are not used
(:mod:`linf_jax.ops.dispatch`). Pure, jit-able, vmap-able functions. Every pass has two
shapes, and ``lax.platform_dependent`` puts the one of the platform a program is lowered for
into it, whichever host traced it:

* **CPU**: a ``lax.scan`` over blocks of ``_BLOCK`` input coordinates; each block is unrolled
  into ``_BLOCK`` elementwise updates of a running reduction of shape ``(B, tile)``, which XLA
  fuses into one loop, with the weight rows taken in tiles of ``_OUT_TILE`` so that the carry
  stays in cache. Many short sequential steps: what a CPU core runs fastest (BENCHMARKS.md).
* **GPU and TPU**: few wide steps. Each pass is a reduction over a chunk of input coordinates of
  the ``(B, out, chunk)`` expression ``|x[b, i] − w[o, i]|`` (or its ℓp terms), which XLA
  fuses into one reduction kernel without writing the expression out; the chunk is as wide as
  ``ACCEL_ELEMENTS`` allows (``B·out·chunk`` elements), all of n in one step where it fits, so a
  512 × 5120 → 5120 layer takes 51 steps forward and as many backward instead of 12,840
  (``benchmarks/loop_count.py``). The ℓp forward is one pass (an online max with the sum
  rescaled when the max grows); its backward reduces the same chunk twice, into ∂x and ∂w.

Common to both:

* ℓ∞ forward under differentiation keeps a running first arg-max; the backward pass is two
  scatter-adds of ``g · sign(d[i*])`` of size ``B × out``.
* ℓp (with :mod:`linf_jax.ops`'s composite): the stable form ``m · (Σ (|d|/m)^p)^(1/p)`` and
  the analytic backward ``∂y/∂x_i = sign(d_i) (|d_i|/y)^(p-1)`` (docs/METHOD.md §2).
* Small integer p (≤ 8) uses repeated multiplication instead of ``exp(p·log t)``.
* Other p, in the CPU shape at float32: ``t^p = 2^(p·log2 t)`` by polynomials, the exponent
  taken from the bits (:func:`pow_cpu`): about half the instructions per term of XLA's ``exp``
  and ``log`` in the sum pass. Once p is large enough that every term below a threshold
  ``τ ≥ NEAR_ONE`` is negligible (:func:`negligible_below`: all of them together move the
  float32 sum by less than its rounding), those terms are 0 and the others take a shorter
  polynomial with no exponent split (:func:`pow_near_one`); a ``lax.cond`` on p picks the
  branch at run time.
* Zero padding of the input dimension is exact for every reduction here (padded coordinates
  give ``|d| = 0``, which never raises a max, adds 0 to a p-sum and has ``sign(d) = 0``).
* Under ``vmap`` (ensemble members, groups) the CPU program runs the members one after the
  other and the GPU/TPU program batches them (:func:`members_one_by_one`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from linf_jax.ops.scoped import Scoped

Array = jax.Array

# CPU shape. Input coordinates per unrolled scan step: smaller blocks were measured much slower
# on the CPU (BENCHMARKS.md); the input dimension is zero-padded to a multiple of it.
_BLOCK = 16
_OUT_TILE = 128  # weight rows per tile: keeps the (B, tile) carry (and arg-max) in cache
OUT_CHUNK = 16  # outputs per chunk in the ℓp backward pass
LP_BWD_ELEMENTS = 1 << 21  # B·chunk·tile elements per ℓp backward step (see _lp_backward_cpu)
# GPU/TPU shape: elements B·out·chunk of one step's reduction. XLA fuses the expression into the
# reduction and never writes it out; were it written out (a backward pass's G, reduced twice,
# may be) it would take 1 GiB at float32.
ACCEL_ELEMENTS = 1 << 28
MAX_INT_P = 8  # integer p up to this use repeated multiplication
TINY = 1e-30
# ℓp in the CPU shape at float32 (pow_cpu, pow_near_one): polynomial coefficients, constant term
# first, float32 numbers fitted one after the other (near-minimax in relative error).
#: log2(1 + r) / r for √½ − 1 ≤ r < √2 − 1, degree 7: relative error 1.8e-7.
LOG2_FULL = (1.442694902420044, -0.7213519811630249, 0.48092547059059143, -0.360269695520401,
             0.28708356618881226, -0.24857552349567413, 0.233984112739563, -0.14651350677013397)
#: log2(1 + r) / r for NEAR_ONE − 1 ≤ r ≤ 2^-10, degree 6: relative error 7.1e-8.
LOG2_NEAR = (1.442695140838623, -0.7213466167449951, 0.48101553320884705, -0.35657814145088196,
             0.3343299329280853, -0.023476971313357353, 0.6318237781524658)
#: 2^f for |f| ≤ 1/2, degree 5 (exactly 1 at f = 0): relative error 9.3e-8.
EXP2 = (1.0, 0.6931470036506653, 0.24022246897220612, 0.0555071122944355, 0.009671294130384922,
        0.0013269406044855714)
#: The least t that pow_near_one takes: the threshold τ at which its branch starts. At in = 1024
#: that is p ≥ 55 (p − 1 ≥ 55 in the backward pass).
NEAR_ONE = 0.65


_shape = Scoped()


def traced_in_shape(shape: str):
    """Traces the XLA code inside in one shape, ``'cpu'`` or ``'accel'``, whatever platform the
    program is lowered for (no ``platform_dependent`` switch): how the tests run the GPU/TPU
    shape on the CPU. Programs jitted inside must be traced there, not served from a cache."""
    if shape not in ("cpu", "accel"):
        raise ValueError(f"shape={shape!r} is not one of 'cpu', 'accel'")
    return _shape.set(shape)


def switch(args, cpu_fn, accel_fn):
    """``cpu_fn(*args)`` in a program lowered for the CPU, ``accel_fn(*args)`` for a GPU or TPU
    (``lax.platform_dependent``: the host that traces the program does not matter)."""
    forced = _shape.get()
    if forced is not None:
        return (cpu_fn if forced == "cpu" else accel_fn)(*args)
    return lax.platform_dependent(*args, cpu=cpu_fn, default=accel_fn)


def per_platform(cpu_fn, accel_fn):
    """The function that is ``cpu_fn`` on the CPU and ``accel_fn`` on a GPU or TPU
    (:func:`switch`)."""

    def fn(*args):
        return switch(args, cpu_fn, accel_fn)

    return fn


# --------------------------------------------------------------------------------------------
# CPU shape: a blocked scan over the input coordinates, tiled over the weight rows
# --------------------------------------------------------------------------------------------


def _blocks(a: Array, block: int = _BLOCK) -> Array:
    """``[R, n]`` → ``[n_blocks, block, R]``, zero-padded along n."""
    r, n = a.shape
    pad = (-n) % block
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad)))
    return a.T.reshape(-1, block, r)


def scan_blocks(step, init, x: Array, w: Array, with_index: bool = False):
    """Runs ``carry = step(carry, xj[:, None], wj[None, :], j)`` over every input coordinate j.

    ``init`` is a pytree of ``[B, out]`` arrays, the initial carry. The coordinates are processed
    ``_BLOCK`` at a time inside one scan step (unrolled), which XLA fuses into a single
    elementwise loop over the carry. Weight rows (and the carry's columns with them) are
    processed in tiles of ``_OUT_TILE`` so that the carry stays in cache; the final carry is
    returned as ``[B, out]`` arrays. The CPU shape of the passes.
    """
    xb = _blocks(x)
    starts = jnp.arange(xb.shape[0], dtype=jnp.int32) * _BLOCK

    def run(w_tile, init_tile):
        def coordinate(carry_j, xw):
            carry, j = carry_j
            xj, wj = xw
            return (step(carry, xj[:, None], wj[None, :], j if with_index else None),
                    j + 1), None

        def body(carry, blk):
            # The block's coordinates one after the other, unrolled when lowered: the program
            # of a Python loop over them, traced once instead of _BLOCK times.
            xs, ws, start = blk
            (carry, _), _ = lax.scan(coordinate, (carry, start), (xs, ws), unroll=True)
            return carry, None

        carry, _ = lax.scan(body, init_tile, (xb, _blocks(w_tile), starts))
        return carry

    return over_out_tiles(run, w, init, _OUT_TILE)


def over_out_tiles(run, w: Array, init, tile: int):
    """``run(w_tile, init_tile)`` over tiles of ``tile`` weight rows (the last zero-padded),
    each with its columns of the ``[B, out]`` carry ``init`` (a pytree), one tile after the
    other (``lax.map``); the results joined back to ``[B, out]``. One call when out ≤ tile."""
    b, out = jax.tree.leaves(init)[0].shape[0], w.shape[0]
    if out <= tile:
        return run(w, init)
    pad = (-out) % tile
    n_tiles = (out + pad) // tile
    w_tiles = jnp.pad(w, ((0, pad), (0, 0))).reshape(n_tiles, tile, w.shape[1])
    init_tiles = jax.tree.map(
        lambda a: jnp.pad(a, ((0, 0), (0, pad))).reshape(b, n_tiles, tile).swapaxes(0, 1),
        init)
    tiles = lax.map(lambda t: run(*t), (w_tiles, init_tiles))  # leaves [n_tiles, B, tile]
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(b, -1)[:, :out], tiles)


# --------------------------------------------------------------------------------------------
# GPU/TPU shape: reductions over wide chunks of input coordinates
# --------------------------------------------------------------------------------------------


#: The row count the chunks are planned for when it is symbolic (an exported program's batch).
SYMBOLIC_ROWS = 1024


def _planned(dim, symbolic: int = SYMBOLIC_ROWS) -> int:
    """``dim`` as an int, or ``symbolic`` for a symbolic dimension (jax.export shape
    polymorphism)."""
    try:
        return int(dim)
    except Exception:
        return symbolic


def chunk_plan(rows, out: int, n: int) -> tuple[int, int]:
    """``(chunk, steps)``: input coordinates per step and the number of steps of a GPU/TPU pass
    over ``rows × out`` pairs, the widest balanced chunks of at most ``ACCEL_ELEMENTS``
    elements (at least one coordinate). A symbolic ``rows`` is planned as ``SYMBOLIC_ROWS``."""
    chunk = max(1, min(n, ACCEL_ELEMENTS // max(_planned(rows) * out, 1)))
    steps = -(-n // chunk)
    return -(-n // steps), steps


def _chunks(a: Array, chunk: int, steps: int) -> Array:
    """``[R, n]`` → ``[steps, R, chunk]``, zero-padded along n."""
    r, n = a.shape
    a = jnp.pad(a, ((0, 0), (0, steps * chunk - n))) if steps * chunk != n else a
    return a.reshape(r, steps, chunk).swapaxes(0, 1)


def _unchunk(a: Array, n: int) -> Array:
    """``[steps, R, chunk]`` → ``[R, n]`` (the padding cut off)."""
    steps, r, chunk = a.shape
    return a.swapaxes(0, 1).reshape(r, steps * chunk)[:, :n]


def over_chunks(step, init, xs: tuple[Array, ...], w: Array):
    """``carry, y = step(carry, xcs, wc, start)`` over chunks of the input coordinates: ``xcs``
    are the chunks ``[R, chunk]`` of the arrays ``xs`` (each ``[R, n]``), ``wc`` the chunk
    ``[out, chunk]`` of ``w``, ``start`` the chunk's first coordinate. Returns the final carry
    and the per-chunk outputs ``y`` stacked as ``[steps, ...]`` (None: none). One step, and no
    loop, when every coordinate fits into one chunk. The GPU/TPU shape of the passes."""
    n = w.shape[1]
    chunk, steps = chunk_plan(sum(_planned(x.shape[0]) for x in xs), w.shape[0], n)
    if steps == 1:
        carry, y = step(init, xs, w, 0)
        return carry, jax.tree.map(lambda a: a[None], y)
    starts = jnp.arange(steps, dtype=jnp.int32) * chunk
    parts = (tuple(_chunks(x, chunk, steps) for x in xs), _chunks(w, chunk, steps), starts)
    return lax.scan(lambda carry, t: step(carry, *t), init, parts)


def _absdiff(xc: Array, wc: Array) -> Array:
    """``|x[b, i] − w[o, i]|`` as a ``[B, out, chunk]`` expression (fused into its consumer)."""
    return jnp.abs(xc[:, None, :] - wc[None, :, :])


def _zeros(x: Array, w: Array, dtype=None) -> Array:
    return jnp.zeros((x.shape[0], w.shape[0]), dtype or jnp.result_type(x, w))


# --------------------------------------------------------------------------------------------
# members under vmap
# --------------------------------------------------------------------------------------------


def members_one_by_one(fn):
    """``fn``, except that under ``vmap`` (ensemble members, groups) the program lowered for
    the CPU runs its batch one member after the other (a ``lax.map`` inside the program), and
    the one lowered for a GPU or TPU batches it. On the CPU, batched, the kernels' running
    carries and chunk temporaries grow K-fold and fall out of cache, which makes a vmapped
    forward+backward slower than the members one after the other; on an accelerator one small
    member leaves the device idle. The choice is made per lowering platform
    (``lax.platform_dependent`` inside the batching rule), so a program traced on a CPU host
    runs batched on a GPU. Only for code inside the custom VJPs: a ``custom_vmap`` function
    cannot be differentiated itself."""
    custom = jax.custom_batching.custom_vmap(fn)

    @custom.def_vmap
    def rule(axis_size, in_batched, *args):
        flags = jax.tree.leaves(in_batched)
        leaves, tree = jax.tree.flatten(args)

        def per_member(f, mapped):
            it = iter(mapped)
            full = [next(it) if b else a for a, b in zip(leaves, flags, strict=True)]
            return f(*jax.tree.unflatten(tree, full))

        def one_by_one(*mapped):  # `custom` inside: a vmap around this stays member by member
            return lax.map(lambda m: per_member(custom, m), mapped)

        def batched(*mapped):
            return jax.vmap(lambda m: per_member(fn, m))(mapped)

        mapped = [a for a, b in zip(leaves, flags, strict=True) if b]
        out = switch(mapped, one_by_one, batched)
        return out, jax.tree.map(lambda _: True, out)

    return custom


# --------------------------------------------------------------------------------------------
# ℓ∞
# --------------------------------------------------------------------------------------------


def _max_abs_diff_cpu(x, w):
    return scan_blocks(lambda m, xj, wj, _: jnp.maximum(m, jnp.abs(xj - wj)), _zeros(x, w), x, w)


def _max_abs_diff_accel(x, w):
    def step(m, xcs, wc, _):
        return jnp.maximum(m, _absdiff(xcs[0], wc).max(axis=-1)), None

    return over_chunks(step, _zeros(x, w), (x,), w)[0]


#: ``max_i |x_bi - w_oi|`` → ``[B, out]``.
max_abs_diff = per_platform(_max_abs_diff_cpu, _max_abs_diff_accel)


def _max_abs_diff_argmax_cpu(x, w):
    def step(carry, xj, wj, j):
        m, idx = carry
        a = jnp.abs(xj - wj)
        upd = a > m
        return jnp.where(upd, a, m), jnp.where(upd, j, idx)

    init = (_zeros(x, w), _zeros(x, w, jnp.int32))
    return scan_blocks(step, init, x, w, with_index=True)


def _max_abs_diff_argmax_accel(x, w):
    def step(carry, xcs, wc, start):
        m, idx = carry
        a = _absdiff(xcs[0], wc)
        cm = a.max(axis=-1)
        ci = jnp.argmax(a, axis=-1).astype(jnp.int32) + start  # the chunk's first arg-max
        upd = cm > m  # strict: an earlier chunk's equal maximum wins, so the first arg-max
        return (jnp.where(upd, cm, m), jnp.where(upd, ci, idx)), None

    init = (_zeros(x, w), _zeros(x, w, jnp.int32))
    return over_chunks(step, init, (x,), w)[0]


#: ``(max_i |x_bi - w_oi|, first arg-max i)``, each ``[B, out]``.
max_abs_diff_argmax = per_platform(_max_abs_diff_argmax_cpu, _max_abs_diff_argmax_accel)


@jax.custom_vjp
def linf_dist_xla(x: Array, w: Array) -> Array:
    return members_one_by_one(max_abs_diff)(x, w)


def _linf_fwd(x, w):
    m, idx = members_one_by_one(max_abs_diff_argmax)(x, w)
    return m, (x, w, idx)


def linf_bwd(res, g):
    return members_one_by_one(_linf_scatter)(*res, g)


def _linf_scatter(x, w, idx, g):
    b, out = idx.shape
    rows = jnp.arange(b)[:, None]
    cols = jnp.arange(out)[None, :]
    d = x[rows, idx] - w[cols, idx]  # [B, out] gathered d at the arg-max
    gs = (g * jnp.sign(d)).astype(x.dtype)
    gx = jnp.zeros_like(x).at[rows, idx].add(gs)
    gw = jnp.zeros_like(w).at[cols, idx].add(-gs)
    return gx, gw

linf_dist_xla.defvjp(_linf_fwd, linf_bwd)


# --------------------------------------------------------------------------------------------
# ℓp
# --------------------------------------------------------------------------------------------


def int_pow(t: Array, k: int) -> Array:
    """``t**k`` for a static non-negative integer k by repeated squaring."""
    result = None
    base = t
    while k:
        if k & 1:
            result = base if result is None else result * base
        k >>= 1
        if k:
            base = base * base
    return jnp.ones_like(t) if result is None else result


def pow_p(t: Array, p, k: int | None) -> Array:
    """``t**p`` for ``t ≥ 0``: static integer k, else ``exp(p·log t)`` (0 at t = 0)."""
    if k is not None:
        return int_pow(t, k)
    return jnp.exp(p * jnp.log(t))


def int_root(s, k):
    return s if k == 1 else (jnp.sqrt(s) if k == 2 else s ** (1.0 / k))


def _poly(coeffs, r):
    """``Σ_i coeffs[i]·r^i`` by Horner's rule."""
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * r + c
    return acc


def _exp2(e):
    """``2^e`` for float32 ``−125 ≤ e ≤ 127``: ``2^n`` (n = round(e)) put into the exponent
    bits of a polynomial's ``2^(e−n)`` (relative error ~1e-7)."""
    n = lax.round(e, lax.RoundingMethod.TO_NEAREST_EVEN)
    q = _poly(EXP2, e - n)
    # n + 1.5·2^23 holds n in its low mantissa bits (two's complement, |n| < 2^22); shifted by
    # 23 they become n·2^23, what adding n to q's exponent field adds to q's bits.
    n_bits = lax.bitcast_convert_type(n + 12582912.0, jnp.int32) << 23
    return lax.bitcast_convert_type(lax.bitcast_convert_type(q, jnp.int32) + n_bits, jnp.float32)


def pow_cpu(t, p):
    """``t^p`` for float32 ``0 ≤ t ≤ 1`` (a few roundings above are fine) and ``p ≥ 0``: a
    relative error of a few 1e-6, that of rounding ``p·log2 t`` to float32 (measured ≤ 6e-6 on
    the terms ≥ 2^-34 at p = 100; ``exp(p·log t)``: ≤ 3e-6). Results below ``2^-125`` come out
    as ``2^-125``, and ``t = 0`` as ``2^(−128p)`` or less (callers select an exact 0). How:
    ``t = 2^e·z`` with z in [√½, √2) from the bits, ``p·log2 t = p·e + p·log2 z`` with a
    polynomial in ``z − 1``, then :func:`_exp2`. A NaN t gives NaN."""
    bits = lax.bitcast_convert_type(t, jnp.int32)
    e = (bits - 0x3F3504F3) >> 23  # 0x3F3504F3: the bits of √½
    # z = t·2^-e (a multiplication rather than bit arithmetic on t, so that NaN stays NaN)
    z = t * lax.bitcast_convert_type(0x3F800000 - (e << 23), jnp.float32)
    r = z - 1.0
    # p folded into the coefficients: one multiplication less on the dependency chain
    log = e.astype(jnp.float32) * p + r * _poly(tuple(p * c for c in LOG2_FULL), r)
    return _exp2(jnp.maximum(log, -125.0))


def pow_near_one(t, p):
    """``t^p`` for float32 t in ``[NEAR_ONE, 1 + 2^-10]`` and ``t^p ≥ 2^-125``, with the
    accuracy of :func:`pow_cpu` (measured ≤ 4e-6 at p = 100): :func:`pow_cpu` without the
    exponent split. Any value, NaN included, elsewhere; callers select 0 there."""
    r = t - 1.0
    return _exp2(r * _poly(tuple(p * c for c in LOG2_NEAR), r))


def negligible_below(p, n: int):
    """``τ = 2^(−(24 + log2 n)/p)``: n terms ``t^p`` with ``t < τ`` are each below
    ``δ = 2^-24/n`` and sum to less than ``2^-24``, under the rounding of a sum that is ≥ 1.
    That holds for the stable form's ``Σ_i (|d_i|/m)^p`` (its largest term is 1), and for each
    gradient row ``Σ_i (|d_i|/y)^(p−1) ≥ Σ_i (|d_i|/y)^p = 1``: dropped, they change it by less
    than ``2^-24`` of its ℓ1 mass. Traced p: a scalar computed at run time."""
    # a symbolic n is planned as 2^24 terms: any bound above it is as correct
    return jnp.exp2(-(24.0 + math.log2(max(_planned(n, 1 << 24), 1))) / p)


def _polynomial_pow(dtype) -> bool:
    """Whether the CPU shape's ℓp passes take :func:`pow_cpu` (float32, its bit layout)."""
    return jnp.dtype(dtype) == jnp.float32


def _lp_sum_scan(x, w, inv_m, term):
    """``Σ_i term(|x_bi − w_oi| · inv_m[b, o])`` → ``[B, out]``, a :func:`scan_blocks` pass."""

    def step(carry, xj, wj, _):  # the scale 1/m rides in the carry, tiled with the weight rows
        s, im = carry
        return s + term(jnp.abs(xj - wj) * im), im

    return scan_blocks(step, (jnp.zeros_like(inv_m), inv_m), x, w)[0]


def _near_sum(x, w, inv_m, p, tau):
    return _lp_sum_scan(x, w, inv_m, lambda u: jnp.where(u < tau, 0.0, pow_near_one(u, p)))


def _full_sum(x, w, inv_m, p, tau):
    return _lp_sum_scan(x, w, inv_m, lambda u: pow_cpu(u, p))


def lp_sum_cpu(x, w, inv_m, p, k):
    """``Σ_i (|x_bi − w_oi| · inv_m[b, o])^p`` → ``[B, out]``: the CPU shape. Integer k:
    repeated multiplication; else, at float32, :func:`pow_near_one` with the terms below
    :func:`negligible_below` dropped where that threshold is ≥ ``NEAR_ONE``, :func:`pow_cpu`
    where it is not (one ``lax.cond`` on p)."""
    if k is not None or not _polynomial_pow(jnp.result_type(x, w, inv_m)):
        return _lp_sum_scan(x, w, inv_m, lambda u: pow_p(u, p, k))
    tau = negligible_below(p, x.shape[1])
    return lax.cond(tau >= NEAR_ONE, _near_sum, _full_sum, x, w, inv_m, p, tau)


def _lp_parts_cpu(x, w, p, k):
    m = _max_abs_diff_cpu(x, w)
    return m, lp_sum_cpu(x, w, 1.0 / jnp.where(m > 0, m, 1.0), p, k)


def _lp_parts_accel(x, w, p, k):
    """One pass: per chunk, the running max ``m`` grows to ``m'`` and the sum so far is
    rescaled by ``(m/m')^p`` before the chunk's terms ``(|d|/m')^p`` are added (each ≤ 1, as in
    the two-pass form; the final sum is ≥ 1 where m > 0)."""

    def step(carry, xcs, wc, _):
        m, s = carry
        a = _absdiff(xcs[0], wc)
        m_new = jnp.maximum(m, a.max(axis=-1))
        inv = 1.0 / jnp.where(m_new > 0, m_new, 1.0)
        scale = pow_p(jnp.maximum(m * inv, TINY), p, k)  # 1 where the max stays
        s = s * jnp.where(m_new > m, scale, 1.0) + pow_p(a * inv[..., None], p, k).sum(axis=-1)
        return (m_new, s), None

    return over_chunks(step, (_zeros(x, w), _zeros(x, w)), (x,), w)[0]


def lp_parts_xla(x, w, p, k):
    """``(m, s)`` with ``m = max_i |d|`` and ``s = Σ_i (|d|/m)^p`` (``[B, out]`` each), the
    stable form's two reductions, in the shape of the platform lowered for."""
    return switch((x, w, p), lambda x, w, p: _lp_parts_cpu(x, w, p, k),
                  lambda x, w, p: _lp_parts_accel(x, w, p, k))


def _g_terms(d, iy, g, p, km1):
    """``G = sign(d) · max(|d|·(1/y), TINY)^(p−1) · g``, the summand of both gradients."""
    t = jnp.maximum(jnp.abs(d) * iy, TINY)
    return jnp.sign(d) * pow_p(t, p - 1.0, km1) * g


def _lp_backward_accel(x, w, y, g, p, k):
    iy = (1.0 / jnp.where(y > 0, y, 1.0))[:, :, None]
    gg = g.astype(x.dtype)[:, :, None]
    km1 = None if k is None else k - 1

    def step(_, xcs, wc, __):
        big_g = _g_terms(xcs[0][:, None, :] - wc[None, :, :], iy, gg, p, km1)
        return None, (big_g.sum(axis=1), -big_g.sum(axis=0))

    _, (gx, gw) = over_chunks(step, None, (x,), w)
    return _unchunk(gx, x.shape[1]), _unchunk(gw, w.shape[1])


def lp_backward_xla(x, w, y, g, p, k):
    """``(∂x, ∂w)`` of the ℓp distance: ``∂x[b,i] = Σ_o G``, ``∂w[o,i] = −Σ_b G``, in the
    shape of the platform lowered for."""
    return switch((x, w, y, g, p), lambda *a: _lp_backward_cpu(*a, k),
                  lambda *a: _lp_backward_accel(*a, k))


def _signed_by(g, d):
    """``g`` with its sign flipped where d is negative (``sign(d)·g`` for ``d ≠ 0``)."""
    sign = lax.bitcast_convert_type(d, jnp.int32) & jnp.int32(-0x80000000)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(g, jnp.int32) ^ sign, g.dtype)


def _near_terms(d, iy, g, p, tau):
    """G of the CPU shape where ``τ = negligible_below(p − 1, n) ≥ NEAR_ONE``: 0 for
    ``t = |d|·(1/y) < τ`` (d = 0 included), :func:`pow_near_one` for the others."""
    t = jnp.abs(d) * iy
    return jnp.where(t < tau, 0.0, pow_near_one(t, p - 1.0) * _signed_by(g, d))


def _full_terms(d, iy, g, p, tau):
    """G of the CPU shape by :func:`pow_cpu`; 0 where d = 0 (``sign(0) = 0``)."""
    return jnp.where(d != 0, pow_cpu(jnp.abs(d) * iy, p - 1.0) * _signed_by(g, d), 0.0)


def _lp_backward_cpu(x, w, y, g, p, k):
    """The CPU shape of :func:`lp_backward_xla`: integer k by repeated multiplication; else, at
    float32, the terms below :func:`negligible_below` (of ``p − 1``) dropped and the others by
    :func:`pow_near_one` where that threshold is ≥ ``NEAR_ONE``, :func:`pow_cpu` where it is
    not (one ``lax.cond`` on p)."""
    if k is not None or not _polynomial_pow(jnp.result_type(x, w, y)):
        km1 = None if k is None else k - 1

        def terms(d, iy, gc):
            return _g_terms(d, iy, gc, p, km1)

        return _lp_backward_tiled(x, w, y, g, terms, k is None)
    tau = negligible_below(p - 1.0, x.shape[1])

    def branch(terms):
        return lambda x, w, y, g, p, tau: _lp_backward_tiled(
            x, w, y, g, lambda d, iy, gc: terms(d, iy, gc, p, tau), True)

    return lax.cond(tau >= NEAR_ONE, branch(_near_terms), branch(_full_terms), x, w, y, g, p,
                    tau)


def _lp_backward_tiled(x, w, y, g, terms, barrier):
    """``(∂x, ∂w)`` from the summand ``G = terms(d, 1/y, g)``, in tiles of the input coordinates
    (:data:`LP_BWD_ELEMENTS`)."""
    b, n = x.shape
    tile = max(LP_BWD_ELEMENTS // (b * OUT_CHUNK), _BLOCK)
    if n <= tile:
        return _lp_backward_tile(x, w, y, g, terms, barrier)
    n_tiles = -(-n // tile)
    tile = -(-n // n_tiles)  # balanced tiles
    pad = n_tiles * tile - n
    # Padded coordinates have x = w = 0, so d = 0 and G = 0: they add nothing and are cut off.
    xt = jnp.pad(x, ((0, 0), (0, pad))).reshape(b, n_tiles, tile).transpose(1, 0, 2)
    wt = jnp.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], n_tiles, tile).transpose(1, 0, 2)
    gx, gw = lax.map(lambda t: _lp_backward_tile(t[0], t[1], y, g, terms, barrier), (xt, wt))
    gx = gx.transpose(1, 0, 2).reshape(b, -1)[:, :n]
    gw = gw.transpose(1, 0, 2).reshape(w.shape[0], -1)[:, :n]
    return gx, gw


def _lp_backward_tile(x, w, y, g, terms, barrier):
    out = w.shape[0]
    pad = (-out) % OUT_CHUNK
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    # Padded outputs get g = 0 and y = ∞ (so t = 0, or TINY where clamped): they add exactly 0
    # to ∂x. (Not y = 1: t = |x| could overflow t^(p-1) to ∞ for large p, and ∞ · 0 would make
    # ∂x NaN.)
    gp = jnp.pad(g, ((0, 0), (0, pad)))
    yp = jnp.pad(y, ((0, 0), (0, pad)), constant_values=jnp.inf)
    inv_y = 1.0 / jnp.where(yp > 0, yp, 1.0)
    n_chunks = wp.shape[0] // OUT_CHUNK
    w_c = wp.reshape(n_chunks, OUT_CHUNK, -1)
    g_c = gp.reshape(x.shape[0], n_chunks, OUT_CHUNK).transpose(1, 0, 2)
    iy_c = inv_y.reshape(x.shape[0], n_chunks, OUT_CHUNK).transpose(1, 0, 2)

    def chunk(gx, blk):
        wc, gc, iyc = blk  # [oc, n], [B, oc], [B, oc]
        big_g = terms(x[:, None, :] - wc[None, :, :], iyc[:, :, None],
                      gc[:, :, None])  # [B, oc, n]
        if barrier:  # the powers cost more than a write and a read: compute once, reduce twice
            big_g = lax.optimization_barrier(big_g)
        return gx + big_g.sum(axis=1), -big_g.sum(axis=0)

    gx, gw = lax.scan(chunk, jnp.zeros_like(x), (w_c, g_c, iy_c))
    return gx, gw.reshape(-1, w.shape[1])[:out]


def static_number(p: Any) -> float | None:
    try:
        return float(p)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


# --------------------------------------------------------------------------------------------
# interval bounds
# --------------------------------------------------------------------------------------------


def _bounds_cpu(lower: Array, upper: Array, w: Array) -> tuple[Array, Array]:
    lu = jnp.concatenate([lower, upper], axis=0)  # one blocked layout for both corners
    b = lower.shape[0]

    def step(carry, luj, wj, _):
        lo, hi = carry
        lj, uj = luj[:b], luj[b:]
        lo = jnp.maximum(lo, jnp.maximum(lj - wj, wj - uj))
        hi = jnp.maximum(hi, jnp.maximum(uj - wj, wj - lj))
        return lo, hi

    zeros = _zeros(lower, w)
    return scan_blocks(step, (zeros, zeros), lu, w)


def _bounds_accel(lower: Array, upper: Array, w: Array) -> tuple[Array, Array]:
    def step(carry, lus, wc, _):
        lo, hi = carry
        lc, uc = lus[0][:, None, :], lus[1][:, None, :]
        wc = wc[None, :, :]
        lo = jnp.maximum(lo, jnp.maximum(lc - wc, wc - uc).max(axis=-1))
        hi = jnp.maximum(hi, jnp.maximum(uc - wc, wc - lc).max(axis=-1))
        return (lo, hi), None

    zeros = _zeros(lower, w)
    return over_chunks(step, (zeros, zeros), (lower, upper), w)[0]


#: ``(lo, hi)``: the exact interval of ``||z − w[o]||_∞`` over ``lower ≤ z ≤ upper``
#: (:func:`linf_jax.ops.linf_dist_bounds`), in the shape of the platform lowered for.
bounds_scan = per_platform(_bounds_cpu, _bounds_accel)
