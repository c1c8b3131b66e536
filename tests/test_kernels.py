"""Pallas kernels (linf_jax/ops/pallas.py) against the XLA code of linf_jax.ops, in interpret mode.

Small shapes with small tiles, so that several tiles and padding on every axis are exercised
(B = 5 over tiles of 4, out = 19 over tiles of 8, in = 37 over tiles of 16) while interpret mode
stays fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linf_jax import ops
from linf_jax.ops.pallas import Blocks, pallas_dist, pallas_linf_dist, pallas_lp_dist

INF = float("inf")
SMALL = Blocks(b=4, out=8, n=16, unroll=4)
RTOL, ATOL = 2e-5, 2e-5


def _inputs(seed, b=5, n=37, out=19, scale=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=(b, n)).astype(np.float32)
    w = rng.normal(scale=scale, size=(out, n)).astype(np.float32)
    w[3] = x[1]  # one zero distance: y = 0 with zero (not NaN) gradient
    g = rng.normal(size=(b, out)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _value_and_grads(fn, x, w, g):
    loss = lambda x, w: (fn(x, w) * g).sum()
    y = jax.jit(fn)(x, w)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    return y, gx, gw


def _assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("p", [INF, 8.0, 37.5, 1000.0], ids=["inf", "p8_int", "p37.5", "p1000"])
def test_kernels_match_ops_values_and_grads_ragged(p):
    x, w, g = _inputs(seed=int(p) if p < INF else 1)
    got = _value_and_grads(lambda x, w: pallas_dist(x, w, p, interpret=True, blocks=SMALL), x, w, g)
    want = _value_and_grads(lambda x, w: ops.dist(x, w, p), x, w, g)
    _assert_close(got, want)
    assert float(got[0][1, 3]) == 0.0  # the zero-distance pair


def test_linf_kernel_forward_is_exact_and_uses_first_argmax():
    # The ℓ∞ forward is a max of the same float differences: bit-identical to linf_jax.ops.
    x, w, g = _inputs(seed=7, b=6, n=21, out=10)
    y = pallas_linf_dist(x, w, interpret=True, blocks=SMALL)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ops.linf_dist(x, w)))
    # Ties: every coordinate of d is ±1, so the gradient goes to coordinate 0 only (first arg-max).
    xt = jnp.ones((2, 5))
    wt = jnp.asarray([[0.0, 2.0, 0.0, 2.0, 0.0]])
    gx = jax.grad(lambda x: pallas_linf_dist(x, wt, interpret=True, blocks=SMALL).sum())(xt)
    np.testing.assert_array_equal(np.asarray(gx), [[1.0, 0, 0, 0, 0]] * 2)


def test_lp_kernel_traced_p_switches_paths_like_ops():
    """A traced p (a schedule inside jit): p = 8 takes the integer kernel, other p the exp/log
    kernel, p = ∞ the ℓ∞ kernel — one compiled function for all three, matching ops.dist."""
    x, w, g = _inputs(seed=3, b=5, n=19, out=9)

    def f(dist_fn):
        def vg(x, w, p):
            return jax.value_and_grad(lambda x, w: (dist_fn(x, w, p) * g).sum(),
                                      argnums=(0, 1))(x, w)
        return jax.jit(vg)

    ours = f(lambda x, w, p: pallas_dist(x, w, p, interpret=True, blocks=SMALL))
    ref = f(ops.dist)
    for p in (8.0, 37.5, INF):
        pa = jnp.float32(p)
        _assert_close(jax.tree.leaves(ours(x, w, pa)), jax.tree.leaves(ref(x, w, pa)))


def test_lp_kernel_is_stable_for_large_inputs_at_p1000():
    x, w, g = _inputs(seed=11, b=3, n=24, out=5, scale=200.0)
    got = _value_and_grads(lambda x, w: pallas_lp_dist(x, w, 1000.0, interpret=True,
                                                       blocks=SMALL), x, w, g)
    want = _value_and_grads(lambda x, w: ops.lp_dist(x, w, 1000.0), x, w, g)
    _assert_close(got, want)


@pytest.mark.parametrize("p", [INF, 8.0, 37.5])
def test_kernels_lower_with_triton_for_cuda(monkeypatch, p):
    """Cross-lowers forward + backward for CUDA from this CPU machine (jax.export): the Triton
    lowering accepts every kernel (power-of-2 values, supported primitives) at ragged shapes
    with the default GPU blocks. Compiling to PTX and running need a GPU."""
    from linf_jax.ops import pallas as distance

    monkeypatch.setattr(distance, "_backend", lambda: "gpu")
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

    def f(x, w, g):
        return jax.grad(lambda x, w: (pallas_dist(x, w, p) * g).sum(), argnums=(0, 1))(x, w)

    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(spec(70, 300), spec(130, 300), spec(70, 130))
    assert exported.mlir_module().count("@" + triton) == (1 if p == INF else 3)


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
    assert ops.kernel_backend() == "xla"  # Pallas is opt-in until timed on a GPU
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
