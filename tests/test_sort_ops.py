"""SortNet's inference neuron (linf_jax.ops.sort_dist and its bounds, grouped and conv forms)
against float64 NumPy references on fresh Gaussian inputs: values, both gradients, first-index
tie-breaking, K > n, the ℓ∞ special cases bit for bit, the CPU and GPU/TPU shapes of the XLA
code (the latter run here through ``traced_in_shape``), vmap, the dropout expectation it stands
for, 1-Lipschitz continuity, exact and attained bounds, and lowering for GPUs and TPUs.

JAX runs in float32; every reference is computed in float64 from the same float32 inputs.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_patches

from linf_jax import lowering, native, ops
from linf_jax.ops import sort, xla

SHAPES = {
    "ragged": (5, 37, 131),  # out > the CPU tile at B = 5 (128 rows): a padded tile
    "small": (3, 16, 7),
}
Q = 0.75
VAL_TOL = 2e-6
GRAD_TOL = 2e-6


#: The implementations: the native kernels (where they build), the XLA code in its CPU shape
#: and in its GPU/TPU shape (run here through ``traced_in_shape``).
IMPLS = ["native", "xla-cpu", "xla-accel"]


@contextlib.contextmanager
def implementation(name):
    """Traces the code inside with implementation ``name`` of :data:`IMPLS` (programs jitted
    inside must be fresh functions, traced there)."""
    if name == "native" and not native.available():
        pytest.skip(f"no native build: {native.unavailable_reason()}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(ops.use_kernels("native" if name == "native" else "xla"))
        if name != "native":
            stack.enter_context(xla.traced_in_shape(name[4:]))
        yield


def rand(rng, *shape, scale=2.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def rel_err(got, ref):
    got, ref = np.float64(got), np.float64(ref)
    return np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)


# --------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------


def np_order(d, k):
    """The coordinates of the K largest of ``d`` along the last axis, largest first, equal
    values by coordinate (first first)."""
    return np.argsort(-d, axis=-1, kind="stable")[..., :min(k, d.shape[-1])]


def np_sort(x, w, q, k):
    """``[B, out]`` values, float64."""
    d = np.abs(np.float64(x)[:, None, :] - np.float64(w)[None])
    om = ops.sort_weights(q, k, d.shape[-1])
    return np.take_along_axis(d, np_order(d, k), -1) @ om


def np_sort_vjp(x, w, q, k, g):
    """``(gx, gw)`` for the cotangent g, float64: ω_j·sign(d) at the coordinate of rank j."""
    diff = np.float64(x)[:, None, :] - np.float64(w)[None]
    order = np_order(np.abs(diff), k)
    om = ops.sort_weights(q, k, diff.shape[-1])
    big_g = np.zeros_like(diff)
    np.put_along_axis(big_g, order, np.broadcast_to(om, order.shape), -1)
    big_g *= np.sign(diff) * np.float64(g)[..., None]
    return big_g.sum(1), -big_g.sum(0)


def np_sort_bounds(lo, hi, w, q, k):
    lo, hi, w = (np.float64(a) for a in (lo, hi, w))
    l_, u_, w_ = lo[:, None, :], hi[:, None, :], w[None]
    d_lo = np.maximum(np.maximum(l_ - w_, w_ - u_), 0.0)
    d_hi = np.maximum(u_ - w_, w_ - l_)
    om = ops.sort_weights(q, k, w.shape[-1])
    return tuple(np.take_along_axis(d, np_order(d, k), -1) @ om for d in (d_lo, d_hi))


def np_grouped(fn, x, w, groups):
    n, out = x.shape[1] // groups, w.shape[0] // groups
    parts = [fn(x[:, g * n:(g + 1) * n], w[g * out:(g + 1) * out]) for g in range(groups)]
    return tuple(np.concatenate(t, axis=1) for t in zip(*parts, strict=True))


# --------------------------------------------------------------------------------------------
# jitted value + VJP
# --------------------------------------------------------------------------------------------


def _value_and_vjp(x, w, q, k, g):
    y, vjp = jax.vjp(lambda x, w: ops.sort_dist(x, w, q, k), x, w)
    return (y, *vjp(g))


value_and_vjp = jax.jit(_value_and_vjp, static_argnums=(2, 3))


def _inputs(shape, seed, scale=2.0):
    b, n, out = shape
    rng = np.random.default_rng(seed)
    return rand(rng, b, n, scale=scale), rand(rng, out, n, scale=scale), rand(rng, b, out, scale=1)


def _check(out, x, w, q, k, g):
    y, gx, gw = (np.asarray(a) for a in out)
    assert y.dtype == gx.dtype == gw.dtype == np.float32
    ref_gx, ref_gw = np_sort_vjp(x, w, q, k, g)
    assert rel_err(y, np_sort(x, w, q, k)) < VAL_TOL, (q, k)
    assert rel_err(gx, ref_gx) < GRAD_TOL, (q, k)
    assert rel_err(gw, ref_gw) < GRAD_TOL, (q, k)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_value_and_grads_match_float64(shape, impl):
    """Every implementation; k = 2, 10 and k > n; q = 0.75 and 0.3."""
    x, w, g = _inputs(shape, seed=sum(shape))
    with implementation(impl):
        for q, k in [(Q, 10), (0.3, 2), (Q, 64)]:
            # a fresh function: traced here, in the forced shape, not served from a cache
            fn = jax.jit(lambda x, w, g, q=q, k=k: _value_and_vjp(x, w, q, k, g))
            _check(fn(x, w, g), x, w, q, k, g)


def test_default_dispatch_matches_float64_with_ties():
    """As dispatched (no forced shape), under jit; repeated values in x and w make equal
    distances, which rank by coordinate, and one row of all-equal distances keeps the first K
    coordinates."""
    x, w, g = _inputs(SHAPES["ragged"], seed=3)
    x[:, 20], w[:, 20] = x[:, 3], w[:, 3]  # d_20 = d_3 for every pair
    x[:, 30], w[:, 30] = x[:, 3], w[:, 3]
    x[1], w[4] = 1.0, 0.0  # every |x_1 - w_4| is 1
    for k in (3, 10):
        out = value_and_vjp(x, w, Q, k, g)
        _check(out, x, w, Q, k, g)
        # x_1 against w_4: the first k coordinates get ω_j, the others nothing
        one = np.asarray(value_and_vjp(x, w, Q, k, _unit(5, 131, 1, 4))[1])[1]
        np.testing.assert_allclose(one[:k], ops.sort_weights(Q, k, 37), rtol=1e-6)
        assert not one[k:].any()


def _unit(b, out, i, o):
    g = np.zeros((b, out), np.float32)
    g[i, o] = 1.0
    return g


def test_cpu_and_accelerator_shapes_pick_the_same_coordinates(monkeypatch):
    """The K coordinates (the backward pass's residuals) are the same in both shapes, with
    ties, and with chunks narrower than K (the carry holds unfilled −1 slots between chunks)
    and a zero-padded last chunk."""
    x, w, _ = _inputs((4, 29, 6), seed=5)
    x[:, 9], w[:, 9] = x[:, 2], w[:, 2]
    x[0], w[1] = 0.5, -0.5
    with implementation("xla-cpu"):
        cpu = jax.jit(lambda x, w: sort._value_indexed(x, w, Q, 10))(x, w)
    for elements in (4 * 6 * 3, 4 * 6 * 11, 1 << 26):  # chunks of 3 and 11 coordinates, one
        monkeypatch.setattr(sort, "ACCEL_SORT_ELEMENTS", elements)
        with implementation("xla-accel"):
            acc = jax.jit(lambda x, w: sort._value_indexed(x, w, Q, 10))(x, w)
        np.testing.assert_array_equal(acc[1], cpu[1])
        np.testing.assert_allclose(acc[0], cpu[0], rtol=1e-6)
    order = np.moveaxis(np_order(np.abs(np.float64(x)[:, None] - np.float64(w)[None]), 10), -1, 0)
    np.testing.assert_array_equal(cpu[1], order)


@pytest.mark.parametrize("case", ["q1", "k1", "n1"])
def test_linf_special_cases_are_the_linf_op_bit_for_bit(case):
    x, w, g = _inputs(SHAPES["ragged"], seed=7)
    if case == "n1":
        x, w = x[:, :1], w[:, :1]  # K = min(10, 1) = 1
    q, k = {"q1": (1.0, 10), "k1": (Q, 1), "n1": (Q, 10)}[case]
    got = value_and_vjp(x, w, q, k, g)

    @jax.jit
    def want_fn(x, w, g):
        y, vjp = jax.vjp(ops.linf_dist, x, w)
        return (y, *vjp(g))

    want = want_fn(x, w, g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    lo, hi = x - 0.3, x + 0.2
    for a, b in zip(ops.sort_dist_bounds(lo, hi, w, q, k), ops.linf_dist_bounds(lo, hi, w),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights():
    om = ops.sort_weights(0.75, 10, 1024)
    assert om.dtype == np.float64 and om.shape == (10,)
    np.testing.assert_allclose(om.sum(), 1.0, rtol=1e-15)
    np.testing.assert_allclose(om[1:] / om[:-1], 0.25)
    assert (om > 0).all()
    assert ops.sort_weights(0.5, 10, 4).shape == (4,)  # K = min(k, n)
    np.testing.assert_array_equal(ops.sort_weights(1.0, 5, 9), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ops.sort_weights(0.3, 1, 9), [1.0])


@pytest.mark.parametrize(("q", "k", "message"), [
    (0.0, 10, "q=0.0 is not allowed"), (1.5, 10, "q=1.5 is not allowed"),
    (-0.2, 10, "q=-0.2 is not allowed"), ("half", 10, "q='half' is not allowed"),
    (True, 10, "q=True is not allowed"), (Q, 0, "top_k=0 is not allowed"),
    (Q, 2.5, "top_k=2.5 is not allowed"), (Q, False, "top_k=False is not allowed"),
])
def test_bad_q_or_k_is_one_line(q, k, message):
    x, w, _ = _inputs(SHAPES["small"], seed=0)
    for fn in (lambda: ops.sort_dist(x, w, q, k), lambda: ops.sort_dist_bounds(x, x, w, q, k),
               lambda: ops.sort_weights(q, k, 16)):
        with pytest.raises(ValueError, match=message) as err:
            fn()
        assert "\n" not in str(err.value)


def test_traced_q_is_refused():
    x, w, _ = _inputs(SHAPES["small"], seed=0)
    with pytest.raises(ValueError, match="static number"):
        jax.jit(lambda q: ops.sort_dist(x, w, q, 4))(0.5)


# --------------------------------------------------------------------------------------------
# what the neuron is: the dropout expectation, 1-Lipschitz
# --------------------------------------------------------------------------------------------


def test_mean_over_bernoulli_masks_is_the_neuron_with_k_equal_n():
    """E_S[max_{i ∈ S} d_i] over i.i.d. Bernoulli(q) masks S (0 for an empty S) is
    ``(1 − (1−q)^n)·u`` with u the neuron at K = n (the max is d_(j) when the j − 1 larger ones
    are dropped and d_(j) kept); at K = 10 the truncation moves u by at most
    ``(1−q)^10·max d``."""
    rng = np.random.default_rng(12)
    b, n, out, q, samples = 2, 24, 3, 0.4, 40000
    x, w = rand(rng, b, n), rand(rng, out, n)
    d = np.abs(np.float64(x)[:, None, :] - np.float64(w)[None])  # [B, out, n]
    masks = rng.uniform(size=(samples, n)) < q
    draws = np.where(masks[:, None, None, :], d[None], 0.0).max(-1)  # [S, B, out]
    mean, sem = draws.mean(0), draws.std(0) / np.sqrt(samples)
    full = np.asarray(ops.sort_dist(x, w, q, k=n), np.float64)
    expected = (1 - (1 - q) ** n) * full
    assert (np.abs(mean - expected) < 5 * sem + 1e-6).all(), (mean, expected, sem)
    truncated = np.asarray(ops.sort_dist(x, w, q, k=10), np.float64)
    bound = (1 - q) ** 10 * d.max(-1)
    assert (np.abs(truncated - full) <= bound * (1 + 1e-5) + 1e-6).all()
    assert (np.abs(truncated - full) > 0).any()


def test_one_lipschitz_in_the_max_norm():
    rng = np.random.default_rng(13)
    b, n, out = 64, 30, 9
    x, w = rand(rng, b, n), rand(rng, out, n)
    step = rand(rng, b, n, scale=1.0) * rng.uniform(0, 1, size=(b, 1)).astype(np.float32)
    x2 = x + step
    fn = jax.jit(lambda x: ops.sort_dist(x, w, 0.6, 7))
    gap = np.abs(np.float64(fn(x)) - np.float64(fn(x2)))
    dist = np.abs(np.float64(x2) - np.float64(x)).max(-1, keepdims=True)
    assert (gap <= dist * (1 + 1e-5) + 1e-5).all()
    assert (gap > 0.5 * dist).any()  # the bound is not vacuous here


# --------------------------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------------------------


def _box(rng, b, n):
    x = rand(rng, b, n)
    eps = rng.uniform(0.0, 1.5, size=(b, n)).astype(np.float32)
    return x - eps, x + eps


@pytest.mark.parametrize("impl", IMPLS)
def test_bounds_exact_attained_and_hold(impl):
    """[lo, hi] equals the float64 reference, holds every random point of each box and both
    corners, and is attained: lo at ``clip(w, l, u)``, hi at the far corner."""
    b, n, out, k = 4, 37, 9, 10
    rng = np.random.default_rng(14)
    lo, hi = _box(rng, b, n)
    w = rand(rng, out, n)
    w[0] = (lo[0] + hi[0]) / 2  # w_0 inside the box of sample 0: lower bound 0
    with implementation(impl):
        lower, upper = (np.asarray(a) for a in jax.jit(
            lambda lo, hi, w: ops.sort_dist_bounds(lo, hi, w, Q, k))(lo, hi, w))
        neuron = jax.jit(lambda z: ops.sort_dist(z, w, Q, k))
        ref_lower, ref_upper = np_sort_bounds(lo, hi, w, Q, k)
        assert rel_err(lower, ref_lower) < VAL_TOL and rel_err(upper, ref_upper) < VAL_TOL
        assert lower[0, 0] == 0.0 and (lower < upper).all()
        l3, u3, w3 = lo[:, None, :], hi[:, None, :], w[None, :, :]
        z_lower = np.clip(w3, l3, u3)
        z_upper = np.where(np.abs(l3 - w3) >= np.abs(u3 - w3), l3, u3)
        for z, bound in ((z_lower, lower), (z_upper, upper)):
            d = np.asarray(neuron(z.reshape(b * out, n))).reshape(b, out, out)
            np.testing.assert_allclose(np.einsum("boo->bo", d), bound, rtol=1e-6, atol=1e-6)
        s = 64
        t = rng.uniform(size=(s, b, n)).astype(np.float32)
        z = np.clip(np.concatenate([lo[None] + t * (hi - lo)[None], lo[None], hi[None]]), lo, hi)
        y = np.asarray(neuron(z.reshape(-1, n))).reshape(s + 2, b, out)
        assert (y >= lower - 1e-6).all() and (y <= upper + 1e-6).all()


def test_bounds_gradients_match_float64():
    """The custom VJP of the bounds: the terms of the K ranked coordinates of each output."""
    b, n, out, k = 3, 21, 5, 6
    rng = np.random.default_rng(15)
    lo, hi = _box(rng, b, n)
    w = rand(rng, out, n)
    g_lo, g_hi = rand(rng, b, out, scale=1), rand(rng, b, out, scale=1)
    (lower, upper), vjp = jax.vjp(lambda *a: ops.sort_dist_bounds(*a, Q, k), lo, hi, w)
    got = vjp((jnp.asarray(g_lo), jnp.asarray(g_hi)))
    l3, u3, w3 = (np.float64(a) for a in (lo[:, None, :], hi[:, None, :], w[None]))
    om = ops.sort_weights(Q, k, n)
    want = [np.zeros((b, n)), np.zeros((b, n)), np.zeros((out, n))]
    for terms, g, parts in (
            # (d, ∂d/∂l, ∂d/∂u, ∂d/∂w) of each term, branches as jnp.maximum takes them
            ((np.maximum(np.maximum(l3 - w3, w3 - u3), 0.0)), g_lo, "lo"),
            ((np.maximum(u3 - w3, w3 - l3)), g_hi, "hi")):
        order = np_order(terms, k)
        coef = np.zeros_like(terms)
        np.put_along_axis(coef, order, np.broadcast_to(om, order.shape), -1)
        coef *= np.float64(g)[..., None]
        if parts == "lo":  # l − w (∂l = 1, ∂w = −1) or w − u (∂w = 1, ∂u = −1), or 0
            left = ((l3 - w3 > w3 - u3) & (terms > 0)).astype(float)
            right = ((l3 - w3 < w3 - u3) & (terms > 0)).astype(float)
            dl, du, dw = left * coef, -right * coef, (right - left) * coef
        else:  # u − w (∂u = 1, ∂w = −1) or w − l (∂w = 1, ∂l = −1)
            up = (u3 - w3 > w3 - l3).astype(float)
            dl, du, dw = -(1 - up) * coef, up * coef, (1 - 2 * up) * coef
        want[0] += dl.sum(1)
        want[1] += du.sum(1)
        want[2] += dw.sum(0)
    for a, c in zip(got, want, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    ref = np_sort_bounds(lo, hi, w, Q, k)
    assert rel_err(lower, ref[0]) < VAL_TOL and rel_err(upper, ref[1]) < VAL_TOL


# --------------------------------------------------------------------------------------------
# grouped, conv, vmap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_sort_dist_and_bounds(groups):
    rng = np.random.default_rng(16)
    b, n, out, k = 4, 3 * 13, 3 * 5, 8
    x, w, g = rand(rng, b, n), rand(rng, out, n // groups), rand(rng, b, out, scale=1)
    y, vjp = jax.vjp(lambda x, w: ops.grouped_sort_dist(x, w, Q, k, groups), x, w)
    gx, gw = vjp(g)
    ref = np_grouped(lambda a, v: (np_sort(a, v, Q, k),), x, w, groups)[0]
    assert rel_err(y, ref) < VAL_TOL
    nb, ob = n // groups, out // groups
    ref_gx, ref_gw = np.zeros(x.shape), np.zeros(w.shape)
    for i in range(groups):
        cols, rows = slice(i * nb, (i + 1) * nb), slice(i * ob, (i + 1) * ob)
        ref_gx[:, cols], ref_gw[rows] = np_sort_vjp(x[:, cols], w[rows], Q, k, g[:, rows])
    assert rel_err(gx, ref_gx) < GRAD_TOL and rel_err(gw, ref_gw) < GRAD_TOL
    lo, hi = _box(rng, b, n)
    got = ops.grouped_sort_bounds(lo, hi, w, Q, k, groups)
    want = _np_grouped_bounds(lo, hi, w, Q, k, groups)
    for a, c in zip(got, want, strict=True):
        assert rel_err(a, c) < VAL_TOL


def _np_grouped_bounds(lo, hi, w, q, k, groups):
    n, out = lo.shape[1] // groups, w.shape[0] // groups
    parts = [np_sort_bounds(lo[:, i * n:(i + 1) * n], hi[:, i * n:(i + 1) * n],
                            w[i * out:(i + 1) * out], q, k) for i in range(groups)]
    return tuple(np.concatenate(t, axis=1) for t in zip(*parts, strict=True))


CONV_CASES = {
    "plain": dict(stride=1, padding=0, dilation=1, groups=1),
    "stride2-pad1": dict(stride=2, padding=1, dilation=1, groups=1),
    "dil2-groups2": dict(stride=1, padding=2, dilation=2, groups=2),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_sort_dist_and_bounds(case):
    rng = np.random.default_rng(17)
    c, out, ks, k = 4, 6, 3, 10
    x = rand(rng, 2, 7, 6, c)
    w = rand(rng, out, c // case["groups"], ks, ks)
    y = np.asarray(ops.conv_sort_dist(x, w, Q, k, **case))
    f = c * ks * ks
    pt = np_patches(x, ks, case["stride"], case["padding"], case["dilation"])
    shape = pt.shape[:3] + (out,)
    groups = case["groups"]
    ref = np_grouped(lambda a, v: (np_sort(a, v, Q, k),), pt.reshape(-1, f), w.reshape(out, -1),
                     groups)[0].reshape(shape)
    assert y.shape == ref.shape and rel_err(y, ref) < VAL_TOL
    eps = rng.uniform(0.0, 1.0, size=x.shape).astype(np.float32)
    lo, hi = x - eps, x + eps
    lower, upper = (np.asarray(a) for a in ops.conv_sort_bounds(lo, hi, w, Q, k, **case))
    pl = np_patches(lo, ks, case["stride"], case["padding"], case["dilation"]).reshape(-1, f)
    pu = np_patches(hi, ks, case["stride"], case["padding"], case["dilation"]).reshape(-1, f)
    ref_lower, ref_upper = _np_grouped_bounds(pl, pu, w.reshape(out, -1), Q, k, groups)
    assert rel_err(lower, ref_lower.reshape(shape)) < VAL_TOL
    assert rel_err(upper, ref_upper.reshape(shape)) < VAL_TOL
    conv = jax.jit(lambda z: ops.conv_sort_dist(z, w, Q, k, **case))
    for _ in range(8):
        z = np.clip(lo + rng.uniform(size=x.shape).astype(np.float32) * (hi - lo), lo, hi)
        d = np.asarray(conv(z))
        assert (d >= lower - 1e-6).all() and (d <= upper + 1e-6).all()


def test_vmap_over_members_of_w_and_of_x():
    rng = np.random.default_rng(18)
    members, b, n, out, k = 3, 4, 21, 9, 5
    x, ws, g = rand(rng, b, n), rand(rng, members, out, n), rand(rng, members, b, out, scale=1)
    xs = rand(rng, members, b, n)
    fn = lambda x, w: ops.sort_dist(x, w, Q, k)  # noqa: E731
    loss = lambda x, w, g: (fn(x, w) * g).sum()  # noqa: E731
    one, one_grad = jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1)))

    y = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(x, ws)
    for i in range(members):
        np.testing.assert_allclose(y[i], one(x, ws[i]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y[i], np_sort(x, ws[i], Q, k), rtol=2e-6, atol=1e-6)
    vloss = lambda x, ws: jax.vmap(loss, in_axes=(None, 0, 0))(x, ws, g).sum()  # noqa: E731
    gx, gws = jax.jit(jax.grad(vloss, argnums=(0, 1)))(x, ws)
    grads = [one_grad(x, ws[i], g[i]) for i in range(members)]
    np.testing.assert_allclose(gx, sum(gr[0] for gr in grads), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gws, np.stack([gr[1] for gr in grads]), rtol=1e-5, atol=1e-6)

    y2 = jax.jit(jax.vmap(fn))(xs, ws)
    np.testing.assert_allclose(y2, np.stack([one(xs[i], ws[i]) for i in range(members)]),
                               rtol=1e-6, atol=1e-6)
    lo, hi = xs - 0.2, xs + 0.3
    bounds = jax.jit(jax.vmap(lambda l, u, w: ops.sort_dist_bounds(l, u, w, Q, k)))(lo, hi, ws)
    for i in range(members):
        ref = np_sort_bounds(lo[i], hi[i], ws[i], Q, k)
        for a, c in zip(bounds, ref, strict=True):
            assert rel_err(a[i], c) < VAL_TOL


# --------------------------------------------------------------------------------------------
# the native kernels against the XLA code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(37, 10), (37, 20), (100, 40), (5, 10), (16, 16)])
def test_native_picks_the_xla_coordinates_and_signs(n, k):
    """Raw kernel outputs: the K coordinates (rank order) and signs equal the XLA code's, with
    ties, for K up to one vector of candidates (a bitonic sort), beyond it (insertion), and
    beyond two vectors of lane maxima (no threshold); y to float32 rounding; the bounds too."""
    if not native.available():
        pytest.skip(f"no native build: {native.unavailable_reason()}")
    x, w, _ = _inputs((6, n, 9), seed=n + k)
    x[:, n // 2], w[:, n // 2] = x[:, 1], w[:, 1]  # ties everywhere
    x[2], w[3] = 1.5, -0.5  # one pair of all-equal distances
    w[4] = x[4]  # and one of zero distances
    kk = min(k, n)
    om = sort.sort_weights(Q, kk, kk)
    y, idx, sign = (np.asarray(a) for a in jax.jit(native.sort_fwd)(x, w, om))
    with implementation("xla-cpu"):
        want_y, want_idx = jax.jit(lambda x, w: sort._value_indexed(x, w, Q, kk))(x, w)
    np.testing.assert_array_equal(idx.reshape(6, 9, kk), np.moveaxis(np.asarray(want_idx), 0, -1))
    diff = np.take_along_axis(np.float64(x)[:, None, :] - np.float64(w)[None], idx.reshape(
        6, 9, kk), -1)
    np.testing.assert_array_equal(sign.reshape(6, 9, kk), np.sign(diff))
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(native.sort_max)(x, w, om), y, rtol=1e-6)
    lo, hi = x - 0.4, x + 0.3
    got = jax.jit(native.sort_bounds)(lo, hi, w, om)
    with implementation("xla-cpu"):
        want = jax.jit(lambda *a: sort._bounds_value(*a, Q, kk))(lo, hi, w)
    for a, c in zip(got, want, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)


def test_native_nan_and_inf_follow_xla():
    """Rows with a NaN or an infinity are redone in scalar code: NaN where a distance is NaN,
    as in the XLA code; infinite distances rank first."""
    if not native.available():
        pytest.skip(f"no native build: {native.unavailable_reason()}")
    x, w, _ = _inputs((4, 40, 6), seed=21)
    x[1, 17] = np.nan
    w[2, 3] = np.inf
    x[3, 3] = np.inf  # inf - inf = nan at (3, 2)
    with implementation("native"):
        got = np.asarray(jax.jit(lambda x, w: ops.sort_dist(x, w, Q, 10))(x, w))
    with implementation("xla-cpu"):
        want = np.asarray(jax.jit(lambda x, w: ops.sort_dist(x, w, Q, 10))(x, w))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[1]).all() and np.isnan(got[3, 2]) and np.isinf(got[0, 2])
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# accelerators, memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators_without_cpu_custom_calls(platform):
    """Forward+backward and the bounds' forward+backward, traced on this CPU host and lowered
    for a GPU or a TPU: the chunked ``lax.top_k`` code, no project CPU custom call."""
    sds = jax.ShapeDtypeStruct
    x, w, g = sds((64, 300), jnp.float32), sds((128, 300), jnp.float32), sds((64, 128),
                                                                            jnp.float32)

    def step(x, w, g):
        loss = lambda x, w: (ops.sort_dist(x, w, Q, 10) * g).sum()  # noqa: E731
        lo, hi = ops.sort_dist_bounds(x - 0.1, x + 0.1, w, Q, 10)
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w), lo, hi

    text = jax.jit(step).trace(x, w, g).lower(lowering_platforms=(platform,)).as_text()
    assert "topk" in text.lower() or "top_k" in text.lower()
    assert not {c for c in lowering.custom_calls(text) if c.startswith("linf_jax")}
    count = lowering.loop_iterations(step, x, w, g, platform=platform)
    assert count.unbounded == 0 and count.program <= 10, count


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_bound(impl):
    """Forward+backward temporaries stay under an eighth of a ``[B, out, in]`` float32 tensor
    (compile only; the GPU/TPU shape compiled for the CPU here)."""
    b, n, out = 512, 2048, 2048
    limit = b * n * out * 4 // 8
    sds = jax.ShapeDtypeStruct
    x, w, g = sds((b, n), jnp.float32), sds((out, n), jnp.float32), sds((b, out), jnp.float32)

    def step(x, w, g):
        loss = lambda x, w: (ops.sort_dist(x, w, Q, 10) * g).sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    with implementation(impl):
        stats = jax.jit(lambda *a: step(*a)).lower(x, w, g).compile().memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis() is not available on this backend")
    assert stats.temp_size_in_bytes + stats.output_size_in_bytes < limit
