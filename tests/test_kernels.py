"""Pallas kernels (linf_jax/ops/pallas.py): interpret mode against float64 NumPy and the XLA code
of linf_jax.ops, and cross-lowering for CUDA (Triton) and TPU (Mosaic) from this CPU machine.

Both kernel shapes run in interpret mode: the Triton bodies (``triton``: what a GPU compiles, and
what interpret mode runs off a TPU) and the Mosaic bodies (``mosaic``: ``_backend`` patched to
'tpu'). Small tiles, so that several tiles and padding on every axis are exercised (B = 5 over
tiles of 4, out = 19 over tiles of 8, in = 37 over tiles of 16); the Mosaic bodies also sweep
their output blocks in pieces smaller than a block (``_MOSAIC_PIECE`` patched to (4, 4)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linf_jax import ops
from linf_jax.ops import pallas
from linf_jax.ops.pallas import (
    Blocks,
    pallas_dist,
    pallas_linf_dist,
    pallas_linf_dist_bounds,
    pallas_lp_dist,
)

INF = float("inf")
SMALL = Blocks(b=4, out=8, n=16, unroll=4)
RTOL, ATOL = 2e-5, 2e-5


@pytest.fixture(params=["triton", "mosaic"])
def shape(request, monkeypatch):
    """Which kernel bodies the Pallas calls build (interpret mode runs either on the CPU)."""
    if request.param == "mosaic":
        monkeypatch.setattr(pallas, "_backend", lambda: "tpu")
        monkeypatch.setattr(pallas, "_MOSAIC_PIECE", (4, 4))
    return request.param


def _inputs(seed, b=5, n=37, out=19, scale=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=(b, n)).astype(np.float32)
    w = rng.normal(scale=scale, size=(out, n)).astype(np.float32)
    w[min(3, out - 1)] = x[min(1, b - 1)]  # one zero distance: y = 0 with zero (not NaN) gradient
    g = rng.normal(size=(b, out)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _zero_pair(b, out):
    return min(1, b - 1), min(3, out - 1)


def _value_and_grads(fn, x, w, g):
    loss = lambda x, w: (fn(x, w) * g).sum()
    y = jax.jit(fn)(x, w)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    return y, gx, gw


def _xla(fn):
    """``fn`` traced under the XLA code of linf_jax.ops."""

    def wrapped(*args):
        with ops.use_kernels("xla"):
            return fn(*args)

    return wrapped


def _assert_close(got, want, rtol=RTOL, atol=ATOL):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------------------------


def _np_value_and_grads(x, w, g, p):
    """``(y, dx, dw)`` of ``sum(g · dist_p(x, w))`` in float64: ℓ∞ through the first arg-max,
    ℓp through ``sign(d) (|d|/y)^(p-1)`` (0 where y = 0)."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    d = x[:, None, :] - w[None, :, :]
    a = np.abs(d)
    m = a.max(-1)
    if p == INF:
        i = a.argmax(-1)  # the first arg-max
        b_idx, o_idx = np.indices(i.shape)
        gs = g * np.sign(d[b_idx, o_idx, i])
        dx, dw = np.zeros_like(x), np.zeros_like(w)
        np.add.at(dx, (b_idx, i), gs)
        np.add.at(dw, (o_idx, i), -gs)
        return m, dx, dw
    safe_m = np.where(m > 0, m, 1.0)
    y = np.where(m > 0, m * ((a / safe_m[..., None]) ** p).sum(-1) ** (1.0 / p), 0.0)
    safe_y = np.where(y > 0, y, 1.0)[..., None]
    big_g = np.where(y[..., None] > 0, np.sign(d) * (a / safe_y) ** (p - 1.0), 0.0) * g[..., None]
    return y, big_g.sum(1), -big_g.sum(0)


def _np_bounds(lower, upper, w):
    """``(lo, hi)`` in float32 arithmetic, as the kernels compute them (the same differences)."""
    lc, uc, wc = lower[:, None, :], upper[:, None, :], w[None, :, :]
    lo = np.maximum(np.maximum(lc - wc, wc - uc).max(-1), 0.0)
    hi = np.maximum(uc - wc, wc - lc).max(-1)
    return lo, hi


# Float32 against float64: ℓp gradients carry (|d|/y)^(p-1), whose relative rounding grows with p.
F64_TOL = {INF: 1e-6, 8.0: 2e-5, 37.5: 5e-5, 1000.0: 2e-3}


# --------------------------------------------------------------------------------------------
# Interpret mode: values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [INF, 8.0, 37.5, 1000.0], ids=["inf", "p8_int", "p37.5", "p1000"])
def test_kernels_match_float64_and_xla_values_and_grads_ragged(shape, p):
    x, w, g = _inputs(seed=int(p) if p < INF else 1)
    got = _value_and_grads(lambda x, w: pallas_dist(x, w, p, interpret=True, blocks=SMALL),
                           x, w, g)
    want = _value_and_grads(_xla(lambda x, w: ops.dist(x, w, p)), x, w, g)
    _assert_close(got, want)
    tol = F64_TOL[p]
    _assert_close(got, _np_value_and_grads(x, w, g, p), rtol=tol, atol=tol)
    assert float(got[0][1, 3]) == 0.0  # the zero-distance pair, with finite gradients (above)


def test_bounds_kernel_is_bit_identical_and_differentiable(shape):
    """lo / hi are a max of the same float differences as linf_jax.ops (XLA and native) and
    NumPy; the gradient is the XLA code's."""
    x, w, g = _inputs(seed=21)
    rng = np.random.default_rng(22)
    lower = x - jnp.asarray(rng.uniform(0.0, 2.0, x.shape).astype(np.float32))
    upper = x + jnp.asarray(rng.uniform(0.0, 2.0, x.shape).astype(np.float32))
    lower = lower.at[1].set(w[3])  # a box corner on a weight row
    kern = lambda l, u, w: pallas_linf_dist_bounds(l, u, w, interpret=True, blocks=SMALL)
    got = jax.jit(kern)(lower, upper, w)
    for want in (_xla(ops.linf_dist_bounds)(lower, upper, w),
                 ops.linf_dist_bounds(lower, upper, w),
                 _np_bounds(*(np.asarray(a) for a in (lower, upper, w)))):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loss = lambda fn: lambda l, u, w: sum((a * g * s).sum()
                                          for a, s in zip(fn(l, u, w), (1, 2), strict=True))
    got_g = jax.jit(jax.grad(loss(kern), argnums=(0, 1, 2)))(lower, upper, w)
    want_g = jax.jit(jax.grad(_xla(loss(ops.linf_dist_bounds)), argnums=(0, 1, 2)))(
        lower, upper, w)
    _assert_close(got_g, want_g, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [(1, 37, 19), (5, 1, 19), (5, 37, 3)],
                         ids=["batch1", "one_input", "three_outputs"])
def test_kernels_at_odd_shapes(shape, dims):
    """Batch 1, one input, three outputs (the default piece size: one piece per block): ℓ∞, ℓp
    and the bounds, values and gradients, against float64 and the XLA code."""
    b, n, out = dims
    x, w, g = _inputs(seed=sum(dims), b=b, n=n, out=out)
    if shape == "mosaic":
        pallas._MOSAIC_PIECE = (32, 512)  # restored by the fixture's monkeypatch

    def all_passes(dist, bounds):
        def f(x, w):
            vg = lambda p: jax.value_and_grad(lambda x, w: (dist(x, w, p) * g).sum(),
                                              argnums=(0, 1))(x, w)
            return (dist(x, w, INF), vg(INF)[1], dist(x, w, 37.5), vg(37.5)[1],
                    bounds(x - 0.5, x + 0.25, w))
        return jax.jit(f)

    got = all_passes(lambda x, w, p: pallas_dist(x, w, p, interpret=True, blocks=SMALL),
                     lambda l, u, w: pallas_linf_dist_bounds(l, u, w, interpret=True,
                                                             blocks=SMALL))(x, w)
    want = _xla(all_passes(ops.dist, ops.linf_dist_bounds))(x, w)
    _assert_close(jax.tree.leaves(got), jax.tree.leaves(want))
    for p, y, grads in ((INF, got[0], got[1]), (37.5, got[2], got[3])):
        _assert_close((y, *grads), _np_value_and_grads(x, w, g, p), rtol=F64_TOL[p],
                      atol=F64_TOL[p])
        assert float(y[_zero_pair(b, out)]) == 0.0
    for a, b_ in zip(got[4], want[4], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_kernels_under_vmap_over_members(shape):
    """An ensemble axis of 3: x and w both vmapped, and w alone (a shared input), for ℓ∞, ℓp and
    the bounds, values and gradients, against the XLA code member by member."""
    k = 3
    xs, ws, gs = (jnp.stack(a) for a in zip(*(_inputs(seed=40 + i, b=5, n=21, out=11)
                                                for i in range(k)), strict=True))

    def member(dist, bounds):
        def f(x, w, g):
            vg = lambda p: jax.value_and_grad(lambda x, w: (dist(x, w, p) * g).sum(),
                                              argnums=(0, 1))(x, w)
            lo, hi = bounds(x - 0.5, x + 0.25, w)
            bg = jax.grad(lambda w: (bounds(x - 0.5, x + 0.25, w)[0] * g).sum())(w)
            return vg(INF), vg(37.5), (lo, hi, bg)
        return f

    ours = member(lambda x, w, p: pallas_dist(x, w, p, interpret=True, blocks=SMALL),
                  lambda l, u, w: pallas_linf_dist_bounds(l, u, w, interpret=True, blocks=SMALL))
    ref = jax.jit(_xla(member(ops.dist, ops.linf_dist_bounds)))
    both = jax.jit(jax.vmap(ours))(xs, ws, gs)
    w_only = jax.jit(jax.vmap(ours, in_axes=(None, 0, 0)))(xs[0], ws, gs)
    for i in range(k):
        want_both = jax.tree.leaves(ref(xs[i], ws[i], gs[i]))
        want_w = jax.tree.leaves(ref(xs[0], ws[i], gs[i]))
        _assert_close([a[i] for a in jax.tree.leaves(both)], want_both)
        _assert_close([a[i] for a in jax.tree.leaves(w_only)], want_w)


def test_linf_kernel_forward_is_exact_and_uses_first_argmax(shape):
    # The ℓ∞ forward is a max of the same float differences: bit-identical to linf_jax.ops.
    x, w, g = _inputs(seed=7, b=6, n=21, out=10)
    y = pallas_linf_dist(x, w, interpret=True, blocks=SMALL)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ops.linf_dist(x, w)))
    # Ties: every coordinate of d is ±1, so the gradient goes to coordinate 0 only (first arg-max).
    xt = jnp.ones((2, 5))
    wt = jnp.asarray([[0.0, 2.0, 0.0, 2.0, 0.0]])
    gx = jax.grad(lambda x: pallas_linf_dist(x, wt, interpret=True, blocks=SMALL).sum())(xt)
    np.testing.assert_array_equal(np.asarray(gx), [[1.0, 0, 0, 0, 0]] * 2)


def test_lp_kernel_traced_p_switches_paths_like_ops(shape):
    """A traced p (a schedule inside jit): p = 8 takes the integer kernel, other p the exp/log
    kernel (p in SMEM for Mosaic), p = ∞ the ℓ∞ kernel — one compiled function for all three,
    matching the XLA code."""
    x, w, g = _inputs(seed=3, b=5, n=19, out=9)

    def f(dist_fn):
        def vg(x, w, p):
            return jax.value_and_grad(lambda x, w: (dist_fn(x, w, p) * g).sum(),
                                      argnums=(0, 1))(x, w)
        return jax.jit(vg)

    ours = f(lambda x, w, p: pallas_dist(x, w, p, interpret=True, blocks=SMALL))
    ref = f(_xla(ops.dist))
    for p in (8.0, 37.5, INF):
        pa = jnp.float32(p)
        _assert_close(jax.tree.leaves(ours(x, w, pa)), jax.tree.leaves(ref(x, w, pa)))


def test_lp_kernel_is_stable_for_large_inputs_at_p1000():
    x, w, g = _inputs(seed=11, b=3, n=24, out=5, scale=200.0)
    got = _value_and_grads(lambda x, w: pallas_lp_dist(x, w, 1000.0, interpret=True,
                                                       blocks=SMALL), x, w, g)
    want = _value_and_grads(_xla(lambda x, w: ops.lp_dist(x, w, 1000.0)), x, w, g)
    _assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Cross-lowering from the CPU (jax.export): Triton for CUDA, Mosaic for TPU
# --------------------------------------------------------------------------------------------

CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
BACKEND = {"cuda": "gpu", "tpu": "tpu"}
# Pallas calls per pass: ℓ∞ forward (arg-max kernel; its backward is the XLA scatter), ℓp
# forward + dx + dw, the traced p's two ℓp branches, and the bounds forward (backward: XLA).
PASSES = {"linf": 1, "lp8": 3, "lp37.5": 3, "lp_traced": 6, "bounds": 1}


def _pass_fn(name):
    if name == "bounds":
        def f(x, w, g):
            lo_hi = lambda l, u, w: pallas_linf_dist_bounds(l, u, w)
            loss = lambda l, u, w: sum((a * g).sum() for a in lo_hi(l, u, w))
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(x - 0.5, x + 0.5, w)
        return f, ()
    if name == "lp_traced":
        def f(x, w, g, p):
            return jax.grad(lambda x, w: (pallas_lp_dist(x, w, p) * g).sum(),
                            argnums=(0, 1))(x, w)
        return f, (jax.ShapeDtypeStruct((), jnp.float32),)
    p = {"linf": INF, "lp8": 8.0, "lp37.5": 37.5}[name]

    def f(x, w, g):
        return jax.grad(lambda x, w: (pallas_dist(x, w, p) * g).sum(), argnums=(0, 1))(x, w)
    return f, ()


@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_cross_lower(monkeypatch, platform, pass_name):
    """Every pass, forward and backward, lowers for CUDA through Triton and for TPU through
    Mosaic (the jaxpr → Triton / Mosaic step runs on the host; neither needs the device) at
    ragged shapes with the backend's default blocks, and carries no native CPU custom call.
    Compiling to device code and running need a GPU / TPU."""
    monkeypatch.setattr(pallas, "_backend", lambda: BACKEND[platform])
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    target = CUSTOM_CALL[platform]
    fn, extra = _pass_fn(pass_name)
    exported = jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
    )(spec(70, 300), spec(130, 300), spec(70, 130), *extra)
    text = exported.mlir_module()
    assert text.count("@" + target + "(") == PASSES[pass_name]
    assert "linf_jax_" not in text  # no native CPU kernel (linf_jax.native's targets)


# --------------------------------------------------------------------------------------------
# Blocks and backends
# --------------------------------------------------------------------------------------------


def test_default_blocks_per_backend(monkeypatch):
    assert pallas.default_blocks("gpu") == Blocks(b=64, out=64, n=64, unroll=8)
    assert pallas.default_blocks("cpu") == pallas.default_blocks("gpu")
    tpu = pallas.default_blocks("tpu")
    pallas.check_mosaic_blocks(tpu)
    monkeypatch.setattr(pallas, "_backend", lambda: "tpu")
    assert pallas.default_blocks() == tpu
    assert pallas._plan(False, None).blocks == tpu


def test_mosaic_block_check_is_one_line(monkeypatch):
    """A TPU call with blocks that break Mosaic's (8, 128) rule fails before tracing with one
    line naming the field, its value and what is allowed; interpret mode takes any blocks."""
    monkeypatch.setattr(pallas, "_backend", lambda: "tpu")
    x, w, _ = _inputs(seed=2, b=3, n=8, out=4)
    cases = [(Blocks(b=4, out=128, n=128, unroll=128), "Blocks.b=4", "multiple of 8"),
             (Blocks(b=8, out=64, n=128, unroll=128), "Blocks.out=64", "multiple of 128"),
             (Blocks(b=8, out=128, n=64, unroll=64), "Blocks.n=64", "multiple of 128"),
             (Blocks(b=8, out=128, n=128, unroll=8), "Blocks.unroll=8", "multiple of 128")]
    for blocks, field, rule in cases:
        for call in (lambda: pallas_linf_dist(x, w, blocks=blocks),
                     lambda: pallas_lp_dist(x, w, 37.5, blocks=blocks),
                     lambda: pallas_linf_dist_bounds(x, x, w, blocks=blocks)):
            with pytest.raises(ValueError) as err:
                call()
            msg = str(err.value)
            assert "\n" not in msg and field in msg and rule in msg and "Mosaic" in msg
    y = pallas_linf_dist(x, w, interpret=True, blocks=cases[0][0])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ops.linf_dist(x, w)))


def test_kernels_refuse_to_compile_for_cpu_without_interpret():
    x, w, _ = _inputs(seed=2, b=3, n=8, out=4)
    with pytest.raises(NotImplementedError, match="interpret=True"):
        pallas_linf_dist(x, w)


def test_blocks_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        Blocks(b=6)


# --------------------------------------------------------------------------------------------
# Dispatch in linf_jax.ops
# --------------------------------------------------------------------------------------------


def test_dispatch_on_cpu(monkeypatch):
    """Unset: the native kernels where measured faster (and they build), never Pallas; ``auto``
    means the same as unset, on the CPU and on a GPU, and defers to the variable wherever it is
    written; an explicit ``use_kernels`` choice overrides the variable; unknown names fail with
    the choices."""

    assert jax.default_backend() == "cpu"
    from linf_jax.ops import calibration

    cpu_default = "native" if any(calibration.decisions().values()) else "xla"
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    assert ops.kernel_backend() == cpu_default
    x, w, _ = _inputs(seed=5, b=3, n=10, out=4)
    for p in (INF, 8.0, 37.5):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: ops.dist(x, w, p).sum()))(x))
        assert "pallas_call" not in jaxpr
    monkeypatch.setenv(ops.KERNELS_ENV, "xla")
    assert ops.kernel_backend() == "xla"
    with ops.use_kernels("auto"):  # auto: the variable's choice, as in config.kernels
        assert ops.kernel_backend() == "xla"
    if ops.native.available():
        with ops.use_kernels("native"):  # an explicit choice wins over the variable
            assert ops.kernel_backend() == "native"
    assert ops.kernel_backend() == "xla"
    monkeypatch.setenv(ops.KERNELS_ENV, "auto")  # auto: what unset gives, on every platform
    assert ops.kernel_backend() == cpu_default
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.kernel_backend() == "xla"
    assert ops.resolve().record()["passes"] == dict.fromkeys(ops.FAMILIES, "xla")
    monkeypatch.delenv(ops.KERNELS_ENV)
    # auto on a GPU under the suite's LINF_JAX_CALIBRATION=native measures nothing: XLA code
    assert ops.kernel_backend() == "xla"
    monkeypatch.setenv(ops.KERNELS_ENV, "native")  # native is CPU-only
    with pytest.raises(ValueError, match="needs the CPU backend"):
        ops.kernel_backend()
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match=ops.KERNELS_ENV):
        ops.kernel_backend()
    with pytest.raises(ValueError, match="kernels='cuda'"):
        with ops.use_kernels("cuda"):
            pass


def test_dispatch_env_pallas_routes_layers_through_the_kernels(monkeypatch):
    """LINF_JAX_KERNELS=pallas on the CPU: ops.dist (and grouped_dist, vmapped over groups)
    runs the Pallas kernels in interpret mode and agrees with the XLA path."""
    x, w, g = _inputs(seed=9, b=4, n=12, out=6)
    fn = lambda x, w: ops.grouped_dist(x, w[:, :6], INF, groups=2)
    monkeypatch.setenv(ops.KERNELS_ENV, "xla")
    want = _value_and_grads(fn, x, w, g)
    monkeypatch.setenv(ops.KERNELS_ENV, "pallas")
    assert ops.kernel_backend() == "pallas"
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.dist(x, w, 8.0))(x))
    got = _value_and_grads(fn, x, w, g)
    _assert_close(got, want)


def test_a_new_kernel_choice_is_never_served_an_earlier_trace():
    """``ops.dist`` with a traced p (the ramp) traced under the native kernels, then under the
    XLA code: the second program has no native custom call (a cached trace of a cond branch
    would carry the first choice's kernels into it)."""
    from linf_jax import native

    if not native.available():
        pytest.skip("no native kernels to tell apart from the XLA code")
    x, w, _ = _inputs(seed=13, b=3, n=10, out=4)

    def program(choice):
        with ops.use_kernels(choice):
            fn = jax.grad(lambda x, w, p: ops.dist(x, w, p).sum(), argnums=(0, 1))
            return jax.jit(fn).lower(x, w, jnp.float32(37.5)).as_text()

    assert "linf_jax_lp" in program("native")
    assert "linf_jax_" not in program("xla")
    assert "linf_jax_lp" in program("native")
