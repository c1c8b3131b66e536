"""Pallas kernels for the ℓ∞ / ℓp distance layer and its interval bounds, behind custom VJPs.

Same signatures and semantics as :mod:`linf_jax.ops`: x ``[B, n]``, w ``[out, n]`` →
``y [B, out]``, ``y[b, o] = ||x[b] - w[o]||_p``; :func:`pallas_linf_dist_bounds` is
:func:`linf_jax.ops.linf_dist_bounds`. Which implementation a pass uses is the resolved kernel
choice (:func:`linf_jax.ops.resolve`).

Passes with kernels (every one a ``pl.pallas_call``; the Triton and the Mosaic lowering get
kernel bodies of their own, below):

* ℓ∞ forward, on the (B tiles, out tiles) grid: a running max of ``|x[b, i] - w[o, i]|`` over the
  input coordinates i, and under differentiation the running first arg-max (int32). The backward
  pass is the XLA scatter of linf_jax.ops (``g · sign(d[i*])``, size B × out; the sign is
  recomputed there).
* ℓp forward, the same grid, two sweeps over i: the max m, then the scaled sum
  ``s = Σ (|d|/m)^p`` (integer p ≤ 8 by repeated multiplication, a static choice; otherwise
  ``exp(p·log t)``). The kernel returns ``(m, s)``; ``y = m · s^(1/p)`` (0 where m = 0) is
  finished by XLA exactly as in linf_jax.ops.
* ℓp backward, two kernels with ``G = sign(d) (|d|/y)^(p-1) g``: ``dx`` tiled (B, in) and
  accumulating over every output row, ``dw`` tiled (out, in) and accumulating over every batch
  row. G is computed twice (once per kernel) rather than written out or combined with atomics:
  no ``B·out·n`` buffer and a deterministic result.
* Interval bounds, the forward grid, one sweep making both ``lo = max_i max(l_i - w_i,
  w_i - u_i, 0)`` and ``hi = max_i max(u_i - w_i, w_i - l_i)``: the same float differences as
  linf_jax.ops, so bit-identical. The backward pass is plain autodiff of the XLA code
  (``xla.bounds_scan``), as in linf_jax.ops.

Padding (in XLA, before the call): the input dimension is zero-padded (exact: a padded
coordinate has ``|d| = 0``, which never raises a max, adds 0 to a p-sum, has ``sign(d) = 0`` in
the backward pass and gives 0 to both bounds); B and out are padded to the block sizes and the
padded rows sliced off. In the ℓp backward padded rows carry ``g = 0`` and ``y = ∞``
(``t = TINY``), so they add exactly 0 (see linf_jax.ops.xla.lp_backward_xla).

How they lower (``_backend()``, the default backend, picks the bodies and :func:`default_blocks`;
``blocks=None`` in every public function means those defaults):

* GPU, Triton (``pallas.triton.CompilerParams``): rank-1 updates of the output tile from row k of
  ``xᵀ [n, B]`` and of ``wᵀ [n, out]`` (whole-n strips as blocks), in a ``lax.fori_loop``
  unrolled ``unroll`` times by hand (the Triton lowering refuses ``unroll=``); every value is a
  power-of-2 sized vector or tile, as Triton needs (:class:`Blocks` checks the powers of 2).
  Defaults :data:`GPU_BLOCKS` (64, 64, 64, unroll 8); p is a ``(1,)`` block.
* TPU, Mosaic (``pallas.tpu.CompilerParams``, dimension semantics parallel × parallel ×
  arbitrary): the reduced dimension (the input coordinates; the output rows for dx, the batch
  rows for dw) is the last grid axis, and the output block stays in VMEM across it and
  accumulates, so no block spans the whole n. The operand that varies along the output block's
  rows comes with the reduced dimension on the lanes (``x [B, n]``; ``g`` and ``1/y`` for dx;
  ``gᵀ`` and ``(1/y)ᵀ`` for dw), the other one with it on the sublanes (``wᵀ``; ``w``; ``x``).
  A loop step loads a lane-aligned chunk of ``unroll`` columns of the first (Mosaic takes a
  dynamic lane offset only at a multiple of 128) and unrolls over its lanes: a static lane
  slice broadcast along the lanes (a lane gather), against a single-row load of the second
  broadcast along the sublanes. The output block is swept in pieces of at most (32, 512)
  (``_MOSAIC_PIECE``, 16 vregs), which bounds the unrolled code whatever the blocks. The ℓp
  forward's two sweeps are a grid axis of 2 (max, then sum with the finished m); the dx and dw
  kernels reduce over blocks of ``max(out, unroll)`` and ``max(b, unroll)`` rows. p sits in
  SMEM. Blocks must fit Mosaic's (8, 128) tiling (:func:`check_mosaic_blocks`: b a multiple of
  8; out, n, unroll of 128); defaults :data:`TPU_BLOCKS` (64, 512, 512, unroll 128).
* CPU: ``interpret=True`` only (Pallas compiles no kernels for the CPU); interpret mode runs the
  Triton bodies there, or the Mosaic ones where ``_backend()`` says 'tpu'.

What is verified, and what is not: tests/test_kernels.py runs both kernel shapes in interpret mode
against float64 NumPy and the XLA code of linf_jax.ops (values and gradients, ragged and
degenerate shapes, traced p, under ``vmap``) and cross-lowers every pass, forward and backward,
from the CPU with ``jax.export``: for 'cuda' through Triton and for 'tpu' through Mosaic.
tests/test_pallas_tpu.py, where libtpu is installed, also compiles every kernel to TPU code
with Mosaic on the host (deviceless ahead-of-time compilation for TPU v4, v5e and v6e). The
Triton kernels have never been compiled to device code, no kernel has run on a GPU or a TPU,
and the blocks are untuned defaults (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from linf_jax.ops import xla
from linf_jax.ops.scoped import Scoped

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of 2, as the Triton lowering needs).

    ``b``/``out``/``n``: rows of the batch, of the weights, and input coordinates per tile;
    ``unroll``: loop iterations unrolled by hand inside each ``fori_loop`` step. The forward
    kernels tile (b, out) and loop over n; the dx kernel tiles (b, n) and loops over out; the
    dw kernel tiles (out, n) and loops over b. On a TPU (Mosaic) ``b`` must also be a multiple
    of 8 and ``out``, ``n``, ``unroll`` multiples of 128 (:func:`check_mosaic_blocks`).
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


#: Triton (GPU) defaults, also used in interpret mode off a TPU.
GPU_BLOCKS = Blocks()
#: Mosaic (TPU) defaults: (64, 512) output blocks, swept in (32, 512) pieces (16 vregs of
#: float32), n blocks of 512 coordinates swept 128 lanes at a time; ~5.5 MB of VMEM at most
#: (the dw kernel, double-buffered). Untuned: never timed on a TPU.
TPU_BLOCKS = Blocks(b=64, out=512, n=512, unroll=128)

# Mosaic's tiling rule for each Blocks field: (field, multiple, which block dimension it is).
_MOSAIC_RULES = (
    ("b", 8, "the sublane (second-to-last) dimension of the x and output tiles"),
    ("out", 128, "the lane (last) dimension of the wᵀ and output tiles"),
    ("n", 128, "the lane (last) dimension of the x tiles"),
    ("unroll", 128, "the width of the lane-aligned chunk that each loop step sweeps"),
)


_built_for = Scoped()


def built_for(backend: str):
    """Builds the kernels traced inside for ``backend`` (``'gpu'``, ``'tpu'`` or ``'cpu'``)
    whatever the default backend: :mod:`linf_jax.ops` traces one set per platform inside a
    ``lax.platform_dependent`` switch, so that a program traced on a CPU host carries Triton
    kernels when lowered for a GPU and Mosaic ones for a TPU."""
    return _built_for.set(backend)


def _backend() -> str:
    """The platform the kernels are built for: :func:`built_for`'s, else the default backend
    (also a seam for the tests' cross-lowering checks)."""
    return _built_for.get() or jax.default_backend()


def default_blocks(backend: str | None = None) -> Blocks:
    """The default tiles for ``backend`` (None: the current one): :data:`TPU_BLOCKS` on
    ``'tpu'``, else :data:`GPU_BLOCKS`."""
    return TPU_BLOCKS if (backend or _backend()) == "tpu" else GPU_BLOCKS


def check_mosaic_blocks(blocks: Blocks) -> None:
    """A one-line ``ValueError`` when ``blocks`` break Mosaic's rule: the last two dimensions
    of every block must be multiples of 8 and 128 (or the whole array dimension)."""
    for field, multiple, role in _MOSAIC_RULES:
        v = getattr(blocks, field)
        if v % multiple:
            raise ValueError(
                f"Blocks.{field}={v} does not fit Mosaic (TPU): it is {role}, which must be a "
                f"multiple of {multiple} (a power of 2 ≥ {multiple})")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a call is built (static, hashable): for which backend's lowering, in interpret mode
    or not, with which tiles. ``backend == 'tpu'`` picks the Mosaic-shaped kernel bodies (in
    interpret mode too, so that the tests can check them on the CPU)."""

    backend: str
    interpret: bool
    blocks: Blocks

    @property
    def mosaic(self) -> bool:
        return self.backend == "tpu"


def _plan(interpret, blocks: Blocks | None) -> _Plan:
    backend = _backend()
    blocks = default_blocks(backend) if blocks is None else blocks
    if backend == "tpu" and not interpret:
        check_mosaic_blocks(blocks)
    return _Plan(backend, bool(interpret), blocks)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _pad_to(a: Array, shape, value=0.0) -> Array:
    pads = [(0, t - s) for s, t in zip(a.shape, shape, strict=True)]
    if any(hi for _, hi in pads):
        a = jnp.pad(a, pads, constant_values=value)
    return a


def _call(kernel, plan: _Plan, *, grid, in_specs, out_specs, out_shape, semantics=None):
    """``pl.pallas_call`` for the plan: interpret mode, the Triton lowering (GPU) or the Mosaic
    lowering (TPU; ``semantics``: the grid's dimension semantics)."""
    params = None
    if not plan.interpret:
        if plan.backend == "gpu":
            from jax.experimental.pallas import triton as pltriton

            params = pltriton.CompilerParams(num_warps=plan.blocks.num_warps,
                                             num_stages=plan.blocks.num_stages)
        elif plan.backend == "tpu":
            params = pltpu.CompilerParams(dimension_semantics=semantics)
        else:
            raise NotImplementedError(
                f"linf_jax.ops.pallas: no compiled Pallas kernels for backend {plan.backend!r} "
                "(Triton on a GPU, Mosaic on a TPU). Pass interpret=True, or set "
                "LINF_JAX_KERNELS=xla.")
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=plan.interpret, compiler_params=params)


def _pow(t, p, k):
    """``t**p`` for t ≥ 0: static integer k (repeated multiplication), else ``exp(p·log t)``."""
    if k is not None:
        return xla.int_pow(t, k)
    return jnp.exp(p * jnp.log(t))


def _traced_p(refs, k):
    """``(p, other refs)``: a traced p comes first among a kernel's refs (a one-element array)
    when the static integer exponent ``k`` is None; with an integer exponent there is no p ref."""
    if k is None:
        return refs[0][0], refs[1:]
    return None, refs


# --------------------------------------------------------------------------------------------
# The per-coordinate updates, shared by both kernel shapes: (column, row, carry) → carry, where
# column is a (rows, 1) and row a (1, cols) slice broadcast against the (rows, cols) carry.
# --------------------------------------------------------------------------------------------


def _max_update(cols, row, m):
    return jnp.maximum(m, jnp.abs(cols[0] - row))


def _argmax_update(j, cols, row, carry):
    m, idx = carry
    a = jnp.abs(cols[0] - row)
    upd = a > m  # strict: the first arg-max wins, as in linf_jax.ops
    return jnp.where(upd, a, m), jnp.where(upd, j, idx)


def _bounds_update(cols, w, carry):
    lo, hi = carry
    lower, upper = cols
    return (jnp.maximum(lo, jnp.maximum(lower - w, w - upper)),
            jnp.maximum(hi, jnp.maximum(upper - w, w - lower)))


def _sign(d):
    """``jnp.sign(d)`` (±1, ±0 and NaN kept) from comparisons: Mosaic's lowering of
    ``lax.sign`` asks for the default device's TPU generation, which a CPU host (exporting for
    a TPU) does not have."""
    return jnp.where(d > 0, 1.0, jnp.where(d < 0, -1.0, d)).astype(d.dtype)


def _g_tile(d, iy, g, p, km1):
    """``sign(d) · max(|d|·(1/y), TINY)^(p-1) · g`` — the summand of both gradients."""
    t = jnp.maximum(jnp.abs(d) * iy, xla.TINY)
    return _sign(d) * _pow(t, None if km1 is not None else p - 1.0, km1) * g


# --------------------------------------------------------------------------------------------
# Triton (GPU) kernel bodies: rank-1 updates from single rows of xᵀ and wᵀ, whole-n strips
# --------------------------------------------------------------------------------------------


def _row_loop(n: int, unroll: int, body, carry):
    """``carry = body(k, carry)`` for k in range(n), ``unroll`` k per fori_loop step."""

    def step(i, c):
        for u in range(unroll):
            c = body(i * unroll + u, c)
        return c

    return lax.fori_loop(0, n // unroll, step, carry)


def _gpu_sweep(xt_refs, wt_ref, n, unroll, body, carry):
    """``carry = body(k, cols, row, carry)`` for every input coordinate k: ``cols`` the
    ``(block_b, 1)`` columns k of the x operands (row k of each ``xᵀ`` strip), ``row`` the
    ``(1, block_out)`` row k of the ``wᵀ`` strip."""
    return _row_loop(n, unroll, lambda k, c: body(
        k, [r[k, :][:, None] for r in xt_refs], wt_ref[k, :][None, :], c), carry)


def _zeros(ref):
    return jnp.zeros(ref.shape, ref.dtype)


def _gpu_linf_kernel(xt_ref, wt_ref, y_ref, *, n, unroll):
    y_ref[...] = _gpu_sweep([xt_ref], wt_ref, n, unroll,
                            lambda k, c, r, m: _max_update(c, r, m), _zeros(y_ref))


def _gpu_linf_argmax_kernel(xt_ref, wt_ref, y_ref, idx_ref, *, n, unroll):
    y_ref[...], idx_ref[...] = _gpu_sweep([xt_ref], wt_ref, n, unroll, _argmax_update,
                                          (_zeros(y_ref), _zeros(idx_ref)))


def _gpu_bounds_kernel(lt_ref, ut_ref, wt_ref, lo_ref, hi_ref, *, n, unroll):
    lo_ref[...], hi_ref[...] = _gpu_sweep([lt_ref, ut_ref], wt_ref, n, unroll,
                                          lambda k, c, r, lh: _bounds_update(c, r, lh),
                                          (_zeros(lo_ref), _zeros(hi_ref)))


def _gpu_lp_kernel(*refs, n, unroll, k):
    p, (xt_ref, wt_ref, m_ref, s_ref) = _traced_p(refs, k)
    m = _gpu_sweep([xt_ref], wt_ref, n, unroll, lambda j, c, r, m: _max_update(c, r, m),
                   _zeros(m_ref))
    inv_m = 1.0 / jnp.where(m > 0, m, 1.0)
    s = _gpu_sweep([xt_ref], wt_ref, n, unroll,
                   lambda j, c, r, s: s + _pow(jnp.abs(c[0] - r) * inv_m, p, k), _zeros(s_ref))
    m_ref[...] = m
    s_ref[...] = s


def _gpu_lp_dx_kernel(*refs, rows, unroll, km1):
    """dx tile ``(block_b, block_n)`` = Σ_o G, looping over every (padded) output row o."""
    p, (x_ref, w_ref, gt_ref, iyt_ref, dx_ref) = _traced_p(refs, km1)
    x = x_ref[...]

    def body(o, acc):
        d = x - w_ref[o, :][None, :]
        return acc + _g_tile(d, iyt_ref[o, :][:, None], gt_ref[o, :][:, None], p, km1)

    dx_ref[...] = _row_loop(rows, unroll, body, _zeros(dx_ref))


def _gpu_lp_dw_kernel(*refs, rows, unroll, km1):
    """dw tile ``(block_out, block_n)`` = -Σ_b G, looping over every (padded) batch row b."""
    p, (x_ref, w_ref, g_ref, iy_ref, dw_ref) = _traced_p(refs, km1)
    w = w_ref[...]

    def body(b, acc):
        d = x_ref[b, :][None, :] - w
        return acc - _g_tile(d, iy_ref[b, :][:, None], g_ref[b, :][:, None], p, km1)

    dw_ref[...] = _row_loop(rows, unroll, body, _zeros(dw_ref))


# --------------------------------------------------------------------------------------------
# Mosaic (TPU) kernel bodies: the reduced dimension is the last grid axis ("arbitrary"), and the
# output block stays in VMEM across it and accumulates. Each step sweeps its input block in
# lane-aligned chunks of `unroll` columns, unrolled over the chunk's lanes, one register-sized
# piece of the output block at a time.
# --------------------------------------------------------------------------------------------

#: The largest (rows, cols) piece of an output block that a Mosaic kernel carries through a
#: sweep (16 vregs of float32): bigger blocks are swept piece by piece, which bounds the
#: unrolled code (and the registers it holds) whatever the Blocks.
_MOSAIC_PIECE = (32, 512)


def _over_pieces(shape, fn):
    """``fn(rows, cols)`` for the pieces of an output block of ``shape`` (``pl.ds`` slices at
    aligned offsets; pieces of at most :data:`_MOSAIC_PIECE`)."""
    pr, pc = min(shape[0], _MOSAIC_PIECE[0]), min(shape[1], _MOSAIC_PIECE[1])
    nr, nc = shape[0] // pr, shape[1] // pc
    if nr * nc == 1:
        fn(pl.ds(0, pr), pl.ds(0, pc))
        return

    def body(t, carry):  # lax.div / lax.rem: jnp's // and % lower through sign (see _sign)
        fn(pl.ds(pl.multiple_of(lax.div(t, nc) * pr, pr), pr),
           pl.ds(pl.multiple_of(lax.rem(t, nc) * pc, pc), pc))
        return carry

    lax.fori_loop(0, nr * nc, body, 0)


def _lane_sweep(col_refs, row_ref, unroll, body, carry):
    """``carry = body(j, cols, row, carry)`` for every j < ``col_refs[0].shape[1]``: ``cols``
    the ``(rows, 1)`` columns j of the ``col_refs`` blocks, ``row`` the ``(1, cols)`` row j of
    the ``row_ref`` block.

    Mosaic needs a dynamic lane offset to be a multiple of 128 and broadcasts only a static lane
    along the lanes, so a loop step loads a ``(rows, unroll)`` chunk of each column operand at a
    lane-aligned offset and slices its lanes statically (unrolled); rows are single-row loads
    at a dynamic sublane offset, which Mosaic broadcasts along the sublanes as it loads.
    """

    def step(c, carry):
        off = pl.multiple_of(c * unroll, unroll)
        chunks = [r[:, pl.ds(off, unroll)] for r in col_refs]
        for u in range(unroll):
            carry = body(off + u, [ch[:, u:u + 1] for ch in chunks],
                         row_ref[pl.ds(off + u, 1), :], carry)
        return carry

    return lax.fori_loop(0, col_refs[0].shape[1] // unroll, step, carry)


def _at_first(axis: int, *refs):
    """Zeroes output blocks at the first step of grid axis ``axis`` (the reduction)."""

    @pl.when(pl.program_id(axis) == 0)
    def _init():
        for ref in refs:
            ref[...] = _zeros(ref)


def _tpu_linf_kernel(x_ref, wt_ref, y_ref, *, unroll):
    _at_first(2, y_ref)

    def piece(rows, cols):
        y_ref[rows, cols] = _lane_sweep([x_ref.at[rows]], wt_ref.at[:, cols], unroll,
                                        lambda j, c, r, m: _max_update(c, r, m),
                                        y_ref[rows, cols])

    _over_pieces(y_ref.shape, piece)


def _tpu_linf_argmax_kernel(x_ref, wt_ref, y_ref, idx_ref, *, unroll):
    _at_first(2, y_ref, idx_ref)
    base = pl.program_id(2) * x_ref.shape[1]  # the block's first input coordinate

    def piece(rows, cols):
        y_ref[rows, cols], idx_ref[rows, cols] = _lane_sweep(
            [x_ref.at[rows]], wt_ref.at[:, cols], unroll,
            lambda j, c, r, mi: _argmax_update(base + j, c, r, mi),
            (y_ref[rows, cols], idx_ref[rows, cols]))

    _over_pieces(y_ref.shape, piece)


def _tpu_bounds_kernel(l_ref, u_ref, wt_ref, lo_ref, hi_ref, *, unroll):
    _at_first(2, lo_ref, hi_ref)

    def piece(rows, cols):
        lo_ref[rows, cols], hi_ref[rows, cols] = _lane_sweep(
            [l_ref.at[rows], u_ref.at[rows]], wt_ref.at[:, cols], unroll,
            lambda j, c, r, lh: _bounds_update(c, r, lh), (lo_ref[rows, cols], hi_ref[rows, cols]))

    _over_pieces(lo_ref.shape, piece)


def _tpu_lp_kernel(*refs, unroll, k):
    """Grid (B tiles, out tiles, pass, n blocks): pass 0 takes the max m over every n block,
    pass 1 the scaled sum s = Σ (|d|/m)^p with the finished m (both blocks stay in VMEM)."""
    p, (x_ref, wt_ref, m_ref, s_ref) = _traced_p(refs, k)
    second = pl.program_id(2) == 1

    @pl.when(jnp.logical_and(jnp.logical_not(second), pl.program_id(3) == 0))
    def _init():
        m_ref[...] = _zeros(m_ref)
        s_ref[...] = _zeros(s_ref)

    @pl.when(jnp.logical_not(second))
    def _max():
        def piece(rows, cols):
            m_ref[rows, cols] = _lane_sweep([x_ref.at[rows]], wt_ref.at[:, cols], unroll,
                                            lambda j, c, r, m: _max_update(c, r, m),
                                            m_ref[rows, cols])

        _over_pieces(m_ref.shape, piece)

    @pl.when(second)
    def _sum():
        def piece(rows, cols):
            m = m_ref[rows, cols]
            inv_m = 1.0 / jnp.where(m > 0, m, 1.0)
            s_ref[rows, cols] = _lane_sweep(
                [x_ref.at[rows]], wt_ref.at[:, cols], unroll,
                lambda j, c, r, s: s + _pow(jnp.abs(c[0] - r) * inv_m, p, k), s_ref[rows, cols])

        _over_pieces(s_ref.shape, piece)


def _tpu_lp_dx_kernel(*refs, unroll, km1):
    """dx block ``(block_b, block_n)`` += Σ_o G over this step's output rows o: the rows of the
    w block, and the lanes of the g and 1/y blocks."""
    p, (x_ref, w_ref, g_ref, iy_ref, dx_ref) = _traced_p(refs, km1)
    _at_first(2, dx_ref)

    def piece(rows, cols):
        x = x_ref[rows, cols]
        dx_ref[rows, cols] = _lane_sweep(
            [g_ref.at[rows], iy_ref.at[rows]], w_ref.at[:, cols], unroll,
            lambda o, gi, w_row, acc: acc + _g_tile(x - w_row, gi[1], gi[0], p, km1),
            dx_ref[rows, cols])

    _over_pieces(dx_ref.shape, piece)


def _tpu_lp_dw_kernel(*refs, unroll, km1):
    """dw block ``(block_out, block_n)`` -= Σ_b G over this step's batch rows b: the rows of the
    x block, and the lanes of the gᵀ and (1/y)ᵀ blocks."""
    p, (x_ref, w_ref, gt_ref, iyt_ref, dw_ref) = _traced_p(refs, km1)
    _at_first(2, dw_ref)

    def piece(rows, cols):
        w = w_ref[rows, cols]
        dw_ref[rows, cols] = _lane_sweep(
            [gt_ref.at[rows], iyt_ref.at[rows]], x_ref.at[:, cols], unroll,
            lambda b, gi, x_row, acc: acc - _g_tile(x_row - w, gi[1], gi[0], p, km1),
            dw_ref[rows, cols])

    _over_pieces(dw_ref.shape, piece)


# --------------------------------------------------------------------------------------------
# Calls: padding, layouts and grids
# --------------------------------------------------------------------------------------------


def _p_operand(p, k, dtype, plan: _Plan):
    """``(operands, specs)`` of the traced p (none when the static exponent k is set)."""
    if k is not None:
        return [], []
    return [jnp.reshape(p, (1,)).astype(dtype)], [_p_spec(plan)]


def _p_spec(plan: _Plan):
    """The BlockSpec of the one-element p: SMEM on a TPU (a scalar), else a (1,) block."""
    if plan.mosaic:
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((1,), lambda *_: (0,))


def _forward_call(kernels, xs, w, outs, plan: _Plan, head=((), ()), passes: int = 1):
    """Runs a forward kernel over the (B tiles, out tiles) grid and returns its outputs sliced
    back to ``[B, out]``. ``kernels``: its (Triton, Mosaic) bodies; ``xs``: the ``[B, n]``
    operands (x, or the lower and upper corners); ``head``: (operands, specs) put first (p);
    ``passes``: sweeps over n (the ℓp forward makes two; Mosaic gets them as a grid axis).

    Triton: ``xᵀ [n, B]`` and ``wᵀ [n, out]`` strips of the whole (padded) n per tile. Mosaic:
    ``x [B, n]`` and ``wᵀ [n, out]`` blocks of ``max(n, unroll)`` coordinates, n the last grid
    axis."""
    bl = plan.blocks
    dtype = jnp.result_type(*xs, w)
    xs, w = [x.astype(dtype) for x in xs], w.astype(dtype)
    (b, n), out = xs[0].shape, w.shape[0]
    bp, op = _round_up(b, bl.b), _round_up(out, bl.out)
    if plan.mosaic:
        bn = max(bl.n, bl.unroll)
        n_p = _round_up(n, bn)
        grid = (bp // bl.b, op // bl.out) + ((2,) if passes == 2 else ()) + (n_p // bn,)
        in_specs = ([pl.BlockSpec((bl.b, bn), lambda i, j, *r: (i, r[-1]))] * len(xs)
                    + [pl.BlockSpec((bn, bl.out), lambda i, j, *r: (r[-1], j))])
        tile = pl.BlockSpec((bl.b, bl.out), lambda i, j, *r: (i, j))
        args = [_pad_to(x, (bp, n_p)) for x in xs]
        kernel = functools.partial(kernels[1], unroll=bl.unroll)
        semantics = ("parallel", "parallel") + ("arbitrary",) * (len(grid) - 2)
    else:
        n_p = _round_up(n, max(bl.n, bl.unroll))
        grid = (bp // bl.b, op // bl.out)
        in_specs = ([pl.BlockSpec((n_p, bl.b), lambda i, j: (0, i))] * len(xs)
                    + [pl.BlockSpec((n_p, bl.out), lambda i, j: (0, j))])
        tile = pl.BlockSpec((bl.b, bl.out), lambda i, j: (i, j))
        args = [_pad_to(x, (bp, n_p)).T for x in xs]
        kernel = functools.partial(kernels[0], n=n_p, unroll=bl.unroll)
        semantics = None
    res = _call(
        kernel, plan, grid=grid,
        in_specs=list(head[1]) + in_specs,
        out_specs=[tile] * len(outs),
        out_shape=[jax.ShapeDtypeStruct((bp, op), dt) for dt in outs],
        semantics=semantics,
    )(*head[0], *args, _pad_to(w, (op, n_p)).T)
    return [r[:b, :out] for r in res]


def _lp_backward(x, w, y, g, p, k, plan: _Plan):
    """``(dx, dw)`` of the ℓp layer: two kernels, each accumulating ``G`` over one axis.

    Triton: dx tiles (b, n) and loops over every output row; dw tiles (out, n) and loops over
    every batch row (whole strips). Mosaic: the same tiles, the reduced rows as the last grid
    axis in blocks of ``max(out, unroll)`` (dx) and ``max(b, unroll)`` (dw) rows; g and 1/y
    come with the reduced rows on the lanes (``g`` for dx, ``gᵀ`` for dw)."""
    bl = plan.blocks
    (b, n), out = x.shape, w.shape[0]
    if plan.mosaic:
        bn, ro, rb = max(bl.n, bl.unroll), max(bl.out, bl.unroll), max(bl.b, bl.unroll)
    else:
        bn, ro, rb = bl.n, bl.out, bl.b
    bp, op = _round_up(b, rb), _round_up(out, ro)
    n_p = _round_up(n, max(bn, bl.unroll))
    xp = _pad_to(x, (bp, n_p))
    wp = _pad_to(w, (op, n_p))
    gp = _pad_to(g.astype(x.dtype), (bp, op))
    yp = _pad_to(y, (bp, op), value=jnp.inf)  # padded rows: g = 0, t = TINY → exactly 0
    iy = 1.0 / jnp.where(yp > 0, yp, 1.0)
    km1 = None if k is None else k - 1
    head, head_specs = _p_operand(p, k, x.dtype, plan)
    dx_shape = jax.ShapeDtypeStruct((bp, n_p), x.dtype)
    dw_shape = jax.ShapeDtypeStruct((op, n_p), w.dtype)

    if plan.mosaic:
        semantics = ("parallel", "parallel", "arbitrary")
        dx = _call(
            functools.partial(_tpu_lp_dx_kernel, unroll=bl.unroll, km1=km1), plan,
            grid=(bp // bl.b, n_p // bn, op // ro),
            in_specs=head_specs + [
                pl.BlockSpec((bl.b, bn), lambda i, j, o: (i, j)),  # x tile
                pl.BlockSpec((ro, bn), lambda i, j, o: (o, j)),  # this step's w rows
                pl.BlockSpec((bl.b, ro), lambda i, j, o: (i, o)),  # g
                pl.BlockSpec((bl.b, ro), lambda i, j, o: (i, o)),  # 1/y
            ],
            out_specs=pl.BlockSpec((bl.b, bn), lambda i, j, o: (i, j)),
            out_shape=dx_shape, semantics=semantics,
        )(*head, xp, wp, gp, iy)
        dw = _call(
            functools.partial(_tpu_lp_dw_kernel, unroll=bl.unroll, km1=km1), plan,
            grid=(op // bl.out, n_p // bn, bp // rb),
            in_specs=head_specs + [
                pl.BlockSpec((rb, bn), lambda i, j, r: (r, j)),  # this step's x rows
                pl.BlockSpec((bl.out, bn), lambda i, j, r: (i, j)),  # w tile
                pl.BlockSpec((bl.out, rb), lambda i, j, r: (i, r)),  # gᵀ
                pl.BlockSpec((bl.out, rb), lambda i, j, r: (i, r)),  # (1/y)ᵀ
            ],
            out_specs=pl.BlockSpec((bl.out, bn), lambda i, j, r: (i, j)),
            out_shape=dw_shape, semantics=semantics,
        )(*head, xp, wp, gp.T, iy.T)
        return dx[:b, :n], dw[:out, :n]

    dx = _call(
        functools.partial(_gpu_lp_dx_kernel, rows=op, unroll=bl.unroll, km1=km1), plan,
        grid=(bp // bl.b, n_p // bl.n),
        in_specs=head_specs + [
            pl.BlockSpec((bl.b, bl.n), lambda i, j: (i, j)),  # x tile
            pl.BlockSpec((op, bl.n), lambda i, j: (0, j)),  # every w row, this n tile
            pl.BlockSpec((op, bl.b), lambda i, j: (0, i)),  # gᵀ
            pl.BlockSpec((op, bl.b), lambda i, j: (0, i)),  # (1/y)ᵀ
        ],
        out_specs=pl.BlockSpec((bl.b, bl.n), lambda i, j: (i, j)),
        out_shape=dx_shape,
    )(*head, xp, wp, gp.T, iy.T)
    dw = _call(
        functools.partial(_gpu_lp_dw_kernel, rows=bp, unroll=bl.unroll, km1=km1), plan,
        grid=(op // bl.out, n_p // bl.n),
        in_specs=head_specs + [
            pl.BlockSpec((bp, bl.n), lambda i, j: (0, j)),  # every x row, this n tile
            pl.BlockSpec((bl.out, bl.n), lambda i, j: (i, j)),  # w tile
            pl.BlockSpec((bp, bl.out), lambda i, j: (0, i)),  # g
            pl.BlockSpec((bp, bl.out), lambda i, j: (0, i)),  # 1/y
        ],
        out_specs=pl.BlockSpec((bl.out, bl.n), lambda i, j: (i, j)),
        out_shape=dw_shape,
    )(*head, xp, wp, gp, iy)
    return dx[:b, :n], dw[:out, :n]


# --------------------------------------------------------------------------------------------
# custom VJPs
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linf(x, w, plan):
    (y,) = _forward_call((_gpu_linf_kernel, _tpu_linf_kernel), [x], w,
                         [jnp.result_type(x, w)], plan)
    return y


def _linf_fwd(x, w, plan):
    y, idx = _forward_call((_gpu_linf_argmax_kernel, _tpu_linf_argmax_kernel), [x], w,
                           [jnp.result_type(x, w), jnp.int32], plan)
    return y, (x, w, idx)


def _linf_bwd(plan, res, g):
    return xla.linf_bwd(res, g)  # a B × out scatter in XLA, sign recomputed from x and w


_linf.defvjp(_linf_fwd, _linf_bwd)


def _lp_forward(x, w, p, k, plan):
    dt = jnp.result_type(x, w)
    kernels = (functools.partial(_gpu_lp_kernel, k=k), functools.partial(_tpu_lp_kernel, k=k))
    m, s = _forward_call(kernels, [x], w, [dt, dt], plan, head=_p_operand(p, k, dt, plan),
                         passes=2)
    root = xla.int_root(s, k) if k is not None else jnp.exp(jnp.log(s) / p)
    return jnp.where(m > 0, m * root, 0.0)  # as linf_jax.ops._lp_forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lp(x, w, p, k, plan):
    return _lp_forward(x, w, p, k, plan)


def _lp_fwd(x, w, p, k, plan):
    y = _lp_forward(x, w, p, k, plan)
    return y, (x, w, y, p)


def _lp_bwd(k, plan, res, g):
    x, w, y, p = res
    dx, dw = _lp_backward(x, w, y, g, p, k, plan)
    return dx, dw, jnp.zeros_like(p)


_lp.defvjp(_lp_fwd, _lp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bounds(lower, upper, w, plan):
    dt = jnp.result_type(lower, upper, w)
    lo, hi = _forward_call((_gpu_bounds_kernel, _tpu_bounds_kernel), [lower, upper], w,
                           [dt, dt], plan)
    return lo, hi


def _bounds_fwd(lower, upper, w, plan):
    return _bounds(lower, upper, w, plan), (lower, upper, w)


def _bounds_bwd(plan, res, g):
    return jax.vjp(xla.bounds_scan, *res)[1](g)  # plain autodiff of the XLA code, as ops


_bounds.defvjp(_bounds_fwd, _bounds_bwd)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def pallas_linf_dist(x: Array, w: Array, *, interpret: bool = False,
                     blocks: Blocks | None = None) -> Array:
    """Pallas :func:`linf_jax.ops.linf_dist`: ``y[b, o] = max_i |x[b, i] - w[o, i]|``.

    Backward: ``g · sign(d_{i*})`` at the first arg-max ``i*`` (saved by the forward kernel).
    ``interpret=True`` runs the kernels in Pallas interpret mode (any backend, e.g. the CPU);
    ``blocks=None``: :func:`default_blocks` of the backend.
    """
    return _linf(jnp.asarray(x), jnp.asarray(w), _plan(interpret, blocks))


def pallas_lp_dist(x: Array, w: Array, p, *, interpret: bool = False,
                   blocks: Blocks | None = None) -> Array:
    """Pallas :func:`linf_jax.ops.lp_dist` for finite ``p ≥ 1`` (the stable form).

    A Python-number p picks the integer-power kernels statically for integer p ≤ 8; a traced p
    switches between the p = 8 and the exp/log kernels with ``lax.cond`` (as linf_jax.ops does).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    dtype = jnp.result_type(x, w)
    plan = _plan(interpret, blocks)
    ps = xla.static_number(p)
    if ps is not None:
        k = int(ps) if ps.is_integer() and 1 <= ps <= xla.MAX_INT_P else None
        return _lp(x, w, jnp.asarray(ps, dtype), k, plan)
    p = jnp.asarray(p, dtype)
    return lax.cond(
        p == xla.MAX_INT_P,
        lambda x, w, p: _lp(x, w, p, xla.MAX_INT_P, plan),
        lambda x, w, p: _lp(x, w, p, None, plan),
        x, w, p,
    )


def pallas_dist(x: Array, w: Array, p, *, interpret: bool = False,
                blocks: Blocks | None = None) -> Array:
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


def pallas_linf_dist_bounds(lower: Array, upper: Array, w: Array, *, interpret: bool = False,
                            blocks: Blocks | None = None) -> tuple[Array, Array]:
    """Pallas :func:`linf_jax.ops.linf_dist_bounds`: ``(lo, hi)``, each ``[B, out]``, the exact
    interval of ``||z - w[o]||_∞`` over the box ``lower ≤ z ≤ upper``:
    ``lo = max_i max(l_i - w_i, w_i - u_i, 0)``, ``hi = max_i max(u_i - w_i, w_i - l_i)``.

    One forward kernel makes both (one sweep over the input coordinates); bit-identical to
    linf_jax.ops (a max of the same float differences). Backward: plain autodiff of the XLA
    code (``linf_jax.ops.xla.bounds_scan``), as linf_jax.ops.
    """
    return _bounds(jnp.asarray(lower), jnp.asarray(upper), jnp.asarray(w),
                   _plan(interpret, blocks))
