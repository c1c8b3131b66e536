"""Flax (Linen) layers of ℓ∞-dist nets.

Every layer takes either an array or a :class:`Box` (an elementwise interval ``lo ≤ x ≤ hi``).
Given a Box, a layer returns the exact (ℓ∞-dist layers, shifts, max-pooling, tanh) or sound
(linear head) interval of its output, so bound propagation is the same network definition run
on a different input type, never a second copy of the network. Boxes are propagated at p = ∞ in
evaluation mode only: that is where the network is 1-Lipschitz and its MeanShift a constant
(the neuron and the bound rules: docs/METHOD.md §1 and §3.2).

Parameter names are a contract with :mod:`linf_jax.optim` (weight-decay masks):
``linf_weight`` (ℓ∞-dist weights, ``[out, in_per_group]`` or ``[out, C_per_group, k, k]``),
``bias``, ``kernel`` (head weights ``[in, out]``), ``logit_scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from linf_jax import ops
from linf_jax.ops.blocks import block_weights

Array = jax.Array
IDENTITY_WEIGHT = -10.0


class Box(NamedTuple):
    """An elementwise interval ``lo ≤ x ≤ hi`` (a pytree, so it passes through jit and vmap)."""

    lo: Array
    hi: Array

    def map(self, fn) -> Box:
        """Applies a monotone non-decreasing elementwise map to both ends."""
        return Box(fn(self.lo), fn(self.hi))


def _check_infinite_p(p) -> None:
    ps = ops.xla.static_number(p)
    if ps != float("inf"):
        raise ValueError(f"interval bounds are computed at p = inf only, got p = {p!r}")


def linf_init(groups: int = 1, identity: bool = True):
    """N(0, 1) weights; where ``in_per_group ≤ out_per_group`` unit o gets −10 at input coordinate
    ``o % in_per_group`` (the centre tap for convolutions): the official code's "identity"
    init. That coordinate dominates the max, so the unit starts out passing one input through
    (shifted by a constant that MeanShift removes) and a deep stack starts near the identity
    (docs/METHOD.md §1)."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, dtype)
        out = shape[0]
        in_per_group = shape[1]
        if identity and in_per_group <= out // groups:
            rows = jnp.arange(out)
            cols = rows % in_per_group
            if w.ndim == 2:
                w = w.at[rows, cols].set(IDENTITY_WEIGHT)
            else:  # [out, C, k, k]: centre tap
                kh, kw = w.shape[2] // 2, w.shape[3] // 2
                w = w.at[rows, cols, kh, kw].set(IDENTITY_WEIGHT)
        return w

    return init


class LinfDist(nn.Module):
    """Dense (optionally grouped) ℓp-dist layer, ``y_o = ||x - w_o||_p (+ b_o)``; 1-Lipschitz in
    ℓ∞ at p = ∞ (docs/METHOD.md §1), finite p is the training relaxation (§2).

    x ``[B, in]`` → ``[B, features]``. Output unit o sees input block ``o // (features // groups)``.
    On a :class:`Box` (p = ∞ only) it returns the exact interval of each output.
    """

    features: int
    groups: int = 1
    use_bias: bool = False
    identity_init: bool = True

    @nn.compact
    def __call__(self, x, p=float("inf")):
        n = (x.lo if isinstance(x, Box) else x).shape[-1]
        if n % self.groups or self.features % self.groups:
            raise ValueError(
                f"LinfDist: in={n} and features={self.features} must be divisible by "
                f"groups={self.groups}")
        w = self.param("linf_weight", linf_init(self.groups, self.identity_init),
                       (self.features, n // self.groups))
        if isinstance(x, Box):
            _check_infinite_p(p)
            y = Box(*ops.grouped_bounds(x.lo, x.hi, w, self.groups))
        else:
            y = ops.grouped_dist(x, w, p, self.groups)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y.map(lambda v: v + b) if isinstance(y, Box) else y + b
        return y


class LinfDistConv(nn.Module):
    """ℓp distance between every C·k·k patch of an NHWC input and every filter (zero padding,
    stride and dilation as in a convolution); on a :class:`Box`, the exact interval at p = ∞."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = False
    identity_init: bool = True

    @nn.compact
    def __call__(self, x, p=float("inf")):
        c = (x.lo if isinstance(x, Box) else x).shape[-1]
        if c % self.groups or self.features % self.groups:
            raise ValueError(
                f"LinfDistConv: channels={c} and features={self.features} must be divisible by "
                f"groups={self.groups}")
        k = self.kernel_size
        w = self.param("linf_weight", linf_init(self.groups, self.identity_init),
                       (self.features, c // self.groups, k, k))
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                  groups=self.groups)
        if isinstance(x, Box):
            _check_infinite_p(p)
            y = Box(*ops.conv_bounds(x.lo, x.hi, w, **kw))
        else:
            y = ops.conv_dist(x, w, p, **kw)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y.map(lambda v: v + b) if isinstance(y, Box) else y + b
        return y


def is_keep_all(q) -> bool:
    """Whether a SortNet keep probability makes the neuron the ℓ∞-dist neuron (None or 1)."""
    return q is None or q == 1


class SortDist(nn.Module):
    """Dense SortNet layer (docs/METHOD.md §10): ``features`` neurons over ``in_features``
    inputs (None: the input's last axis), weight ``linf_weight [features, in_features]``.

    * evaluation, and training without a ``'dropout'`` RNG (the statistics re-estimation), at
      p = ∞: the sort neuron :func:`linf_jax.ops.sort_dist` (keep probability ``q``, the top
      ``top_k`` distances), which is :func:`linf_jax.ops.linf_dist` for ``q`` None or 1;
    * a :class:`Box` (p = ∞): the exact interval, :func:`linf_jax.ops.sort_dist_bounds`;
    * masked training: ``x [S, R, m_in]`` holds, for each block s of rows, the input units
      ``in_index[s]`` only, and the layer computes only the output units ``out_index[s]``
      (``[S, m_out]``; None: all of them) with the ℓp distance (any p, traced or not) over the
      kept inputs: ``[S, R, m_out]``. The gradients reach the full weight matrix through the
      gathers' transposes.
    Any leading axes of an array input are rows (``[..., n]`` → ``[..., features]``).
    """

    features: int
    in_features: int | None = None
    q: float | None = None
    top_k: int = 10
    use_bias: bool = False
    identity_init: bool = False

    @nn.compact
    def __call__(self, x, p=float("inf"), in_index=None, out_index=None):
        n = self.in_features or (x.lo if isinstance(x, Box) else x).shape[-1]
        w = self.param("linf_weight", linf_init(1, self.identity_init), (self.features, n))
        b = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        if isinstance(x, Box):
            _check_infinite_p(p)
            lead = x.lo.shape[:-1]
            lo, hi = (v.reshape(-1, v.shape[-1]) for v in x)
            if is_keep_all(self.q):
                lo, hi = ops.linf_dist_bounds(lo, hi, w)
            else:
                lo, hi = ops.sort_dist_bounds(lo, hi, w, self.q, self.top_k)
            y = Box(lo.reshape(*lead, -1), hi.reshape(*lead, -1))
            return y if b is None else y.map(lambda v: v + b)
        if in_index is None and out_index is None:
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1])
            if is_keep_all(self.q):
                y = ops.dist(rows, w, p)
            else:
                if ops.xla.static_number(p) != float("inf"):
                    raise ValueError(
                        f"SortDist: the sort neuron (q={self.q}) is defined at p = inf only, "
                        f"got p = {p!r}; training at finite p needs the masked call (a "
                        "'dropout' RNG)")
                y = ops.sort_dist(rows, w, self.q, self.top_k)
            y = y.reshape(*lead, self.features)
            return y if b is None else y + b
        # masked training: each block's kept weight rows and columns, [S, m_out, m_in]
        blocks = x.shape[0]
        every = lambda size: jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (blocks, size))
        wb = block_weights(w, every(self.features) if out_index is None else out_index,
                           every(n) if in_index is None else in_index)
        y = jax.vmap(lambda xs, ws: ops.dist(xs, ws, p))(x, wb)
        if b is not None:
            y = y + (b if out_index is None else jnp.take(b, out_index)[:, None, :])
        return y


class MeanShift(nn.Module):
    """Batch norm without variance or affine parameters: subtract the per-unit batch
    mean in training (over every axis but the last; gradients flow through it; running mean,
    momentum 0.1, in ``batch_stats``), the running mean in evaluation. In evaluation it is a
    constant shift, so 1-Lipschitz; a Box is shifted by the same mean (docs/METHOD.md §1).

    In training the batch mean is also sown as ``intermediates/batch_mean`` (kept only when the
    caller makes that collection mutable): :mod:`linf_jax.recalibrate` averages it over the
    training set to re-estimate the running means of a SortNet.

    SortNet's masked training (docs/METHOD.md §10) passes its outputs in blocks, ``x`` of shape
    ``[S, R, m]`` where block s holds only the units ``index[s]`` (``[S, m]``) of its ``R`` rows;
    then a unit's mean is taken over the rows of the blocks that kept it (the official
    ``MeanShiftDropout``; 0 for a unit no block kept), and ``valid`` (``[S, R]``, 0/1) leaves
    padding rows out of every mean.
    """

    momentum: float = 0.1
    units: int | None = None  # needed for masked calls, whose input holds a subset of the units

    @nn.compact
    def __call__(self, x, train: bool = False, index=None, valid=None):
        arr = x.lo if isinstance(x, Box) else x
        units = arr.shape[-1] if self.units is None else self.units
        if index is not None and self.units is None:
            raise ValueError("MeanShift: a masked (index) call needs MeanShift(units=...)")
        running = self.variable("batch_stats", "mean", jnp.zeros, (units,), arr.dtype)
        if isinstance(x, Box):
            if train:
                raise ValueError("MeanShift: interval bounds are computed in evaluation mode only")
            return x.map(lambda v: v - running.value)
        if not train:
            return x - running.value
        if index is None:
            if valid is None:
                mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
            else:
                v = valid.reshape(-1)
                mean = (x.reshape(-1, x.shape[-1]) * v[:, None]).sum(0) / v.sum()
            shift = mean
        else:
            v = jnp.ones(x.shape[:2], x.dtype) if valid is None else valid.astype(x.dtype)
            block_sums = jnp.einsum("srm,sr->sm", x, v, precision=lax.Precision.HIGHEST)
            block_counts = jnp.broadcast_to(v.sum(1)[:, None], index.shape)
            sums = jnp.zeros((units,), x.dtype).at[index].add(block_sums)
            counts = jnp.zeros((units,), x.dtype).at[index].add(block_counts)
            mean = sums / jnp.maximum(counts, 1e-10)
            shift = jnp.take(mean, index, axis=0)[:, None, :]
        self.sow("intermediates", "batch_mean", mean)
        if not self.is_initializing():
            running.value = (1.0 - self.momentum) * running.value + self.momentum * mean
        return x - shift


def max_pool(x, window: int):
    """2-D max-pooling (stride = window); monotone and 1-Lipschitz, so a Box passes through."""
    pool = lambda v: nn.max_pool(v, (window, window), strides=(window, window))
    return x.map(pool) if isinstance(x, Box) else pool(x)


HIGHEST = jax.lax.Precision.HIGHEST


class BoundedLinear(nn.Module):
    """Linear layer ``x @ (W/√fan_in) + b``, W ~ N(0, 1), b = 0.

    On a Box it propagates centre ``W c + b`` and radius ``|W| r``, the exact interval of an
    affine map over a box (docs/METHOD.md §3.2). Not 1-Lipschitz in ℓ∞ in general: a model with
    this head is certified by interval bounds only.
    Every product runs at float32 ``HIGHEST`` precision whatever ``jax_default_matmul_precision``
    says: TF32 (the default on A100/H100/H200) or bfloat16 products carry ~5e-4 relative error,
    more than the certificate's rounding margin (:data:`linf_jax.certify.DEFAULT_TOL`).
    """

    in_features: int
    features: int

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.normal(1.0),
                                 (self.in_features, self.features))
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def _weight(self):
        return self.kernel / jnp.sqrt(self.in_features)

    def __call__(self, x):
        w = self._weight()
        if isinstance(x, Box):
            c, r = (x.hi + x.lo) / 2, (x.hi - x.lo) / 2
            c = jnp.matmul(c, w, precision=HIGHEST) + self.bias
            r = jnp.matmul(r, jnp.abs(w), precision=HIGHEST)
            return Box(c - r, c + r)
        return jnp.matmul(x, w, precision=HIGHEST) + self.bias

    def margins(self, x: Box, labels: Array) -> Array:
        """Upper bounds of ``z_j - z_y`` over the box, bounding ``(W_j - W_y)·h + (b_j - b_y)``
        directly (tighter than subtracting logit bounds). ``[B, C]``, exactly 0 at j = y."""
        w = self._weight()
        c, r = (x.hi + x.lo) / 2, (x.hi - x.lo) / 2
        w_y = jnp.take(w, labels, axis=1).T  # [B, n]
        wd = w[None, :, :] - w_y[:, :, None]  # [B, n, C]
        b_d = self.bias[None, :] - self.bias[labels][:, None]
        m = (jnp.einsum("bn,bnc->bc", c, wd, precision=HIGHEST)
             + jnp.einsum("bn,bnc->bc", r, jnp.abs(wd), precision=HIGHEST) + b_d)
        return jnp.where(jax.nn.one_hot(labels, m.shape[-1], dtype=bool), 0.0, m)
