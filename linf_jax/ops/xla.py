"""The XLA code of the distance kernels: blocked scans and custom VJPs, for every platform.

What runs on accelerators, and on the CPU where the native kernels are not used
(:mod:`linf_jax.ops.dispatch`). Pure, jit-able, vmap-able functions; nothing of size
``B·out·n`` is ever materialised:

* The forward passes are a ``lax.scan`` over blocks of ``_BLOCK`` input coordinates; each block
  is unrolled into ``_BLOCK`` elementwise updates of a running reduction of shape ``(B, out)``,
  which XLA fuses into one loop; weight rows are taken in tiles of ``_OUT_TILE``.
* ℓ∞ forward under differentiation keeps a running arg-max; the backward pass is two scatter-adds
  of ``g · sign(d[i*])`` of size ``B × out``.
* ℓp (with :mod:`linf_jax.ops`'s composite): the sum pass of the stable form, and the analytic
  backward ``∂y/∂x_i = sign(d_i) (|d_i|/y)^(p-1)`` over chunks of outputs, tiled over wide inputs
  (docs/METHOD.md §2).
* Small integer p (≤ 8) uses repeated multiplication instead of ``exp(p·log t)``.
* Zero padding of the input dimension to a multiple of ``_BLOCK`` is exact for every reduction
  here (padded coordinates give ``|d| = 0``, which never raises a max and adds 0 to a p-sum).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Input coordinates per unrolled scan step: smaller blocks were measured much slower on the CPU
# (BENCHMARKS.md); the input dimension is zero-padded to a multiple of it.
_BLOCK = 16
_OUT_TILE = 128  # weight rows per tile: keeps the (B, tile) carry (and arg-max) in cache
OUT_CHUNK = 16  # outputs per chunk in the ℓp backward pass
LP_BWD_ELEMENTS = 1 << 21  # B·chunk·tile elements per ℓp backward step (see _lp_backward)
MAX_INT_P = 8  # integer p up to this use repeated multiplication
TINY = 1e-30


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
    returned as ``[B, out]`` arrays.
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

    b, out = jax.tree.leaves(init)[0].shape[0], w.shape[0]
    if out <= _OUT_TILE:
        return run(w, init)
    pad = (-out) % _OUT_TILE
    n_tiles = (out + pad) // _OUT_TILE
    w_tiles = jnp.pad(w, ((0, pad), (0, 0))).reshape(n_tiles, _OUT_TILE, w.shape[1])
    init_tiles = jax.tree.map(
        lambda a: jnp.pad(a, ((0, 0), (0, pad))).reshape(b, n_tiles, _OUT_TILE).swapaxes(0, 1),
        init)
    tiles = lax.map(lambda t: run(*t), (w_tiles, init_tiles))  # leaves [n_tiles, B, tile]
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(b, -1)[:, :out], tiles)


def _zeros(x: Array, w: Array, dtype=None) -> Array:
    return jnp.zeros((x.shape[0], w.shape[0]), dtype or jnp.result_type(x, w))


def members_one_by_one(fn):
    """``fn``, except that under ``vmap`` on the CPU (ensemble members, groups) its batch runs
    one member after the other inside the program (``jax.custom_batching.sequential_vmap``).
    Batched, the kernels' running carries and chunk temporaries grow K-fold and fall out of
    cache, which makes a vmapped forward+backward slower on the CPU than running the members
    one after the other. On accelerators, where one small member leaves the device idle,
    ``fn`` stays batched. Only for code inside the custom VJPs: a
    ``sequential_vmap`` function cannot be differentiated itself."""
    if jax.default_backend() != "cpu":
        return fn
    return jax.custom_batching.sequential_vmap(fn)


def max_abs_diff(x: Array, w: Array) -> Array:
    """``max_i |x_bi - w_oi|`` → ``[B, out]``."""
    return scan_blocks(lambda m, xj, wj, _: jnp.maximum(m, jnp.abs(xj - wj)), _zeros(x, w), x, w)


def _max_abs_diff_argmax(x: Array, w: Array) -> tuple[Array, Array]:
    """``(max_i |x_bi - w_oi|, first arg-max i)``."""

    def step(carry, xj, wj, j):
        m, idx = carry
        a = jnp.abs(xj - wj)
        upd = a > m
        return jnp.where(upd, a, m), jnp.where(upd, j, idx)

    init = (_zeros(x, w), _zeros(x, w, jnp.int32))
    return scan_blocks(step, init, x, w, with_index=True)


@jax.custom_vjp
def linf_dist_xla(x: Array, w: Array) -> Array:
    return members_one_by_one(max_abs_diff)(x, w)


def _linf_fwd(x, w):
    m, idx = members_one_by_one(_max_abs_diff_argmax)(x, w)
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


def lp_backward_xla(x, w, y, g, p, k):
    b, n = x.shape
    tile = max(LP_BWD_ELEMENTS // (b * OUT_CHUNK), _BLOCK)
    if n <= tile:
        return _lp_backward_tile(x, w, y, g, p, k)
    n_tiles = -(-n // tile)
    tile = -(-n // n_tiles)  # balanced tiles
    pad = n_tiles * tile - n
    # Padded coordinates have x = w = 0, so d = 0 and G = 0: they add nothing and are cut off.
    xt = jnp.pad(x, ((0, 0), (0, pad))).reshape(b, n_tiles, tile).transpose(1, 0, 2)
    wt = jnp.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], n_tiles, tile).transpose(1, 0, 2)
    gx, gw = lax.map(lambda t: _lp_backward_tile(t[0], t[1], y, g, p, k), (xt, wt))
    gx = gx.transpose(1, 0, 2).reshape(b, -1)[:, :n]
    gw = gw.transpose(1, 0, 2).reshape(w.shape[0], -1)[:, :n]
    return gx, gw


def _lp_backward_tile(x, w, y, g, p, k):
    out = w.shape[0]
    pad = (-out) % OUT_CHUNK
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    # Padded outputs get g = 0 and y = ∞ (so t = TINY): they add exactly 0 to ∂x. (Not y = 1:
    # t = |x| could overflow t^(p-1) to ∞ for large p, and ∞ · 0 would make ∂x NaN.)
    gp = jnp.pad(g, ((0, 0), (0, pad)))
    yp = jnp.pad(y, ((0, 0), (0, pad)), constant_values=jnp.inf)
    inv_y = 1.0 / jnp.where(yp > 0, yp, 1.0)
    n_chunks = wp.shape[0] // OUT_CHUNK
    w_c = wp.reshape(n_chunks, OUT_CHUNK, -1)
    g_c = gp.reshape(x.shape[0], n_chunks, OUT_CHUNK).transpose(1, 0, 2)
    iy_c = inv_y.reshape(x.shape[0], n_chunks, OUT_CHUNK).transpose(1, 0, 2)
    km1 = None if k is None else k - 1

    def chunk(gx, blk):
        wc, gc, iyc = blk  # [oc, n], [B, oc], [B, oc]
        d = x[:, None, :] - wc[None, :, :]  # [B, oc, n]
        t = jnp.maximum(jnp.abs(d) * iyc[:, :, None], TINY)
        big_g = jnp.sign(d) * pow_p(t, p - 1.0, km1) * gc[:, :, None]
        if k is None:  # exp/log is costly: compute once, then reduce twice
            big_g = lax.optimization_barrier(big_g)
        return gx + big_g.sum(axis=1), -big_g.sum(axis=0)

    gx, gw = lax.scan(chunk, jnp.zeros_like(x), (w_c, g_c, iy_c))
    return gx, gw.reshape(-1, w.shape[1])[:out]


def static_number(p: Any) -> float | None:
    try:
        return float(p)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def bounds_scan(lower: Array, upper: Array, w: Array) -> tuple[Array, Array]:
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
