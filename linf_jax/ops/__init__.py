"""ℓp / ℓ∞ distance between every input row and every weight row, and its interval bounds.

Shapes: x ``[B, n]``, w ``[out, n]`` → ``[B, out]``, ``y[b, o] = ||x[b] - w[o]||_p``. Pure,
jit-able, vmap-able functions with custom VJPs; no Flax, no state. This module is the public
API; each backend is a module of its own:

* :mod:`linf_jax.ops.xla` — the XLA code with custom VJPs, every platform, shaped for the one a
  program is lowered for (blocked scans on the CPU, wide fused reductions on GPUs and TPUs);
* :mod:`linf_jax.ops.native_cpu` — the native CPU custom calls (:mod:`linf_jax.native`,
  register-tiled C++ built on first use), float32: ℓ∞ forward and backward, the ℓp sum and
  backward passes, the interval bounds (and the optimiser's ℓp decay, :mod:`linf_jax.optim`);
* :mod:`linf_jax.ops.pallas` — Pallas kernels for ℓ∞, ℓp and the bounds (Triton on a GPU,
  Mosaic on a TPU, interpret mode on the CPU; one set per lowering platform, :func:`_pallas`),
  run where ``auto`` measured them faster on the device, or on request;
* :mod:`linf_jax.ops.dispatch` — which one runs: a :class:`KernelChoice` resolved from
  ``config.kernels`` / :func:`use_kernels` / ``LINF_JAX_KERNELS`` (per pass family, per lowering
  platform).

ℓp uses the stable form ``m · (Σ (|d|/m)^p)^(1/p)`` with ``m = max|d|`` (one max pass, one sum
pass; every term is at most 1, so nothing overflows up to p = 1000: docs/METHOD.md §2). Each
pass takes the native kernel or the XLA code on its own; they agree bit for bit for ℓ∞ and the
bounds and to float32 rounding for ℓp (tests/test_native.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linf_jax import native
from linf_jax.ops import dispatch, native_cpu, xla  # noqa: F401 - the backends, as attributes
from linf_jax.ops.decay import lp_decay_direction_with
from linf_jax.ops.dispatch import (
    FAMILIES,
    KERNEL_CHOICES,
    KERNELS_ENV,
    KernelChoice,
    active,
    kernel_backend,
    kernel_request,
    native_ok,
    partitionable,
    resolve,
    use_kernels,
)
from linf_jax.ops.lp import lp_dist_with
from linf_jax.ops.native_cpu import linf_native, on_cpu
from linf_jax.ops.sort import (
    conv_sort_bounds,
    conv_sort_dist,
    grouped_sort_bounds,
    grouped_sort_dist,
    sort_dist,
    sort_dist_bounds,
    sort_weights,
)
from linf_jax.ops.xla import (
    MAX_INT_P,
    bounds_scan,
    linf_dist_xla,
    members_one_by_one,
    static_number,
)

Array = jax.Array

__all__ = [
    "FAMILIES", "KERNELS_ENV", "KERNEL_CHOICES", "KernelChoice", "active", "conv_bounds",
    "conv_dist", "dist", "extract_patches", "grouped_bounds", "grouped_dist", "kernel_backend",
    "kernel_request", "linf_dist", "linf_dist_bounds", "lp_decay_direction",
    "lp_dist", "native_ok", "on_cpu", "partitionable", "resolve", "use_kernels",
    "conv_sort_bounds", "conv_sort_dist", "grouped_sort_bounds", "grouped_sort_dist",
    "sort_dist", "sort_dist_bounds", "sort_weights",
]


def _pallas(call, *args):
    """``call(kernels, *args, interpret=...)`` with the Pallas kernels of the platform each
    program is lowered for (``lax.platform_dependent``): Triton on a GPU, Mosaic on a TPU,
    interpret mode on the CPU, whichever host traces the program."""
    from linf_jax.ops import pallas as kernels

    def built_for(backend):
        def run(*a):
            with kernels.built_for(backend):
                return call(kernels, *a, interpret=backend == "cpu")

        return run

    args = tuple(jnp.asarray(a) for a in args)
    return lax.platform_dependent(*args, cpu=built_for("cpu"), tpu=built_for("tpu"),
                                  default=built_for("gpu"))


def linf_dist(x: Array, w: Array) -> Array:
    """``y[b, o] = max_i |x[b, i] - w[o, i]|``. x ``[B, n]``, w ``[out, n]`` (docs/METHOD.md §1).

    Backward: only the arg-max coordinate gets gradient, ``∂y/∂x_{i*} = sign(d_{i*}) = -∂y/∂w_{i*}``
    (first arg-max on ties; zero gradient where x equals w).
    """
    if active().runs("linf") == "pallas":  # the kernel choice in force (ops.dispatch)
        return _pallas(lambda kernels, x, w, **kw: kernels.pallas_linf_dist(x, w, **kw), x, w)
    # NumPy inputs are made JAX arrays first: a NumPy residual (a NumPy constant closed over
    # inside jit) cannot be indexed by the traced arg-max in the backward pass.
    x, w = jnp.asarray(x), jnp.asarray(w)
    if native_ok(x, w, family="linf"):
        return on_cpu(linf_native, linf_dist_xla, x, w)
    return linf_dist_xla(x, w)


def lp_dist(x: Array, w: Array, p) -> Array:
    """``y[b, o] = ||x[b] - w[o]||_p`` for finite ``p ≥ 1`` (stable form, docs/METHOD.md §2).

    ``p`` may be a Python number or a traced scalar. Integer ``p ≤ 8`` takes the repeated-
    multiplication path (statically for a Python number, through ``lax.cond`` for a traced p
    equal to 8, the first training phase). Finite for p up to 1000 and large inputs; 0 (with
    zero gradient) where a row of x equals a row of w.
    """
    if active().runs("lp") == "pallas":  # the kernel choice in force (ops.dispatch)
        return _pallas(lambda kernels, x, w, **kw: kernels.pallas_lp_dist(x, w, p, **kw), x, w)
    x, w = jnp.asarray(x), jnp.asarray(w)  # see linf_dist
    dtype = jnp.result_type(x, w)
    use_native = native_ok(x, w, family="lp")
    ps = static_number(p)
    if ps is not None:
        k = int(ps) if ps.is_integer() and 1 <= ps <= MAX_INT_P else None
        return lp_dist_with(x, w, jnp.asarray(ps, dtype), k, use_native)
    p = jnp.asarray(p, dtype)
    return lax.cond(
        p == MAX_INT_P,
        lambda x, w, p: lp_dist_with(x, w, p, MAX_INT_P, use_native),
        lambda x, w, p: lp_dist_with(x, w, p, None, use_native),
        x, w, p,
    )


def dist(x: Array, w: Array, p) -> Array:
    """ℓp distance for any ``p ∈ [1, ∞]``: ℓ∞ for ``p = inf``, else :func:`lp_dist`.

    A traced p (a schedule inside a jitted train step) switches between the two at run time.
    """
    ps = static_number(p)
    if ps is not None:
        return linf_dist(x, w) if ps == float("inf") else lp_dist(x, w, ps)
    p = jnp.asarray(p, jnp.result_type(x, w))
    # Fresh lambdas as the branches: JAX caches a branch's trace by the function, and a
    # module-level function's cached trace would keep the kernels of the choice it was first
    # traced under.
    return lax.cond(jnp.isinf(p), lambda x, w, p: linf_dist(x, w),
                    lambda x, w, p: lp_dist(x, w, p), x, w, p)


def linf_dist_bounds(lower: Array, upper: Array, w: Array) -> tuple[Array, Array]:
    """Exact interval of ``||z - w[o]||_∞`` over the box ``lower ≤ z ≤ upper``.

    Per coordinate, ``min_z |z - w| = max(l - w, w - u, 0)`` and
    ``max_z |z - w| = max(u - w, w - l)``; both bounds are attained, because the coordinates
    vary independently in a box (docs/METHOD.md §3.2).
    Returns ``(lo, hi)``, each ``[B, out]``. Differentiable (plain autodiff of the blocked
    scan in the backward pass); under ``vmap`` on the CPU the forward runs member by member. The
    forward pass is a native custom call on the CPU (float32), like :func:`linf_dist`.
    """
    return _bounds(jnp.asarray(lower), jnp.asarray(upper), jnp.asarray(w))


def _bounds_value(lower, upper, w):
    if active().runs("bounds") == "pallas":
        return _pallas(lambda kernels, *a, **kw: kernels.pallas_linf_dist_bounds(*a, **kw),
                       lower, upper, w)
    if native_ok(lower, upper, w, family="bounds"):
        return on_cpu(native.linf_bounds, bounds_scan, lower, upper, w)
    return members_one_by_one(bounds_scan)(lower, upper, w)


@jax.custom_vjp
def _bounds(lower, upper, w):
    return _bounds_value(lower, upper, w)


def _bounds_fwd(lower, upper, w):
    return _bounds_value(lower, upper, w), (lower, upper, w)


def _bounds_bwd(res, g):
    return jax.vjp(bounds_scan, *res)[1](g)

_bounds.defvjp(_bounds_fwd, _bounds_bwd)


def _split_groups(a: Array, groups: int) -> Array:
    """``[R, n]`` → ``[groups, R, n // groups]`` (contiguous blocks)."""
    return a.reshape(a.shape[0], groups, -1).swapaxes(0, 1)


def _merge_groups(a: Array) -> Array:
    """``[groups, B, out_g]`` → ``[B, groups·out_g]``."""
    return a.swapaxes(0, 1).reshape(a.shape[1], -1)


def grouped_dist(x: Array, w: Array, p, groups: int = 1) -> Array:
    """Grouped :func:`dist`: x ``[B, n]`` split into ``groups`` contiguous blocks,
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


def lp_decay_direction(w: Array, p) -> Array:
    """``(|w|/‖w‖_p)^(p−2) · w`` per row (first axis = output neuron), the direction of the ℓp
    weight decay (:mod:`linf_jax.optim`, docs/METHOD.md §6); p a Python number ``>= 2`` or
    ``inf``, or a traced scalar. The native kernel where the ``decay`` pass runs native
    (:func:`linf_jax.ops.decay.lp_decay_direction_with`)."""
    rows = w.reshape(w.shape[0], -1)
    return lp_decay_direction_with(w, p, native_ok(rows, family="decay"))
