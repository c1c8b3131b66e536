"""ℓp / ℓ∞ distance between every input row and every weight row (SPEC.md §1, §6).

Pure, jit-able, vmap-able functions with custom VJPs. No Flax, no state.

Shapes: x ``[B, n]``, w ``[out, n]`` → ``[B, out]``, ``y[b, o] = ||x[b] - w[o]||_p``.

Design (measured on a 2-core AVX-512 CPU, see MEASURED.md and BENCHMARKS.md):

* Nothing of size ``B·out·n`` is ever materialised. The forward passes are a ``lax.scan`` over
  blocks of ``_BLOCK`` input coordinates; each block is unrolled into ``_BLOCK`` elementwise
  updates of a running reduction of shape ``(B, out)``, which XLA fuses into one loop.
* ℓ∞ forward under differentiation keeps a running arg-max; the backward pass is two scatter-adds
  of ``g · sign(d[i*])`` of size ``B × out``. Without differentiation only the max is computed.
* ℓp uses the stable form ``m · (Σ (|d|/m)^p)^(1/p)`` with ``m = max|d|`` (one max pass, one sum
  pass). The analytic backward ``∂y/∂x_i = sign(d_i) (|d_i|/y)^(p-1)`` is computed over chunks of
  outputs and reduced twice (over outputs for ∂x, over the batch for ∂w).
* Small integer p (≤ 8, the whole first phase of training at p = 8) uses repeated multiplication
  instead of ``exp(p·log t)``. With a traced p the choice is made at run time by ``lax.cond``, so a
  p schedule never recompiles.
* Zero padding of the input dimension to a multiple of ``_BLOCK`` is exact for every reduction
  here (padded coordinates give ``|d| = 0``, which never raises a max and adds 0 to a p-sum).
* On the CPU the kernels run as native custom calls (linf_jax/native, float32): XLA compiles
  the running max and the running arg-max as two loops that each recompute ``|x - w|``, and
  materialises the ℓp backward's chunk temporaries; register-tiled C++ loops do each pass in
  one sweep (ℓ∞ forward+backward 3x, p = 8 2.9x, p = 100 1.5x faster here, BENCHMARKS.md).
  Where no compiler is found, and for other dtypes, the XLA code below runs; ℓ∞ and the bounds
  agree bit for bit, ℓp to float32 rounding (tests/test_native.py). See :func:`kernel_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from linf_jax import calibration, native

Array = jax.Array

_BLOCK = 16  # input coordinates per unrolled scan step (8 was 7x slower here, see MEASURED.md)
_OUT_TILE = 128  # weight rows per tile: keeps the (B, tile) carry in cache (1.7x faster arg-max)
_OUT_CHUNK = 16  # outputs per chunk in the ℓp backward pass
_LP_BWD_ELEMENTS = 1 << 21  # B·chunk·tile elements per ℓp backward step (see _lp_backward)
_MAX_INT_P = 8  # integer p up to this use repeated multiplication
_TINY = 1e-30


# --------------------------------------------------------------------------------------------
# Blocked layout helpers
# --------------------------------------------------------------------------------------------


def _blocks(a: Array, block: int = _BLOCK) -> Array:
    """``[R, n]`` → ``[n_blocks, block, R]``, zero-padded along n."""
    r, n = a.shape
    pad = (-n) % block
    if pad:
        a = jnp.pad(a, ((0, 0), (0, pad)))
    return a.T.reshape(-1, block, r)


def _scan_blocks(step, init, x: Array, w: Array, with_index: bool = False):
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
        def body(carry, blk):
            xs, ws, start = blk
            for j in range(_BLOCK):
                carry = step(carry, xs[j][:, None], ws[j][None, :],
                             start + j if with_index else None)
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


def _members_one_by_one(fn):
    """``fn``, except that under ``vmap`` on the CPU (ensemble members, groups) its batch runs
    one member after the other inside the program (``jax.custom_batching.sequential_vmap``).
    Batched, the kernels' running carries and chunk temporaries grow K-fold and fall out of
    cache: at K = 5 a vmapped forward+backward was 1.3-1.7x slower than a Python loop over the
    members (ℓ∞ and p = 8, digits and MNIST sizes). On accelerators, where one small member
    leaves the device idle, ``fn`` stays batched. Only for code inside the custom VJPs: a
    ``sequential_vmap`` function cannot be differentiated itself."""
    if jax.default_backend() != "cpu":
        return fn
    return jax.custom_batching.sequential_vmap(fn)


def _max_abs_diff(x: Array, w: Array) -> Array:
    """``max_i |x_bi - w_oi|`` → ``[B, out]``."""
    return _scan_blocks(lambda m, xj, wj, _: jnp.maximum(m, jnp.abs(xj - wj)), _zeros(x, w), x, w)


def _max_abs_diff_argmax(x: Array, w: Array) -> tuple[Array, Array]:
    """``(max_i |x_bi - w_oi|, first arg-max i)``."""

    def step(carry, xj, wj, j):
        m, idx = carry
        a = jnp.abs(xj - wj)
        upd = a > m
        return jnp.where(upd, a, m), jnp.where(upd, j, idx)

    init = (_zeros(x, w), _zeros(x, w, jnp.int32))
    return _scan_blocks(step, init, x, w, with_index=True)


# --------------------------------------------------------------------------------------------
# Kernel dispatch: native CPU kernels (linf_jax/native, XLA FFI custom calls) for the ℓ∞ and ℓp
# distances (forward and backward) and the forward pass of the interval bounds on the CPU; Pallas
# kernels (linf_jax/kernels, GitHub issue 5) for linf_dist and lp_dist on request
# (LINF_JAX_KERNELS=pallas, or =auto on GPU); this file's XLA code otherwise.
# --------------------------------------------------------------------------------------------

KERNELS_ENV = "LINF_JAX_KERNELS"
KERNEL_CHOICES = ("native", "xla", "pallas", "auto")
_override = threading.local()


def _requested() -> str:
    """The choice asked for: :func:`use_kernels` inside it, else ``LINF_JAX_KERNELS`` ('' if
    unset)."""
    return getattr(_override, "choice", None) or os.environ.get(KERNELS_ENV, "").strip().lower()


def kernel_backend() -> str:
    """``'native'``, ``'xla'`` or ``'pallas'``: the implementation :func:`linf_dist` /
    :func:`lp_dist` use.

    Unset (or ``auto``) on the CPU: ``'native'`` when the native kernels build (linf_jax/native:
    C++ XLA custom calls compiled on first use) and were measured faster than the XLA code on
    this machine for at least one pass family; :func:`native_ok` then picks per family
    (:mod:`linf_jax.calibration`: timed once per machine and build, a few seconds, cached).
    ``'xla'`` otherwise. ``LINF_JAX_KERNELS=native|xla|pallas`` forces one
    (``native`` needs the CPU backend and a C++ compiler; Pallas runs in interpret mode on the
    CPU, slowly); ``=auto`` is Pallas on GPU and the unset default elsewhere. The Pallas kernels
    are opt-in until they have been compiled and timed on a GPU: so far they are verified in
    interpret mode and by cross-lowering only (BENCHMARKS.md). :func:`use_kernels` overrides the
    variable for the code traced inside it. Read at trace time: set it before the first call of
    a jitted function.
    """
    choice = _requested()
    if choice in ("xla", "pallas"):
        return choice
    cpu = jax.default_backend() == "cpu"
    if cpu and choice in ("", "auto", "native"):
        native.isa()  # a bad LINF_JAX_NATIVE_ISA is a one-line ValueError, not a fallback
    if choice == "native":
        if not cpu:
            raise ValueError(f"{KERNELS_ENV}=native needs the CPU backend, not "
                             f"{jax.default_backend()!r}; use 'auto' or 'xla'")
        if not native.available():
            raise ValueError(f"{KERNELS_ENV}=native: the native kernels are unavailable "
                             f"({native.unavailable_reason()}); use 'xla'")
        return choice
    if choice == "auto" and jax.default_backend() == "gpu":
        return "pallas"
    if choice in ("", "auto"):
        return "native" if cpu and any(calibration.decisions().values()) else "xla"
    raise ValueError(f"{KERNELS_ENV}={choice!r} is not one of "
                     f"{', '.join(map(repr, KERNEL_CHOICES))} (or unset)")


def kernels_line() -> str:
    """One line for the command lines' output: which kernels the distance layers run, and why."""
    backend = kernel_backend()
    platform = jax.default_backend()
    if backend == "native":
        if _requested() == "native":
            return f"kernels: native CPU ({native.isa()})"
        d = calibration.decisions()
        how = {"measured": "measured on this machine", "cached": "measured on this machine",
               }.get(calibration.how_decided(), calibration.how_decided())
        return f"kernels: {calibration.summary(d)} (native CPU build {native.isa()}; {how})"
    if backend == "pallas":
        return f"kernels: Pallas ({platform})"
    if platform != "cpu" or _requested() == "xla":
        return f"kernels: XLA ({platform})"
    how = calibration.how_decided()
    if how == "unavailable":
        why = f"the native kernels are unavailable: {native.unavailable_reason()}"
    elif how == "instruction-set rule":
        why = native.preferred()[1]
    else:
        why = (f"the native kernels ({native.isa()}) were measured slower than the XLA code "
               "on this machine for every pass")
    return f"kernels: XLA (cpu; {why})"


@contextlib.contextmanager
def use_kernels(choice: str | None):
    """Traces the code inside with ``LINF_JAX_KERNELS=choice`` (``None``: the variable as set).
    Sharded programs use it to keep custom calls, which XLA's SPMD partitioner would run
    unpartitioned, out of multi-device CPU programs."""
    if choice is not None and choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r} is not one of {KERNEL_CHOICES}")
    previous = getattr(_override, "choice", None)
    _override.choice = choice
    try:
        yield
    finally:
        _override.choice = previous


def partitionable(fn):
    """``fn``, traced with kernels that XLA's SPMD partitioner can split: with the native CPU
    kernels chosen by default, the XLA kernels instead. The partitioner runs a custom call
    unpartitioned (it all-gathers the batch onto every device), so multi-device CPU programs
    (``--config.parallel``, sharded ensembles) would lose their data parallelism. An explicit
    ``native`` (``LINF_JAX_KERNELS`` or :func:`use_kernels`) is kept."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        explicit = _requested() == "native"
        choice = "xla" if kernel_backend() == "native" and not explicit else None
        with use_kernels(choice):
            return fn(*args, **kwargs)

    return wrapped


def native_ok(*arrays, family: str | None = None) -> bool:
    """Whether the native kernels take these operands (float32) under the current choice: for
    ``auto``, where the pass ``family`` (:data:`linf_jax.calibration.FAMILIES`) was measured
    faster native on this machine; always with an explicit ``native``."""
    if not all(a.dtype == jnp.float32 for a in arrays) or kernel_backend() != "native":
        return False
    if family is None or _requested() == "native":
        return True
    return calibration.decisions()[family]


def on_cpu(cpu_fn, other_fn, *args):
    """``cpu_fn(*args)`` in the program lowered for the CPU, ``other_fn(*args)`` for every other
    platform (``jax.lax.platform_dependent``). The native kernels are CPU custom calls: a program
    traced on a CPU host and lowered (or exported) for a GPU or TPU must carry the XLA code
    there. Lowered for the CPU alone, only ``cpu_fn`` is compiled."""
    return lax.platform_dependent(*args, cpu=cpu_fn, default=other_fn)


def _pallas():
    """The Pallas kernels module and the interpret flag for this backend (lazy import)."""
    from linf_jax.kernels import distance

    return distance, jax.default_backend() == "cpu"


# ------------------------------------------------------------------ end of kernel dispatch --


# --------------------------------------------------------------------------------------------
# ℓ∞ distance
# --------------------------------------------------------------------------------------------


def linf_dist(x: Array, w: Array) -> Array:
    """``y[b, o] = max_i |x[b, i] - w[o, i]|`` (SPEC §1). x ``[B, n]``, w ``[out, n]``.

    Backward: only the arg-max coordinate gets gradient, ``∂y/∂x_{i*} = sign(d_{i*}) = -∂y/∂w_{i*}``
    (first arg-max on ties; zero gradient where x equals w).
    """
    if kernel_backend() == "pallas":  # kernel dispatch, see kernel_backend
        kernels, interpret = _pallas()
        return kernels.pallas_linf_dist(x, w, interpret=interpret)
    # NumPy inputs are made JAX arrays first: a NumPy residual (a NumPy constant closed over
    # inside jit) cannot be indexed by the traced arg-max in the backward pass.
    x, w = jnp.asarray(x), jnp.asarray(w)
    if native_ok(x, w, family="linf"):
        return on_cpu(_linf_native, _linf_dist, x, w)
    return _linf_dist(x, w)


@jax.custom_vjp
def _linf_dist(x: Array, w: Array) -> Array:
    return _members_one_by_one(_max_abs_diff)(x, w)


def _linf_fwd(x, w):
    m, idx = _members_one_by_one(_max_abs_diff_argmax)(x, w)
    return m, (x, w, idx)


def _linf_bwd(res, g):
    return _members_one_by_one(_linf_scatter)(*res, g)


def _linf_scatter(x, w, idx, g):
    b, out = idx.shape
    rows = jnp.arange(b)[:, None]
    cols = jnp.arange(out)[None, :]
    d = x[rows, idx] - w[cols, idx]  # [B, out] gathered d at the arg-max
    gs = (g * jnp.sign(d)).astype(x.dtype)
    gx = jnp.zeros_like(x).at[rows, idx].add(gs)
    gw = jnp.zeros_like(w).at[cols, idx].add(-gs)
    return gx, gw


_linf_dist.defvjp(_linf_fwd, _linf_bwd)


# The same with the native CPU kernels: the forward pass keeps the arg-max and its sign, the
# backward pass is one custom call doing both scatter-adds. Under vmap (ensemble members,
# groups) each custom call takes the vmapped axes as leading dimensions and runs the members one
# after the other inside the call.
@jax.custom_vjp
def _linf_native(x: Array, w: Array) -> Array:
    return native.linf_max(x, w)


def _linf_native_fwd(x, w):
    y, idx, sign = native.linf_fwd(x, w)
    return y, (x, w, idx, sign)


def _linf_native_bwd(res, g):
    x, w, idx, sign = res
    return native.linf_bwd(idx, sign, g, x.shape, w.shape)


_linf_native.defvjp(_linf_native_fwd, _linf_native_bwd)


def _row_max(x: Array, w: Array) -> Array:
    """``max_i |x_bi - w_oi|`` (no gradient: the ℓp passes' scale), native where it can."""
    if native_ok(x, w, family="lp"):
        return on_cpu(native.linf_max, _max_abs_diff, x, w)
    return _max_abs_diff(x, w)


# --------------------------------------------------------------------------------------------
# ℓp distance, finite p
# --------------------------------------------------------------------------------------------


def _int_pow(t: Array, k: int) -> Array:
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


def _pow(t: Array, p, k: int | None) -> Array:
    """``t**p`` for ``t ≥ 0``: static integer k, else ``exp(p·log t)`` (0 at t = 0)."""
    if k is not None:
        return _int_pow(t, k)
    return jnp.exp(p * jnp.log(t))


def _lp_forward(x, w, p, k):
    m = _row_max(x, w)
    inv_m = 1.0 / jnp.where(m > 0, m, 1.0)

    def step(carry, xj, wj, _):  # the scale 1/m rides in the carry, tiled with the weight rows
        s, im = carry
        return s + _pow(jnp.abs(xj - wj) * im, p, k), im

    def xla_sum(x, w, inv_m):
        return _scan_blocks(step, (jnp.zeros_like(inv_m), inv_m), x, w)[0]

    if native_ok(x, w, family="lp"):
        s = on_cpu(lambda x, w, im: native.lp_sum(x, w, im, p, k), xla_sum, x, w, inv_m)
    else:
        s = xla_sum(x, w, inv_m)
    root = _int_root(s, k) if k is not None else jnp.exp(jnp.log(s) / p)
    # s ≥ 1 wherever m > 0 (the max term contributes 1); where m == 0 the distance is 0.
    return jnp.where(m > 0, m * root, 0.0)


def _int_root(s, k):
    return s if k == 1 else (jnp.sqrt(s) if k == 2 else s ** (1.0 / k))


def _lp_backward(x, w, y, g, p, k):
    """∂x[b,i] = Σ_o g·G, ∂w[o,i] = -Σ_b g·G with G = sign(d)(|d|/y)^(p-1), chunked over o and,
    for wide inputs, tiled over i: every coordinate's G needs only its own d and y, so input
    tiles are independent, and each chunk's ``[B, oc, tile]`` temporaries stay small (untiled,
    (512, 3072, 5120) at p = 8 ran at 0.16 G elements/s against 1.5 at n = 1024)."""
    if native_ok(x, w, family="lp"):
        return on_cpu(lambda x, w, y, g: native.lp_bwd(x, w, 1.0 / jnp.where(y > 0, y, 1.0), g,
                                                       p, k),
                      lambda x, w, y, g: _lp_backward_xla(x, w, y, g, p, k), x, w, y, g)
    return _lp_backward_xla(x, w, y, g, p, k)


def _lp_backward_xla(x, w, y, g, p, k):
    b, n = x.shape
    tile = max(_LP_BWD_ELEMENTS // (b * _OUT_CHUNK), _BLOCK)
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
    pad = (-out) % _OUT_CHUNK
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    # Padded outputs get g = 0 and y = ∞ (so t = _TINY): they add exactly 0 to ∂x. (With y = 1,
    # t = |x| overflowed t^(p-1) to ∞ for large p, and ∞ · 0 made ∂x NaN.)
    gp = jnp.pad(g, ((0, 0), (0, pad)))
    yp = jnp.pad(y, ((0, 0), (0, pad)), constant_values=jnp.inf)
    inv_y = 1.0 / jnp.where(yp > 0, yp, 1.0)
    n_chunks = wp.shape[0] // _OUT_CHUNK
    w_c = wp.reshape(n_chunks, _OUT_CHUNK, -1)
    g_c = gp.reshape(x.shape[0], n_chunks, _OUT_CHUNK).transpose(1, 0, 2)
    iy_c = inv_y.reshape(x.shape[0], n_chunks, _OUT_CHUNK).transpose(1, 0, 2)
    km1 = None if k is None else k - 1

    def chunk(gx, blk):
        wc, gc, iyc = blk  # [oc, n], [B, oc], [B, oc]
        d = x[:, None, :] - wc[None, :, :]  # [B, oc, n]
        t = jnp.maximum(jnp.abs(d) * iyc[:, :, None], _TINY)
        big_g = jnp.sign(d) * _pow(t, p - 1.0, km1) * gc[:, :, None]
        if k is None:  # exp/log is costly: compute once, then reduce twice
            big_g = lax.optimization_barrier(big_g)
        return gx + big_g.sum(axis=1), -big_g.sum(axis=0)

    gx, gw = lax.scan(chunk, jnp.zeros_like(x), (w_c, g_c, iy_c))
    return gx, gw.reshape(-1, w.shape[1])[:out]


def _one_by_one_unless_native(fn, x, w):
    """``fn`` as is for the native kernels (they take vmapped axes as leading dimensions and
    loop over them inside one call), else :func:`_members_one_by_one`."""
    return fn if native_ok(x, w, family="lp") else _members_one_by_one(fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lp_dist(x, w, p, k):
    return _one_by_one_unless_native(functools.partial(_lp_forward, k=k), x, w)(x, w, p)


def _lp_fwd(x, w, p, k):
    y = _one_by_one_unless_native(functools.partial(_lp_forward, k=k), x, w)(x, w, p)
    return y, (x, w, y, p)


def _lp_bwd(k, res, g):
    x, w, y, p = res
    # one member after the other under vmap on the CPU: at K = 5, MNIST size, p = 8 the batched
    # XLA backward was 1.45x slower than a Python loop over the members
    gx, gw = _one_by_one_unless_native(functools.partial(_lp_backward, k=k), x, w)(x, w, y, g, p)
    return gx, gw, jnp.zeros_like(p)


_lp_dist.defvjp(_lp_fwd, _lp_bwd)


def _static_number(p: Any) -> float | None:
    try:
        return float(p)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def lp_dist(x: Array, w: Array, p) -> Array:
    """``y[b, o] = ||x[b] - w[o]||_p`` for finite ``p ≥ 1`` (SPEC §1, stable form).

    ``p`` may be a Python number or a traced scalar. Integer ``p ≤ 8`` takes the repeated-
    multiplication path (statically for a Python number, through ``lax.cond`` for a traced p
    equal to 8, the first training phase). Finite for p up to 1000 and large inputs; 0 (with
    zero gradient) where a row of x equals a row of w.
    """
    if kernel_backend() == "pallas":  # kernel dispatch, see kernel_backend
        kernels, interpret = _pallas()
        return kernels.pallas_lp_dist(x, w, p, interpret=interpret)
    x, w = jnp.asarray(x), jnp.asarray(w)  # see linf_dist
    dtype = jnp.result_type(x, w)
    ps = _static_number(p)
    if ps is not None:
        k = int(ps) if ps.is_integer() and 1 <= ps <= _MAX_INT_P else None
        return _lp_dist(x, w, jnp.asarray(ps, dtype), k)
    p = jnp.asarray(p, dtype)
    return lax.cond(
        p == _MAX_INT_P,
        lambda x, w, p: _lp_dist(x, w, p, _MAX_INT_P),
        lambda x, w, p: _lp_dist(x, w, p, None),
        x, w, p,
    )


def dist(x: Array, w: Array, p) -> Array:
    """ℓp distance for any ``p ∈ [1, ∞]``: ℓ∞ for ``p = inf``, else :func:`lp_dist`.

    A traced p (a schedule inside a jitted train step) switches between the two at run time.
    """
    ps = _static_number(p)
    if ps is not None:
        return linf_dist(x, w) if ps == float("inf") else lp_dist(x, w, ps)
    p = jnp.asarray(p, jnp.result_type(x, w))
    return lax.cond(jnp.isinf(p), lambda x, w, p: linf_dist(x, w), lp_dist, x, w, p)


# --------------------------------------------------------------------------------------------
# Interval bounds through an ℓ∞-dist layer
# --------------------------------------------------------------------------------------------


def linf_dist_bounds(lower: Array, upper: Array, w: Array) -> tuple[Array, Array]:
    """Exact interval of ``||z - w[o]||_∞`` over the box ``lower ≤ z ≤ upper`` (SPEC §6).

    Per coordinate, ``min_z |z - w| = max(l - w, w - u, 0)`` and
    ``max_z |z - w| = max(u - w, w - l)``; both bounds are attained (the arg-max coordinate's
    extreme point, the others free).
    Returns ``(lo, hi)``, each ``[B, out]``. Differentiable (plain autodiff of the blocked
    scan in the backward pass); under ``vmap`` on the CPU the forward runs member by member. The
    forward pass is a native custom call on the CPU (float32), like :func:`linf_dist`.
    """
    return _bounds(jnp.asarray(lower), jnp.asarray(upper), jnp.asarray(w))


def _bounds_value(lower, upper, w):
    if native_ok(lower, upper, w, family="bounds"):
        return on_cpu(native.linf_bounds, _bounds_scan, lower, upper, w)
    return _members_one_by_one(_bounds_scan)(lower, upper, w)


@jax.custom_vjp
def _bounds(lower, upper, w):
    return _bounds_value(lower, upper, w)


def _bounds_fwd(lower, upper, w):
    return _bounds_value(lower, upper, w), (lower, upper, w)


def _bounds_bwd(res, g):
    return jax.vjp(_bounds_scan, *res)[1](g)


def _bounds_scan(lower: Array, upper: Array, w: Array) -> tuple[Array, Array]:
    lu = jnp.concatenate([lower, upper], axis=0)  # one blocked layout for both corners
    b = lower.shape[0]

    def step(carry, luj, wj, _):
        lo, hi = carry
        lj, uj = luj[:b], luj[b:]
        lo = jnp.maximum(lo, jnp.maximum(lj - wj, wj - uj))
        hi = jnp.maximum(hi, jnp.maximum(uj - wj, wj - lj))
        return lo, hi

    zeros = _zeros(lower, w)
    return _scan_blocks(step, (zeros, zeros), lu, w)


_bounds.defvjp(_bounds_fwd, _bounds_bwd)


# --------------------------------------------------------------------------------------------
# Grouped and convolutional (patch) variants, on the same kernels
# --------------------------------------------------------------------------------------------


def _split_groups(a: Array, groups: int) -> Array:
    """``[R, n]`` → ``[groups, R, n // groups]`` (contiguous blocks)."""
    return a.reshape(a.shape[0], groups, -1).swapaxes(0, 1)


def _merge_groups(a: Array) -> Array:
    """``[groups, B, out_g]`` → ``[B, groups·out_g]``."""
    return a.swapaxes(0, 1).reshape(a.shape[1], -1)


def grouped_dist(x: Array, w: Array, p, groups: int = 1) -> Array:
    """Grouped :func:`dist` (SPEC §1): x ``[B, n]`` split into ``groups`` contiguous blocks,
    w ``[out, n // groups]``; output unit o sees block ``o // (out // groups)`` only."""
    if groups == 1:
        return dist(x, w, p)
    # JAX arrays before the vmap: jax 0.10 asserts ("non-canonical constant") when a NumPy
    # constant is batched into a custom_vjp under jit.
    x, w = jnp.asarray(x), jnp.asarray(w)
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    return _merge_groups(jax.vmap(dist, in_axes=(0, 0, None))(_split_groups(x, groups), wg, p))


def grouped_bounds(lower: Array, upper: Array, w: Array, groups: int = 1):
    """Grouped :func:`linf_dist_bounds`."""
    if groups == 1:
        return linf_dist_bounds(lower, upper, w)
    lower, upper, w = jnp.asarray(lower), jnp.asarray(upper), jnp.asarray(w)  # see grouped_dist
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    lo, hi = jax.vmap(linf_dist_bounds)(
        _split_groups(lower, groups), _split_groups(upper, groups), wg)
    return _merge_groups(lo), _merge_groups(hi)


def extract_patches(
    x: Array, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> Array:
    """NHWC image → ``[B, H', W', C·k·k]`` patches, feature order (C, kh, kw), the same
    padding/stride/dilation semantics as a convolution (zero padding).

    The patches are a convolution with one-hot filters, run at ``HIGHEST`` precision whatever
    ``jax_default_matmul_precision`` says: at TF32 or bfloat16 (the default on recent NVIDIA
    GPUs and on TPUs) the copy would round every input value, which would make the interval
    bounds of certification unsound."""
    return lax.conv_general_dilated_patches(
        x,
        filter_shape=(kernel_size, kernel_size),
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def conv_dist(x: Array, w: Array, p, *, stride: int = 1, padding: int = 0, dilation: int = 1,
              groups: int = 1) -> Array:
    """ℓp distance between every C·k·k patch of NHWC ``x`` and every filter
    ``w [out, C/groups, k, k]``.

    Returns ``[B, H', W', out]``.
    """
    out, _, k, _ = w.shape
    patches = extract_patches(x, k, stride, padding, dilation)
    b, h, wd, f = patches.shape
    # Patch features are channel-major (C, kh, kw), so channel groups stay contiguous blocks.
    y = grouped_dist(patches.reshape(-1, f), w.reshape(out, -1), p, groups)
    return y.reshape(b, h, wd, out)


def conv_bounds(lower: Array, upper: Array, w: Array, *, stride: int = 1, padding: int = 0,
                dilation: int = 1, groups: int = 1) -> tuple[Array, Array]:
    """Exact interval of :func:`conv_dist` at p = ∞ over an elementwise input box.

    Zero padding is a constant (not perturbed), so padded taps have lower = upper = 0.
    """
    out, _, k, _ = w.shape
    pl = extract_patches(lower, k, stride, padding, dilation)
    pu = extract_patches(upper, k, stride, padding, dilation)
    b, h, wd, f = pl.shape
    lo, hi = grouped_bounds(pl.reshape(-1, f), pu.reshape(-1, f), w.reshape(out, -1), groups)
    return lo.reshape(b, h, wd, out), hi.reshape(b, h, wd, out)
