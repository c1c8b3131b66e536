"""linf_jax.ops against float64 NumPy references: values, gradients, bounds, grouped and conv
variants, NaN/inf safety, vmap, and the no-``B·out·in`` memory bound (compile only).

JAX runs in float32 throughout; every reference is computed in NumPy float64 from the same
float32 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_patches

from linf_jax import ops

INF = float("inf")
P_ALL = [1.0, 2.0, 8.0, 8.5, 100.0, 1000.0, INF]
P_FINITE = [p for p in P_ALL if p != INF]
VAL_TOL = 1e-5
GRAD_TOL = 1e-4


def grad_tol(p):
    """1e-4, except where float32 itself cannot reach it: the gradient term ``(|d|/y)^(p-1)`` has
    condition number p - 1 with respect to y, so a y within a few roundings of the exact value
    (``2^-24`` each) already moves it by ``~3(p-1)·2^-24``: 1.8e-4 at p = 1000. Measured: 0.8-1.2e-4
    at p = 1000, and 0.5-0.6e-4 even with the exactly rounded float64 y in the backward pass."""
    return GRAD_TOL if p == INF else max(GRAD_TOL, 4 * (p - 1) * 2.0**-24)
SHAPES = {
    "ragged": (5, 37, 131),  # in % 16 != 0, out % 128 != 0 (tiled path, padded tile)
    "small": (3, 16, 7),  # out <= 128 (untiled path), in a multiple of 16
}


# --------------------------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------------------------


def np_dist(x, w, p):
    """``[B, out]`` distances, float64, stable form."""
    a = np.abs(np.float64(x)[:, None, :] - np.float64(w)[None, :, :])
    m = a.max(-1)
    if p == INF:
        return m
    ms = np.where(m > 0, m, 1.0)
    return m * ((a / ms[..., None]) ** p).sum(-1) ** (1.0 / p)


def np_dist_vjp(x, w, p, g):
    """``(gx, gw)`` for the cotangent g, float64."""
    d = np.float64(x)[:, None, :] - np.float64(w)[None, :, :]
    a = np.abs(d)
    if p == INF:
        onehot = np.zeros_like(a)
        idx = a.argmax(-1)
        np.put_along_axis(onehot, idx[..., None], 1.0, axis=-1)
        big_g = np.sign(d) * onehot
    else:
        y = np_dist(x, w, p)
        ys = np.where(y > 0, y, 1.0)
        big_g = np.sign(d) * (a / ys[..., None]) ** (p - 1.0)
    big_g = big_g * np.float64(g)[..., None]
    return big_g.sum(1), -big_g.sum(0)


def np_bounds(lo, hi, w):
    """Exact interval of ``||z - w_o||_∞`` over the box, float64."""
    lo, hi, w = (np.float64(a) for a in (lo, hi, w))
    l_, u_, w_ = lo[:, None, :], hi[:, None, :], w[None, :, :]
    lower = np.maximum(np.maximum(l_ - w_, w_ - u_), 0.0).max(-1)
    upper = np.maximum(np.abs(l_ - w_), np.abs(u_ - w_)).max(-1)
    return lower, upper


def np_grouped(fn, x, w, groups):
    """Applies ``fn(x_block, w_block)`` per group and concatenates the outputs."""
    n, out = x.shape[1] // groups, w.shape[0] // groups
    parts = [fn(x[:, g * n:(g + 1) * n], w[g * out:(g + 1) * out]) for g in range(groups)]
    return np.concatenate(parts, axis=1)


def np_conv(x, w, p, stride, padding, dilation, groups, bounds_upper=None):
    out, _, k, _ = w.shape
    pt = np_patches(x, k, stride, padding, dilation)
    b, h, wd, f = pt.shape
    wf = np.float64(w).reshape(out, -1)
    if bounds_upper is None:
        y = np_grouped(lambda a, v: np_dist(a, v, p), pt.reshape(-1, f), wf, groups)
        return y.reshape(b, h, wd, out)
    pu = np_patches(bounds_upper, k, stride, padding, dilation).reshape(-1, f)
    lo, hi = _np_grouped_bounds(pt.reshape(-1, f), pu, wf, groups)
    return lo.reshape(b, h, wd, out), hi.reshape(b, h, wd, out)


def _np_grouped_bounds(lo, hi, w, groups):
    n, out = lo.shape[1] // groups, w.shape[0] // groups
    parts = [np_bounds(lo[:, g * n:(g + 1) * n], hi[:, g * n:(g + 1) * n],
                       w[g * out:(g + 1) * out]) for g in range(groups)]
    return tuple(np.concatenate(t, axis=1) for t in zip(*parts, strict=True))


def rel_err(got, ref):
    got, ref = np.float64(got), np.float64(ref)
    return np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)


def rand(rng, *shape, scale=2.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Jitted value + VJP, static and traced p
# --------------------------------------------------------------------------------------------


def _value_and_vjp(fn, x, w, p, g):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, p), x, w)
    return (y, *vjp(g))


@functools.partial(jax.jit, static_argnums=(2,))
def vjp_static(x, w, p, g):
    return _value_and_vjp(ops.dist, x, w, p, g)


@jax.jit
def vjp_traced(x, w, p, g):
    return _value_and_vjp(ops.dist, x, w, p, g)


@jax.jit
def vjp_traced_lp(x, w, p, g):
    return _value_and_vjp(ops.lp_dist, x, w, p, g)


def _check(out, x, w, p, g):
    y, gx, gw = (np.asarray(a) for a in out)
    assert y.dtype == gx.dtype == gw.dtype == np.float32
    ref_gx, ref_gw = np_dist_vjp(x, w, p, g)
    assert rel_err(y, np_dist(x, w, p)) < VAL_TOL, p
    assert rel_err(gx, ref_gx) < grad_tol(p), p
    assert rel_err(gw, ref_gw) < grad_tol(p), p


def _inputs(shape, seed, scale=2.0):
    b, n, out = shape
    rng = np.random.default_rng(seed)
    return rand(rng, b, n, scale=scale), rand(rng, out, n, scale=scale), rand(rng, b, out, scale=1)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("p", P_ALL)
def test_value_and_grad_static_p(shape, p):
    x, w, g = _inputs(shape, seed=1)
    _check(vjp_static(x, w, p, g), x, w, p, g)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_value_and_grad_traced_p(shape):
    """One compilation of ``dist`` with p as a jit argument serves every p (finite and ∞)."""
    x, w, g = _inputs(shape, seed=2)
    for p in P_ALL:
        _check(vjp_traced(x, w, jnp.float32(p), g), x, w, p, g)
    for p in P_FINITE:
        _check(vjp_traced_lp(x, w, jnp.float32(p), g), x, w, p, g)


@pytest.mark.parametrize("p", [8.0, 2.5, 100.0])
def test_lp_backward_tiled_over_wide_inputs(p, monkeypatch):
    """Wide inputs split the ℓp backward into input tiles (ragged: 300 = 3 tiles of 100); the
    gradients are those of the untiled float64 reference."""
    # tile 112 at B = 6
    monkeypatch.setattr(ops.xla, "LP_BWD_ELEMENTS", 6 * ops.xla.OUT_CHUNK * 112)
    x, w, g = _inputs((6, 300, 37), seed=7)
    out = jax.jit(lambda x, w, g: _value_and_vjp(ops.lp_dist, x, w, p, g))(x, w, g)
    _check(out, x, w, p, g)
    traced = jax.jit(lambda x, w, q, g: _value_and_vjp(ops.lp_dist, x, w, q, g))
    _check(traced(x, w, jnp.float32(p), g), x, w, p, g)


def test_jax_grad_and_entry_points():
    """``jax.grad`` of a scalar loss; ``linf_dist`` / ``lp_dist`` agree with ``dist``."""
    x, w, g = _inputs(SHAPES["small"], seed=3)
    for p in (INF, 8.0, 3.5):
        loss = lambda x, w, p=p: (ops.dist(x, w, p) * g).sum()
        gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
        ref_gx, ref_gw = np_dist_vjp(x, w, p, g)
        assert rel_err(gx, ref_gx) < GRAD_TOL and rel_err(gw, ref_gw) < GRAD_TOL
    np.testing.assert_array_equal(ops.linf_dist(x, w), ops.dist(x, w, INF))
    np.testing.assert_array_equal(ops.lp_dist(x, w, 8.0), ops.dist(x, w, 8))


# --------------------------------------------------------------------------------------------
# Interval bounds
# --------------------------------------------------------------------------------------------


def _box(rng, b, n, scale=2.0):
    c = rand(rng, b, n, scale=scale)
    r = rng.uniform(0.0, 2.0, size=(b, n)).astype(np.float32)
    return c - r, c + r


def test_linf_dist_bounds_exact_and_attained():
    b, n, out = 5, 37, 131
    rng = np.random.default_rng(4)
    lo, hi = _box(rng, b, n)
    w = rand(rng, out, n)
    w[0] = (lo[0] + hi[0]) / 2  # w_0 inside the box of sample 0: lower bound 0
    lower, upper = (np.asarray(a) for a in ops.linf_dist_bounds(lo, hi, w))
    ref_lower, ref_upper = np_bounds(lo, hi, w)
    np.testing.assert_allclose(lower, ref_lower, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(upper, ref_upper, rtol=1e-6, atol=1e-6)
    assert lower[0, 0] == 0.0 and (lower < upper).all()

    # Attaining points, one per (b, o): clip w_o to the box (lower); the farther end of every
    # coordinate's interval (upper, a corner).
    l3, u3, w3 = lo[:, None, :], hi[:, None, :], w[None, :, :]
    z_lower = np.clip(w3, l3, u3)
    z_upper = np.where(np.abs(l3 - w3) >= np.abs(u3 - w3), l3, u3)
    for z, bound in ((z_lower, lower), (z_upper, upper)):
        assert ((z >= l3) & (z <= u3)).all()
        d = np.asarray(ops.linf_dist(z.reshape(b * out, n), w)).reshape(b, out, out)
        attained = np.einsum("boo->bo", d)  # distance of z[b, o] to its own w_o
        np.testing.assert_allclose(attained, bound, rtol=1e-6, atol=1e-6)

    # Random points of each box (and its two extreme corners) lie inside the interval.
    s = 64
    t = rng.uniform(size=(s, b, n)).astype(np.float32)
    z = np.concatenate([lo[None] + t * (hi - lo)[None], lo[None], hi[None]])
    z = np.clip(z, lo, hi)
    d = np.asarray(ops.linf_dist(z.reshape(-1, n), w)).reshape(s + 2, b, out)
    assert (d >= lower - 1e-6).all() and (d <= upper + 1e-6).all()


# --------------------------------------------------------------------------------------------
# Grouped and convolutional variants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [INF, 8.0, 2.5])
@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_dist(p, groups):
    rng = np.random.default_rng(5)
    b, n, out = 4, 3 * 13, 3 * 5
    x, w, g = rand(rng, b, n), rand(rng, out, n // groups), rand(rng, b, out, scale=1)
    y, vjp = jax.vjp(lambda x, w: ops.grouped_dist(x, w, p, groups), x, w)
    gx, gw = vjp(g)
    assert rel_err(y, np_grouped(lambda a, v: np_dist(a, v, p), x, w, groups)) < VAL_TOL
    ref_gx, ref_gw = _np_grouped_vjp(x, w, p, g, groups)
    assert rel_err(gx, ref_gx) < GRAD_TOL and rel_err(gw, ref_gw) < GRAD_TOL


def _np_grouped_vjp(x, w, p, g, groups):
    n, out = x.shape[1] // groups, w.shape[0] // groups
    gx, gw = np.zeros(x.shape), np.zeros(w.shape)
    for k in range(groups):
        cols, rows = slice(k * n, (k + 1) * n), slice(k * out, (k + 1) * out)
        gx[:, cols], gw[rows] = np_dist_vjp(x[:, cols], w[rows], p, g[:, rows])
    return gx, gw


def test_linf_dist_bounds_gradient_and_vmap_match_float64():
    """The bounds are differentiable, and under vmap (one member after the other on the CPU)
    values and gradients equal the unbatched ones; the gradient of the upper bound is the
    float64 reference's: ±1 on the arg-max coordinate of the farther corner."""
    rng = np.random.default_rng(11)
    k, b, n, out = 3, 4, 37, 20
    lo, hi = _box(rng, k * b, n)
    lo, hi = lo.reshape(k, b, n), hi.reshape(k, b, n)
    w = rand(rng, k * out, n).reshape(k, out, n)
    gs = rand(rng, k * b, out).reshape(k, b, out)

    def f(lo, hi, w, g):
        lower, upper = ops.linf_dist_bounds(lo, hi, w)
        return (g * upper).sum() + (g * lower).sum()

    # Jitted once each: dispatched op by op, the blocked loops make this test slow (BENCHMARKS.md).
    grad_f = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    grads = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1, 2))))(lo, hi, w, gs)
    values = jax.jit(jax.vmap(ops.linf_dist_bounds))(lo, hi, w)
    grad_upper_w = jax.jit(jax.grad(lambda ww, lo, hi, g: (g * ops.linf_dist_bounds(lo, hi, ww)[1])
                                    .sum()))
    for i in range(k):
        single = grad_f(lo[i], hi[i], w[i], gs[i])
        for a, c in zip(grads, single, strict=True):
            np.testing.assert_allclose(a[i], c, rtol=1e-6, atol=1e-6)
        ref = np_bounds(lo[i], hi[i], w[i])
        for a, c in zip(values, ref, strict=True):
            np.testing.assert_allclose(a[i], c, rtol=1e-6, atol=1e-6)
        # float64 reference gradient of sum(g * upper) w.r.t. w: upper = max_j |far_j - w_j|.
        l3, u3 = np.float64(lo[i])[:, None, :], np.float64(hi[i])[:, None, :]
        w3 = np.float64(w[i])[None]
        far = np.maximum(u3 - w3, w3 - l3)
        j = far.argmax(-1)
        sign_w = np.where(np.take_along_axis(w3 - l3 > u3 - w3, j[..., None], -1)[..., 0],
                          1.0, -1.0)
        ref_gw = np.zeros((out, n))
        np.add.at(ref_gw, (np.arange(out)[None, :].repeat(b, 0), j), gs[i] * sign_w)
        gw_upper = grad_upper_w(w[i], lo[i], hi[i], gs[i])
        np.testing.assert_allclose(gw_upper, ref_gw, rtol=1e-5, atol=1e-5)


def test_grouped_bounds():
    rng = np.random.default_rng(6)
    lo, hi = _box(rng, 4, 24)
    w = rand(rng, 10, 12)
    lower, upper = ops.grouped_bounds(lo, hi, w, groups=2)
    ref_lower, ref_upper = _np_grouped_bounds(lo, hi, w, 2)
    np.testing.assert_allclose(lower, ref_lower, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(upper, ref_upper, rtol=1e-6, atol=1e-6)


CONV_CASES = {
    "plain": dict(stride=1, padding=0, dilation=1, groups=1),
    "stride2-pad1": dict(stride=2, padding=1, dilation=1, groups=1),
    "dil2-groups2": dict(stride=1, padding=2, dilation=2, groups=2),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@pytest.mark.parametrize("p", [INF, 8.0])
def test_conv_dist(case, p):
    rng = np.random.default_rng(7)
    c, out, k = 4, 6, 3
    x = rand(rng, 2, 7, 6, c)
    w = rand(rng, out, c // case["groups"], k, k)
    y = np.asarray(ops.conv_dist(x, w, p, **case))
    ref = np_conv(x, w, p, **case)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < VAL_TOL
    # Weight gradient against the reference VJP on the reference patches.
    g = rand(rng, *ref.shape, scale=1)
    _, vjp = jax.vjp(lambda w: ops.conv_dist(x, w, p, **case), w)
    (gw,) = vjp(g)
    f = c * k * k
    pt = np_patches(x, k, case["stride"], case["padding"], case["dilation"]).reshape(-1, f)
    _, ref_gw = _np_grouped_vjp(pt, w.reshape(out, -1), p, g.reshape(-1, out), case["groups"])
    assert rel_err(gw, ref_gw.reshape(w.shape)) < GRAD_TOL


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_bounds(case):
    rng = np.random.default_rng(8)
    c, out, k = 4, 6, 3
    x = rand(rng, 2, 7, 6, c)
    eps = rng.uniform(0.0, 1.5, size=x.shape).astype(np.float32)
    lo, hi = x - eps, x + eps
    w = rand(rng, out, c // case["groups"], k, k)
    lower, upper = (np.asarray(a) for a in ops.conv_bounds(lo, hi, w, **case))
    ref_lower, ref_upper = np_conv(lo, w, INF, **case, bounds_upper=hi)
    np.testing.assert_allclose(lower, ref_lower, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(upper, ref_upper, rtol=1e-6, atol=1e-6)
    conv = jax.jit(lambda z: ops.conv_dist(z, w, INF, **case))
    for _ in range(16):
        z = lo + rng.uniform(size=x.shape).astype(np.float32) * (hi - lo)
        d = np.asarray(conv(np.clip(z, lo, hi)))
        assert (d >= lower - 1e-6).all() and (d <= upper + 1e-6).all()


# --------------------------------------------------------------------------------------------
# NaN / inf safety
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
def test_no_nan_or_inf(traced):
    """Magnitudes 1e3, p up to 1000, and rows where x equals w exactly (distance 0)."""
    x, w, g = _inputs(SHAPES["ragged"], seed=9, scale=1e3)  # the shapes above: no recompiles
    equal = [(0, 3), (2, 0), (4, 130)]
    for i, o in equal:
        x[i] = w[o]
    for p in P_ALL:
        if traced:
            y, gx, gw = (np.asarray(a) for a in vjp_traced(x, w, jnp.float32(p), g))
        else:
            y, gx, gw = (np.asarray(a) for a in vjp_static(x, w, p, g))
        for a in (y, gx, gw):
            assert np.isfinite(a).all(), p
        for i, o in equal:
            assert y[i, o] == 0.0, p
        # Away from the zero-distance entries the result still matches the reference.
        _check((y, gx, gw), x, w, p, g)


def test_zero_distance_gradient_is_zero():
    x, w, g = _inputs(SHAPES["small"], seed=10)
    x[1] = w[2]
    g = np.zeros_like(g)
    g[1, 2] = 1.0
    for p in (INF, 8.0, 8.5, 1000.0):
        y, gx, gw = vjp_static(x, w, p, g)
        assert y[1, 2] == 0.0
        np.testing.assert_array_equal(gx, 0.0)
        np.testing.assert_array_equal(gw, 0.0)


# --------------------------------------------------------------------------------------------
# vmap over a leading member axis of w (ensembles)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [INF, 8.0, 2.5])
def test_vmap_over_members(p):
    rng = np.random.default_rng(11)
    members, b, n, out = 3, 4, 21, 9
    x, ws, g = rand(rng, b, n), rand(rng, members, out, n), rand(rng, members, b, out, scale=1)
    xs = rand(rng, members, b, n)
    fn = (lambda x, w: ops.linf_dist(x, w)) if p == INF else (lambda x, w: ops.lp_dist(x, w, p))
    one = jax.jit(fn)  # compiled once, called per member
    loss = lambda x, w, g: (fn(x, w) * g).sum()
    one_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))

    y = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(x, ws)
    np.testing.assert_allclose(y, np.stack([one(x, ws[i]) for i in range(members)]),
                               rtol=1e-6, atol=1e-6)

    # Gradients of the shared x (summed over members) and of each member's w.
    vloss = lambda x, ws: jax.vmap(loss, in_axes=(None, 0, 0))(x, ws, g).sum()
    gx, gws = jax.jit(jax.grad(vloss, argnums=(0, 1)))(x, ws)
    grads = [one_grad(x, ws[i], g[i]) for i in range(members)]
    np.testing.assert_allclose(gx, sum(gr[0] for gr in grads), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gws, np.stack([gr[1] for gr in grads]), rtol=1e-5, atol=1e-5)

    # Members of x too (each member sees its own batch), with p traced through dist.
    y2 = jax.jit(lambda xs, ws, p: jax.vmap(ops.dist, in_axes=(0, 0, None))(xs, ws, p))(
        xs, ws, jnp.float32(p))
    np.testing.assert_allclose(y2, np.stack([one(xs[i], ws[i]) for i in range(members)]),
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Memory: nothing of size B·out·in is materialised (compile only, never run)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["xla", None], ids=["xla", "default"])
@pytest.mark.parametrize("p", [INF, 8.0, "traced"])
def test_memory_bound(p, kernels):
    """Forward+backward temporaries stay under an eighth of a ``[B, out, in]`` tensor, for the XLA
    kernels and for the default choice (native custom calls on the CPU, whose own scratch is
    ``O(B·in + out·in)``: the zero-padded copies when ``in`` is not a multiple of 16)."""
    b, n, out = 512, 2048, 2048
    limit = b * n * out * 4 // 8  # one eighth of a float32 [B, out, in] tensor (1 GiB)
    sds = jax.ShapeDtypeStruct
    x, w, g = sds((b, n), jnp.float32), sds((out, n), jnp.float32), sds((b, out), jnp.float32)

    def step(x, w, g, p):
        loss = lambda x, w: (ops.dist(x, w, p) * g).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    with ops.use_kernels(kernels):  # traced here
        if p == "traced":
            lowered = jax.jit(step).lower(x, w, g, sds((), jnp.float32))
        else:
            lowered = jax.jit(step, static_argnums=(3,)).lower(x, w, g, p)
    stats = lowered.compile().memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis() is not available on this backend")
    used = stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert used < limit, (used, limit)
