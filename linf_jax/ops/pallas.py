"""Pallas kernels for the ℓ∞ / ℓp distance layer, behind custom VJPs.

Same signatures and semantics as :mod:`linf_jax.ops`: x ``[B, n]``, w ``[out, n]`` →
``y [B, out]``, ``y[b, o] = ||x[b] - w[o]||_p``. Which implementation a layer uses is the
resolved kernel choice (:func:`linf_jax.ops.resolve`); these kernels run only when asked for
(``config.kernels`` or ``LINF_JAX_KERNELS`` = ``pallas``).

Kernels (all ``pl.pallas_call`` with BlockSpec tiling; every loop is a ``lax.fori_loop`` whose
body is unrolled ``unroll`` times by hand, since the Triton lowering refuses ``unroll=``):

* ℓ∞ forward, grid (B tiles, out tiles), loop over the input coordinates k: a rank-1 update of a
  ``(block_b, block_out)`` running max (and, under differentiation, running first arg-max,
  int32) from row k of ``xᵀ [n, B]`` and of ``wᵀ [n, out]``. The backward pass is the XLA
  scatter of linf_jax.ops (``g · sign(d[i*])``, size B × out); the sign is recomputed there.
* ℓp forward, the same grid and loop twice: a max pass, then the scaled sum
  ``s = Σ (|d|/m)^p`` (integer p ≤ 8 by repeated multiplication, a static choice; otherwise
  ``exp(p·log t)``). The kernel returns ``(m, s)``; ``y = m · s^(1/p)`` (0 where m = 0) is
  finished by XLA exactly as in linf_jax.ops.
* ℓp backward (second pass), two kernels with ``G = sign(d) (|d|/y)^(p-1) g``:
  ``dx`` on a grid (B tiles, in tiles) accumulating over every output row, and ``dw`` on a grid
  (out tiles, in tiles) accumulating over every batch row. G is computed twice (once per
  kernel) rather than written out or combined with atomics: no ``B·out·n`` buffer and a
  deterministic result.

Padding (done here, in XLA, before the call): the input dimension is zero-padded (exact: a
padded coordinate has ``|d| = 0``, which never raises a max, adds 0 to a p-sum and has
``sign(d) = 0`` in the backward pass); B and out are padded to the block sizes and the padded rows
are sliced off. In the ℓp backward padded rows carry ``g = 0`` and ``y = ∞`` (``t = TINY``), so
they add exactly 0 (see linf_jax.ops.xla.lp_backward_xla).

Where the kernels run:

* GPU: the Triton lowering (``compiler_params=pallas.triton.CompilerParams``); every value a
  kernel loads or computes is a power-of-2 sized vector or tile, as Triton needs. The tests
  cross-lower forward and backward for CUDA from the CPU (``jax.export``); the kernels have not
  been compiled to PTX or run on a GPU, and :class:`Blocks` holds untuned defaults
  (BENCHMARKS.md).
* CPU: ``interpret=True`` only (Pallas refuses to compile kernels for the CPU); that is how the
  tests check them against linf_jax.ops.
* TPU: not supported; the automatic choice never picks Pallas, so the XLA code runs there, and
  asking for ``pallas`` on a TPU raises a clear error. The bodies are written for Triton:
  rank-1 updates that broadcast a 1-D row along the other axis (a lane→sublane relayout for
  Mosaic), dynamic single-row loads, whole-``n`` strips of x and w as blocks (VMEM-hungry at
  n = 5120) and a ``(1,)`` p input that Mosaic would want in SMEM. The jaxpr→Mosaic step
  accepts them (``jax.export`` for 'tpu'); whether Mosaic compiles them, and how fast, is
  unchecked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linf_jax.ops import xla

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of 2, as the Triton lowering needs).

    ``b``/``out``/``n``: rows of the batch, of the weights, and input coordinates per tile;
    ``unroll``: loop iterations unrolled by hand inside each ``fori_loop`` step. The forward
    kernels tile (b, out) and loop over n; the dx kernel tiles (b, n) and loops over out; the
    dw kernel tiles (out, n) and loops over b.
    """

    b: int = 64
    out: int = 64
    n: int = 64
    unroll: int = 8
    num_warps: int = 4  # Triton only
    num_stages: int | None = None  # Triton only; None: Pallas's default (3 on CUDA)

    def __post_init__(self):
        for f in ("b", "out", "n", "unroll"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Blocks.{f}={v} must be a power of 2")


DEFAULT_BLOCKS = Blocks()


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _pad_to(a: Array, shape, value=0.0) -> Array:
    pads = [(0, t - s) for s, t in zip(a.shape, shape, strict=True)]
    if any(hi for _, hi in pads):
        a = jnp.pad(a, pads, constant_values=value)
    return a


def _backend() -> str:
    """The platform the kernels are built for (a seam for the tests' cross-lowering check)."""
    return jax.default_backend()


def _call(kernel, *, grid, in_specs, out_specs, out_shape, interpret, blocks):
    """``pl.pallas_call`` for the current backend: interpret mode, or the Triton lowering."""
    params = None
    if not interpret:
        backend = _backend()
        if backend == "gpu":
            from jax.experimental.pallas import triton as pltriton

            params = pltriton.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages)
        else:
            raise NotImplementedError(
                f"linf_jax.ops.pallas: no compiled Pallas kernels for backend {backend!r} (GPU "
                "Triton only; TPU uses the XLA path of linf_jax.ops). Pass interpret=True, or "
                "set LINF_JAX_KERNELS=xla.")
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, compiler_params=params)


def _pow(t, p, k):
    """``t**p`` for t ≥ 0: static integer k (repeated multiplication), else ``exp(p·log t)``."""
    if k is not None:
        return xla.int_pow(t, k)
    return jnp.exp(p * jnp.log(t))


# --------------------------------------------------------------------------------------------
# Forward kernels: grid (B tiles, out tiles), loop over the input coordinates
# --------------------------------------------------------------------------------------------


def _row_loop(n: int, unroll: int, body, carry):
    """``carry = body(k, carry)`` for k in range(n), ``unroll`` k per fori_loop step."""

    def step(i, c):
        for u in range(unroll):
            c = body(i * unroll + u, c)
        return c

    return lax.fori_loop(0, n // unroll, step, carry)


def _absdiff(xt_ref, wt_ref, k):
    """``|x[:, k] - w[:, k]|`` as a ``(block_b, block_out)`` tile (an outer difference)."""
    return jnp.abs(xt_ref[k, :][:, None] - wt_ref[k, :][None, :])


def _running_max(xt_ref, wt_ref, shape, dtype, n, unroll):
    return _row_loop(n, unroll,
                     lambda k, m: jnp.maximum(m, _absdiff(xt_ref, wt_ref, k)),
                     jnp.zeros(shape, dtype))


def _linf_kernel(xt_ref, wt_ref, y_ref, *, n, unroll):
    y_ref[...] = _running_max(xt_ref, wt_ref, y_ref.shape, y_ref.dtype, n, unroll)


def _linf_argmax_kernel(xt_ref, wt_ref, y_ref, idx_ref, *, n, unroll):
    def body(k, carry):
        m, idx = carry
        a = _absdiff(xt_ref, wt_ref, k)
        upd = a > m  # strict: the first arg-max wins, as in linf_jax.ops
        return jnp.where(upd, a, m), jnp.where(upd, k, idx)

    init = (jnp.zeros(y_ref.shape, y_ref.dtype), jnp.zeros(idx_ref.shape, jnp.int32))
    m, idx = _row_loop(n, unroll, body, init)
    y_ref[...] = m
    idx_ref[...] = idx


def _lp_kernel(*refs, n, unroll, k):
    if k is None:
        p_ref, xt_ref, wt_ref, m_ref, s_ref = refs
        p = p_ref[0]
    else:
        xt_ref, wt_ref, m_ref, s_ref = refs
        p = None
    m = _running_max(xt_ref, wt_ref, m_ref.shape, m_ref.dtype, n, unroll)
    inv_m = 1.0 / jnp.where(m > 0, m, 1.0)
    s = _row_loop(n, unroll,
                  lambda j, s: s + _pow(_absdiff(xt_ref, wt_ref, j) * inv_m, p, k),
                  jnp.zeros(m_ref.shape, m_ref.dtype))
    m_ref[...] = m
    s_ref[...] = s


def _forward_call(kernel, x, w, outs, interpret, blocks, p=None):
    """Pads, transposes to ``xᵀ [n, B]`` / ``wᵀ [n, out]`` and runs a forward kernel over the
    (B tiles, out tiles) grid; returns the outputs sliced back to ``[B, out]``."""
    (b, n), out = x.shape, w.shape[0]
    bp, op = _round_up(b, blocks.b), _round_up(out, blocks.out)
    n_p = _round_up(n, max(blocks.n, blocks.unroll))
    xt = _pad_to(x, (bp, n_p)).T
    wt = _pad_to(w, (op, n_p)).T
    tile = pl.BlockSpec((blocks.b, blocks.out), lambda i, j: (i, j))
    in_specs = [pl.BlockSpec((n_p, blocks.b), lambda i, j: (0, i)),
                pl.BlockSpec((n_p, blocks.out), lambda i, j: (0, j))]
    args = [xt, wt]
    if p is not None:
        in_specs.insert(0, pl.BlockSpec((1,), lambda i, j: (0,)))
        args.insert(0, jnp.reshape(p, (1,)).astype(x.dtype))
    res = _call(
        functools.partial(kernel, n=n_p, unroll=blocks.unroll),
        grid=(bp // blocks.b, op // blocks.out),
        in_specs=in_specs,
        out_specs=[tile] * len(outs),
        out_shape=[jax.ShapeDtypeStruct((bp, op), dt) for dt in outs],
        interpret=interpret, blocks=blocks,
    )(*args)
    return [r[:b, :out] for r in res]


# --------------------------------------------------------------------------------------------
# ℓp backward kernels
# --------------------------------------------------------------------------------------------


def _g_tile(d, iy, g, p, km1):
    """``sign(d) · max(|d|·(1/y), TINY)^(p-1) · g`` — the summand of both gradients."""
    t = jnp.maximum(jnp.abs(d) * iy, xla.TINY)
    return jnp.sign(d) * _pow(t, None if km1 is not None else p - 1.0, km1) * g


def _traced_p(refs, km1):
    """``(p, other refs)``: a traced p comes first among a kernel's refs (a one-element array)
    when the integer exponent ``km1`` is None; with an integer exponent there is no p ref."""
    if km1 is None:
        return refs[0][0], refs[1:]
    return None, refs


def _lp_dx_kernel(*refs, rows, unroll, km1):
    """dx tile ``(block_b, block_n)`` = Σ_o G, looping over every (padded) output row o."""
    p, (x_ref, w_ref, gt_ref, iyt_ref, dx_ref) = _traced_p(refs, km1)
    x = x_ref[...]

    def body(o, acc):
        d = x - w_ref[o, :][None, :]
        return acc + _g_tile(d, iyt_ref[o, :][:, None], gt_ref[o, :][:, None], p, km1)

    dx_ref[...] = _row_loop(rows, unroll, body, jnp.zeros(dx_ref.shape, dx_ref.dtype))


def _lp_dw_kernel(*refs, rows, unroll, km1):
    """dw tile ``(block_out, block_n)`` = -Σ_b G, looping over every (padded) batch row b."""
    p, (x_ref, w_ref, g_ref, iy_ref, dw_ref) = _traced_p(refs, km1)
    w = w_ref[...]

    def body(b, acc):
        d = x_ref[b, :][None, :] - w
        return acc - _g_tile(d, iy_ref[b, :][:, None], g_ref[b, :][:, None], p, km1)

    dw_ref[...] = _row_loop(rows, unroll, body, jnp.zeros(dw_ref.shape, dw_ref.dtype))


def _lp_backward(x, w, y, g, p, k, interpret, blocks):
    (b, n), out = x.shape, w.shape[0]
    bp, op = _round_up(b, blocks.b), _round_up(out, blocks.out)
    n_p = _round_up(n, max(blocks.n, blocks.unroll))
    xp = _pad_to(x, (bp, n_p))
    wp = _pad_to(w, (op, n_p))
    gp = _pad_to(g.astype(x.dtype), (bp, op))
    yp = _pad_to(y, (bp, op), value=jnp.inf)  # padded rows: g = 0, t = TINY → exactly 0
    iy = 1.0 / jnp.where(yp > 0, yp, 1.0)
    km1 = None if k is None else k - 1
    head, head_specs = [], []
    if k is None:
        head = [jnp.reshape(p, (1,)).astype(x.dtype)]
        head_specs = [pl.BlockSpec((1,), lambda i, j: (0,))]

    dx = _call(
        functools.partial(_lp_dx_kernel, rows=op, unroll=blocks.unroll, km1=km1),
        grid=(bp // blocks.b, n_p // blocks.n),
        in_specs=head_specs + [
            pl.BlockSpec((blocks.b, blocks.n), lambda i, j: (i, j)),  # x tile
            pl.BlockSpec((op, blocks.n), lambda i, j: (0, j)),  # every w row, this n tile
            pl.BlockSpec((op, blocks.b), lambda i, j: (0, i)),  # gᵀ
            pl.BlockSpec((op, blocks.b), lambda i, j: (0, i)),  # (1/y)ᵀ
        ],
        out_specs=pl.BlockSpec((blocks.b, blocks.n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((bp, n_p), x.dtype),
        interpret=interpret, blocks=blocks,
    )(*head, xp, wp, gp.T, iy.T)

    dw = _call(
        functools.partial(_lp_dw_kernel, rows=bp, unroll=blocks.unroll, km1=km1),
        grid=(op // blocks.out, n_p // blocks.n),
        in_specs=head_specs + [
            pl.BlockSpec((bp, blocks.n), lambda i, j: (0, j)),  # every x row, this n tile
            pl.BlockSpec((blocks.out, blocks.n), lambda i, j: (i, j)),  # w tile
            pl.BlockSpec((bp, blocks.out), lambda i, j: (0, i)),  # g
            pl.BlockSpec((bp, blocks.out), lambda i, j: (0, i)),  # 1/y
        ],
        out_specs=pl.BlockSpec((blocks.out, blocks.n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((op, n_p), w.dtype),
        interpret=interpret, blocks=blocks,
    )(*head, xp, wp, gp, iy)
    return dx[:b, :n], dw[:out, :n]


# --------------------------------------------------------------------------------------------
# custom VJPs
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linf(x, w, interpret, blocks):
    dt = jnp.result_type(x, w)
    (y,) = _forward_call(_linf_kernel, x, w, [dt], interpret, blocks)
    return y


def _linf_fwd(x, w, interpret, blocks):
    dt = jnp.result_type(x, w)
    y, idx = _forward_call(_linf_argmax_kernel, x, w, [dt, jnp.int32], interpret, blocks)
    return y, (x, w, idx)


def _linf_bwd(interpret, blocks, res, g):
    return xla.linf_bwd(res, g)  # a B × out scatter in XLA, sign recomputed from x and w


_linf.defvjp(_linf_fwd, _linf_bwd)


def _lp_forward(x, w, p, k, interpret, blocks):
    dt = jnp.result_type(x, w)
    m, s = _forward_call(functools.partial(_lp_kernel, k=k), x, w, [dt, dt], interpret, blocks,
                         p=None if k is not None else p)
    root = xla.int_root(s, k) if k is not None else jnp.exp(jnp.log(s) / p)
    return jnp.where(m > 0, m * root, 0.0)  # as linf_jax.ops._lp_forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lp(x, w, p, k, interpret, blocks):
    return _lp_forward(x, w, p, k, interpret, blocks)


def _lp_fwd(x, w, p, k, interpret, blocks):
    y = _lp_forward(x, w, p, k, interpret, blocks)
    return y, (x, w, y, p)


def _lp_bwd(k, interpret, blocks, res, g):
    x, w, y, p = res
    dx, dw = _lp_backward(x, w, y, g, p, k, interpret, blocks)
    return dx, dw, jnp.zeros_like(p)


_lp.defvjp(_lp_fwd, _lp_bwd)


def pallas_linf_dist(x: Array, w: Array, *, interpret: bool = False,
                     blocks: Blocks = DEFAULT_BLOCKS) -> Array:
    """Pallas :func:`linf_jax.ops.linf_dist`: ``y[b, o] = max_i |x[b, i] - w[o, i]|``.

    Backward: ``g · sign(d_{i*})`` at the first arg-max ``i*`` (saved by the forward kernel).
    ``interpret=True`` runs the kernels in Pallas interpret mode (any backend, e.g. the CPU).
    """
    return _linf(jnp.asarray(x), jnp.asarray(w), bool(interpret), blocks)


def pallas_lp_dist(x: Array, w: Array, p, *, interpret: bool = False,
                   blocks: Blocks = DEFAULT_BLOCKS) -> Array:
    """Pallas :func:`linf_jax.ops.lp_dist` for finite ``p ≥ 1`` (the stable form).

    A Python-number p picks the integer-power kernels statically for integer p ≤ 8; a traced p
    switches between the p = 8 and the exp/log kernels with ``lax.cond`` (as linf_jax.ops does).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    dtype = jnp.result_type(x, w)
    interpret = bool(interpret)
    ps = xla.static_number(p)
    if ps is not None:
        k = int(ps) if ps.is_integer() and 1 <= ps <= xla.MAX_INT_P else None
        return _lp(x, w, jnp.asarray(ps, dtype), k, interpret, blocks)
    p = jnp.asarray(p, dtype)
    return lax.cond(
        p == xla.MAX_INT_P,
        lambda x, w, p: _lp(x, w, p, xla.MAX_INT_P, interpret, blocks),
        lambda x, w, p: _lp(x, w, p, None, interpret, blocks),
        x, w, p,
    )


def pallas_dist(x: Array, w: Array, p, *, interpret: bool = False,
                blocks: Blocks = DEFAULT_BLOCKS) -> Array:
    """Pallas :func:`linf_jax.ops.dist`: ℓ∞ for ``p = inf``, else :func:`pallas_lp_dist`."""
    ps = xla.static_number(p)
    kw = dict(interpret=interpret, blocks=blocks)
    if ps is not None:
        if ps == float("inf"):
            return pallas_linf_dist(x, w, **kw)
        return pallas_lp_dist(x, w, ps, **kw)
    x, w = jnp.asarray(x), jnp.asarray(w)
    p = jnp.asarray(p, jnp.result_type(x, w))
    return lax.cond(jnp.isinf(p), lambda x, w, p: pallas_linf_dist(x, w, **kw),
                    lambda x, w, p: pallas_lp_dist(x, w, p, **kw), x, w, p)
