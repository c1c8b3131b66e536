"""The native CPU kernels (linf_jax/native, XLA FFI custom calls) against float64 NumPy and
against the XLA kernels of linf_jax.ops: values, first arg-max on ties, gradients, vmap, ragged and
tiny shapes, NaN/inf semantics, and the dispatch that picks them.

Skipped only where the machine has no C++ compiler; where one exists the kernels must build.
The build and the calibration are tested through objects made from the inputs each test wants
(CPU flags, machine, cache folder, mode, timing), installed as the process-wide defaults that
linf_jax.ops consults where the dispatch is under test (the ``install`` fixture).
"""

import contextlib
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from linf_jax import native, ops
from linf_jax.ops import calibration

pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C++ compiler")

INF = float("inf")
# (B, n, out): ragged everywhere (B % 4, n % 16, out % 2 != 0), tiny, one row, and a size that
# spreads over several weight chunks and thread jobs.
SHAPES = [(5, 37, 131), (3, 16, 7), (1, 1, 1), (2, 5, 1), (9, 300, 260), (70, 1030, 130)]


@pytest.fixture
def install():
    """``install(build, calibration)``: makes them the process-wide native build and calibration
    (:func:`linf_jax.native.default`, :func:`linf_jax.ops.calibration.default`) that the dispatch of
    linf_jax.ops consults, for this test; the previous ones come back afterwards."""
    saved = []

    def install(build, cal):
        saved.append((native.set_default(build), calibration.set_default(cal)))

    yield install
    for build, cal in reversed(saved):
        native.set_default(build)
        calibration.set_default(cal)


def _records(caplog, logger):
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_builds_here():
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() is None


def _rand(seed, b, n, out, scale=2.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, n)) * scale).astype(np.float32)
    w = (rng.standard_normal((out, n)) * scale).astype(np.float32)
    g = rng.standard_normal((b, out)).astype(np.float32)
    return x, w, g


def _np_linf(x, w):
    d = np.float64(x)[:, None, :] - np.float64(w)[None, :, :]
    a = np.abs(d)
    return a.max(-1), a.argmax(-1), d


def _with(kernels, fn):
    """``fn`` traced with the given kernels. A fresh function object each time: ``jax.jit``
    caches traces per function, so jitting the same ``fn`` again would reuse the other choice's
    trace."""
    with ops.use_kernels(kernels):
        jitted = jax.jit(lambda *args: fn(*args))
        compiled = {}

    def call(*args):
        if "f" not in compiled:
            with ops.use_kernels(kernels):
                compiled["f"] = jitted.lower(*args).compile()
        return compiled["f"](*args)

    return call


def _value_and_vjp(kernels):
    def f(x, w, g):
        y, vjp = jax.vjp(ops.linf_dist, x, w)
        return (y, *vjp(g))

    return _with(kernels, f)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_values_index_and_gradients_match_float64_and_xla(shape):
    x, w, g = _rand(sum(shape), *shape)
    y, gx, gw = _value_and_vjp("native")(x, w, g)
    ref, idx, d = _np_linf(x, w)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6, atol=0)
    # gradients: g * sign(d) at the first arg-max, scattered (float64 reference)
    s = np.take_along_axis(np.sign(d), idx[..., None], -1)[..., 0] * g
    ref_gx, ref_gw = np.zeros(x.shape), np.zeros(w.shape)
    np.add.at(ref_gx, (np.arange(x.shape[0])[:, None], idx), s)
    np.add.at(ref_gw, (np.arange(w.shape[0])[None, :], idx), -s)
    np.testing.assert_allclose(np.asarray(gx), ref_gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), ref_gw, rtol=1e-5, atol=1e-5)
    # bit for bit the XLA kernels (same float ops, same first arg-max)
    for a, b in zip((y, gx, gw), _value_and_vjp("xla")(x, w, g), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_raw_kernel_outputs():
    x, w, _ = _rand(3, 6, 45, 11)
    y, idx, sign = jax.jit(native.linf_fwd)(x, w)
    ref, ref_idx, d = _np_linf(x, w)
    assert idx.dtype == jnp.int32 and sign.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_array_equal(
        np.asarray(sign), np.take_along_axis(np.sign(d), ref_idx[..., None], -1)[..., 0])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(native.linf_max)(x, w)))


def test_ties_take_the_first_arg_max_and_zero_rows_have_zero_gradient():
    rng = np.random.default_rng(7)
    n = 50
    x = rng.integers(-2, 3, size=(6, n)).astype(np.float32)  # many exact ties
    w = rng.integers(-2, 3, size=(9, n)).astype(np.float32)
    w[0] = x[0]  # a zero row: distance 0, zero gradient
    g = rng.standard_normal((6, 9)).astype(np.float32)
    _, idx_native, sign = jax.jit(native.linf_fwd)(x, w)
    _, ref_idx, _ = _np_linf(x, w)
    np.testing.assert_array_equal(np.asarray(idx_native), ref_idx)  # NumPy: first occurrence
    assert int(sign[0, 0]) == 0
    y, gx, gw = _value_and_vjp("native")(x, w, g)
    assert float(y[0, 0]) == 0.0
    for a, b in zip((y, gx, gw), _value_and_vjp("xla")(x, w, g), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_and_inf_follow_xla():
    x, w, _ = _rand(11, 4, 40, 6)
    x[1, 17] = np.nan
    w[2, 3] = np.inf
    x[3, 3] = np.inf  # inf - inf = nan at (3, 2)
    got = np.asarray(_with("native", ops.linf_dist)(x, w))
    want = np.asarray(_with("xla", ops.linf_dist)(x, w))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[1]).all() and np.isnan(got[3, 2]) and np.isinf(got[0, 2])
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_vmap_and_grad_over_members_match_the_loop():
    k, (b, n, out) = 3, (5, 33, 12)
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((k, b, n)).astype(np.float32)
    ws = rng.standard_normal((k, out, n)).astype(np.float32)

    def loss(x, w):
        return (ops.linf_dist(x, w) * jnp.arange(out)).sum()

    batched = _with("native", jax.vmap(jax.value_and_grad(loss, (0, 1))))(xs, ws)
    for m in range(k):
        one = _with("native", jax.value_and_grad(loss, (0, 1)))(xs[m], ws[m])
        np.testing.assert_array_equal(np.asarray(batched[0][m]), np.asarray(one[0]))
        for a, b_ in zip(batched[1], one[1], strict=True):
            np.testing.assert_array_equal(np.asarray(a[m]), np.asarray(b_))


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, 2.5, 1000.0, "traced"])
def test_lp_uses_native_and_matches_xla(p):
    """ℓp on the native kernels (max pass, sum pass, backward; integer p by repeated squaring,
    else the kernels' vector exp/log): values and gradients agree with the XLA kernels to
    float32 rounding, amplified by p - 1 in the gradient's power (see test_ops.grad_tol)."""
    x, w, g = _rand(2, 7, 45, 19)

    def f(x, w, g, pv):
        y, vjp = jax.vjp(lambda x, w: ops.dist(x, w, pv if p == "traced" else p), x, w)
        return (y, *vjp(g))

    pv = jnp.float32(100.0)
    with ops.use_kernels("native"):
        hlo = jax.jit(lambda *a: f(*a)).lower(x, w, g, pv).as_text()
    for target in ("linf_jax_linf_max", "linf_jax_lp_sum", "linf_jax_lp_bwd"):
        assert target in hlo
    got = _with("native", f)(x, w, g, pv)
    want = _with("xla", f)(x, w, g, pv)
    pe = 100.0 if p == "traced" else p
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=2e-6, atol=0)
    tol = max(2e-6, 8 * (pe - 1) * 2.0**-24)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol,
                                   atol=tol * float(np.abs(np.asarray(b)).max()))


def _negligible_inputs(kind, seed=11, b=6, n=300, out=9):
    """``gaussian``: most terms negligible at large p; ``near_max``: every |d| within 1% of its
    row's max (none negligible even at p = 1000); ``ties``: gaussian with several coordinates
    of each pair exactly at the max."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n)) * 2.0
    w = rng.standard_normal((out, n)) * 2.0
    if kind == "near_max":
        x = np.zeros((b, n))
        w = 3.0 * (1.0 - 0.01 * rng.uniform(size=(out, n))) * rng.choice([-1.0, 1.0], (out, n))
        x[:, :5] = rng.uniform(-0.01, 0.01, (b, 5))
    if kind == "ties":
        x[:, :4] = 0.0
        w[:, :4] = 9.0 * rng.choice([-1.0, 1.0], (out, 4))  # |d| = 9 >> the rest, four times
    g = rng.standard_normal((b, out))
    return x.astype(np.float32), w.astype(np.float32), g.astype(np.float32)


def _np_lp_with_skip(x, w, g, p):
    """float64 y and (dx, dw), in full and with the terms the kernels may skip dropped
    (u^p < 2^-24/n forward, t^(p-1) < 2^-24/n backward; linf_jax/native/lp.cc)."""
    d = np.float64(x)[:, None, :] - np.float64(w)[None, :, :]
    a, n = np.abs(d), d.shape[-1]
    m = a.max(-1, keepdims=True)
    u = a / m
    terms = u ** p
    y_full = m[..., 0] * terms.sum(-1) ** (1 / p)
    y_skip = m[..., 0] * np.where(terms < 2.0**-24 / n, 0.0, terms).sum(-1) ** (1 / p)
    t = a / y_full[..., None]
    big_g = np.sign(d) * t ** (p - 1) * np.float64(g)[..., None]
    dropped = np.where(t ** (p - 1) < 2.0**-24 / n, big_g, 0.0)
    return y_full, y_skip, big_g, dropped


@pytest.mark.parametrize("kind", ["gaussian", "near_max", "ties"])
@pytest.mark.parametrize("p", [8.0, 37.5, 100.0, 1000.0])
def test_lp_negligible_terms_match_float64_within_the_bound(p, kind):
    """The kernels skip the terms below float32's resolution (linf_jax/native/lp.cc): the proven
    bound holds on these inputs (y moves by < 2^-24/p relative, each pair's gradient loses
    < 2^-24 of its l1 mass), and the native kernels and the XLA code give y and both gradients
    of float64, on inputs where most terms are negligible, where none is, and with ties."""
    x, w, g = _negligible_inputs(kind)
    y_full, y_skip, big_g, dropped = _np_lp_with_skip(x, w, g, p)
    assert (np.abs(y_skip - y_full) <= y_full * 2.0**-24 / p * 1.01).all()
    mass = np.abs(big_g).sum(-1)
    assert (np.abs(dropped).sum(-1) <= 2.0**-24 * mass * 1.01 + 1e-300).all()
    if kind == "near_max":
        assert not dropped.any()  # nothing is negligible there
    want = (y_full, big_g.sum(1), -big_g.sum(0))

    def f(x, w, g):
        y, vjp = jax.vjp(lambda x, w: ops.dist(x, w, p), x, w)
        return (y, *vjp(g))

    grad_tol = max(2e-6, 8 * (p - 1) * 2.0**-24)
    for kernels in ("native", "xla"):
        got = _with(kernels, f)(x, w, g)
        np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=2e-6, err_msg=kernels)
        for a, b in zip(got[1:], want[1:], strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=grad_tol,
                                       atol=grad_tol * np.abs(b).max(), err_msg=kernels)


def _np_lp(x, w, g, p):
    """float64 y, dx and dw of the ℓp distance (every term)."""
    d = np.float64(x)[:, None, :] - np.float64(w)[None, :, :]
    a = np.abs(d)
    m = a.max(-1, keepdims=True)
    y = m[..., 0] * ((a / m) ** p).sum(-1) ** (1 / p)
    big_g = np.sign(d) * (a / y[..., None]) ** (p - 1) * np.float64(g)[..., None]
    return y, big_g.sum(1), -big_g.sum(0)


def _bump_inputs(seed=4, b=7, n=1100, out=13):
    """Pairs with from none to hundreds of terms that matter at large p: x[b] is about 1 on a
    set S_b and w[o] about -1 on S_o (densities from 1% to 60%), both below 0.01 elsewhere, so
    |d| is about 2 on S_b & S_o (the terms that matter), 1 on the rest of S_b | S_o (u about
    1/2: negligible from p = 37.5 on) and small elsewhere. n spans several segments of the
    sparse sweeps and is no multiple of their vectors; B and out are ragged for the tiles."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n)) * 0.01
    w = rng.standard_normal((out, n)) * 0.01
    for r, rho in enumerate(np.linspace(0.01, 0.6, b)):
        on = rng.uniform(size=n) < rho
        x[r, on] = 1.0 + 0.05 * rng.uniform(size=on.sum())
    for r, rho in enumerate(np.linspace(0.02, 0.5, out)):
        on = rng.uniform(size=n) < rho
        w[r, on] = -1.0 - 0.05 * rng.uniform(size=on.sum())
    g = rng.standard_normal((b, out))
    return x.astype(np.float32), w.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize("kind", ["bumps", "long_gaussian"])
@pytest.mark.parametrize("p", [3.5, 37.5, 100.0, 1000.0])
def test_lp_negligible_sparse_sweeps_match_float64(p, kind):
    """The sparse sweeps of the native kernels at a general p (linf_jax/native/lp.cc): per pair
    every count of terms that matter, from one (the maximum) to all of them, so that the packed
    buffers flush at odd counts and vectors come with one lane, some lanes or all of them, over
    rows of several segments (bumps: n = 1100, 7 x 13 pairs; long_gaussian: n = 3000, about one
    term per pair at p = 1000). y and both gradients equal float64 within float32 rounding."""
    if kind == "bumps":
        x, w, g = _bump_inputs()
    else:
        x, w, g = _rand(8, 6, 3000, 5, scale=1.0)
    want = _np_lp(x, w, g, p)

    def f(x, w, g):
        y, vjp = jax.vjp(lambda x, w: ops.dist(x, w, p), x, w)
        return (y, *vjp(g))

    got = _with("native", f)(x, w, g)
    np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=2e-6)
    grad_tol = max(2e-6, 8 * (p - 1) * 2.0**-24)
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=grad_tol,
                                   atol=grad_tol * np.abs(b).max())


@pytest.mark.parametrize("p", [3.5, 100.0])
def test_lp_negligible_sweeps_with_a_nan_input_row(p):
    """A NaN in one input row: that row's distances are those of the XLA code, and the other
    rows' values and input gradients are those of float64 (the NaN row's terms all count as
    mattering; p = 100 takes the sparse sweeps, p = 3.5 the whole-vector backward pass)."""
    x, w, g = _rand(12, 6, 300, 9)
    x[2, 123] = np.nan

    def f(x, w, g):
        y, vjp = jax.vjp(lambda x, w: ops.dist(x, w, p), x, w)
        return (y, *vjp(g))

    got = [np.asarray(a) for a in _with("native", f)(x, w, g)]
    xla_y = np.asarray(_with("xla", f)(x, w, g)[0])
    np.testing.assert_array_equal(got[0][2], xla_y[2])
    keep = np.arange(6) != 2
    want = _np_lp(x[keep], w, g[keep], p)
    np.testing.assert_allclose(got[0][keep], want[0], rtol=2e-6)
    grad_tol = max(2e-6, 8 * (p - 1) * 2.0**-24)
    np.testing.assert_allclose(got[1][keep], want[1], rtol=grad_tol,
                               atol=grad_tol * np.abs(want[1]).max())


def test_lp_nested_vmap_matches_slices():
    rng = np.random.default_rng(12)
    xs = rng.standard_normal((2, 3, 4, 20)).astype(np.float32)
    ws = rng.standard_normal((3, 6, 20)).astype(np.float32)

    def loss(x, w, p):
        return (ops.dist(x, w, p) * jnp.arange(6)).sum()

    f = jax.vmap(jax.vmap(jax.value_and_grad(loss, (0, 1)), in_axes=(0, 0, None)),
                 in_axes=(0, None, None))
    for p in (8.0, 3.5):
        val, (gx, gw) = _with("native", f)(xs, ws, jnp.float32(p))
        one = _with("native", jax.value_and_grad(loss, (0, 1)))
        for m in range(2):
            for j in range(3):
                v, (ax, aw) = one(xs[m, j], ws[j], jnp.float32(p))
                np.testing.assert_array_equal(np.asarray(val[m, j]), np.asarray(v))
                np.testing.assert_array_equal(np.asarray(gx[m, j]), np.asarray(ax))
                np.testing.assert_array_equal(np.asarray(gw[m, j]), np.asarray(aw))


def test_dispatch_uses_the_custom_call_only_for_float32_native():
    x, w, _ = _rand(1, 3, 20, 4)

    def hlo(kernels, fn, *args):  # a fresh function each time: jit caches traces per function
        with ops.use_kernels(kernels):
            return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()

    grad = jax.grad(lambda x, w: ops.linf_dist(x, w).sum())
    text = hlo("native", grad, x, w)
    assert "linf_jax_linf_fwd" in text and "linf_jax_linf_bwd" in text
    assert "linf_jax_linf_max" in hlo("native", ops.linf_dist, x, w)
    assert "linf_jax_linf_bounds" in hlo("native", ops.linf_dist_bounds, x - 0.1, x + 0.1, w)
    assert "custom_call" not in hlo("xla", ops.linf_dist_bounds, x - 0.1, x + 0.1, w)
    # bfloat16 operands take the XLA kernels
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    assert "custom_call" not in hlo("native", ops.linf_dist, xb, wb)
    assert "custom_call" not in hlo("xla", grad, x, w)


def test_unavailable_native_is_a_clear_error(monkeypatch, install):
    build = native.NativeBuild.from_environment(compiler=None)  # no C++ compiler found
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
        assert not build.available()
    assert build.unavailable_reason().startswith("RuntimeError: no C++ compiler found")
    assert build.library_path() is None
    install(build, calibration.Calibration.from_environment(build))  # decided without a library
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    assert ops.kernel_backend() == "xla"  # the default falls back quietly
    monkeypatch.setenv(ops.KERNELS_ENV, "native")
    with pytest.raises(ValueError, match="unavailable .*no C\\+\\+ compiler"):
        ops.kernel_backend()


def test_cache_is_keyed_and_rebuilt_atomically(tmp_path, caplog, capsys):
    """A fresh cache directory gets one library named by its key, announced in one log record
    (a library prints nothing); building again reuses it, as does another build object with the
    same inputs."""
    # -O0: the keying and the atomic write are under test, not the optimiser (a faster build)
    flags = tuple("-O0" if f == "-O3" else f for f in native.FLAGS)
    build = native.NativeBuild.from_environment(cache_dir=tmp_path, flags=flags)
    caplog.set_level(logging.INFO, logger="linf_jax.native")
    first = build.build()
    assert first.parent == tmp_path and first.name.startswith(f"linf_cpu-{build.isa()}-")
    lines = _records(caplog, "linf_jax.native")
    assert len(lines) == 1 and lines[0].startswith("building the native CPU kernels"), lines
    assert capsys.readouterr().out == ""
    caplog.clear()
    mtime = first.stat().st_mtime_ns
    assert build.build() == first and first.stat().st_mtime_ns == mtime
    again = native.NativeBuild.from_environment(cache_dir=tmp_path, flags=flags)
    assert again.build() == first and first.stat().st_mtime_ns == mtime
    assert _records(caplog, "linf_jax.native") == []  # cached: no build, no line
    # no temporary files left; the lock file that serialises builders across processes stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, first.with_suffix(".lock").name])


def test_concurrent_builders_compile_once(tmp_path):
    """Builders that start together (the processes of a local multi-host run, the workers of a
    test session) take turns through the lock file: one compiles, the others wait and load
    its library. Threads stand in for processes (each opens the lock file, so the lock binds
    them as it binds processes); the compiler is replaced by a slow fake."""
    import threading
    import time

    calls, inside, overlap = [], [0], []

    class SlowFake(native.NativeBuild):
        def compile(self, target):
            inside[0] += 1
            overlap.append(inside[0] > 1)
            calls.append(target)
            time.sleep(0.3)
            target.write_bytes(b"library")
            inside[0] -= 1

    results = [None] * 4

    def build(i, kind=SlowFake):  # each "process" makes its own build object
        results[i] = kind.from_environment(cache_dir=tmp_path).build()

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and not any(overlap), (calls, overlap)
    assert len(set(results)) == 1 and results[0].read_bytes() == b"library"

    # Unlocked (the lock a no-op, as where fcntl is missing) the same race compiles more than
    # once: the test can fail.
    class Unlocked(SlowFake):
        def lock(self, path):
            return contextlib.nullcontext()

    results[0].unlink()
    calls.clear()
    threads = [threading.Thread(target=build, args=(i, Unlocked)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) > 1


def test_partitionable_keeps_custom_calls_out_unless_asked(monkeypatch, tmp_path, install):
    """Multi-device programs are traced through ops.partitionable: the default native choice
    becomes XLA there (XLA's SPMD partitioner would all-gather a custom call's operands);
    an explicit LINF_JAX_KERNELS=native is kept."""
    x, w, _ = _rand(4, 4, 20, 3)

    def text(fn):
        return jax.jit(lambda *a: fn(*a)).lower(x, w).as_text()

    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    faster = {f: {"native_ms": 1.0, "xla_ms": 2.0} for f in calibration.FAMILIES}
    install(native.default(), calibration.Calibration(
        native.default(), "on", tmp_path / "lib.calibration.json", measure=lambda: faster))
    assert calibration.decisions() == dict.fromkeys(calibration.FAMILIES, True)
    assert calibration.how_decided() == "measured"
    assert "linf_jax_linf_max" in text(ops.linf_dist)
    assert "custom_call" not in text(ops.partitionable(ops.linf_dist))
    assert ops.kernel_backend() == "native"  # restored afterwards
    monkeypatch.setenv(ops.KERNELS_ENV, "native")
    assert "linf_jax_linf_max" in text(ops.partitionable(ops.linf_dist))


@pytest.mark.parametrize("shape", SHAPES[:5], ids=[str(s) for s in SHAPES[:5]])
def test_bounds_match_float64_and_xla(shape):
    """The native interval bounds: exact against float64 (one rounding of the subtraction), equal
    to the XLA kernels, and containing every sampled point's distance, corners included."""
    b, n, out = shape
    rng = np.random.default_rng(b + n)
    c = rng.standard_normal((b, n)).astype(np.float32)
    r = np.abs(rng.standard_normal((b, n)) * 0.3).astype(np.float32)
    lower, upper = c - r, c + r
    w = rng.standard_normal((out, n)).astype(np.float32)
    lo, hi = _with("native", ops.linf_dist_bounds)(lower, upper, w)
    lo_x, hi_x = _with("xla", ops.linf_dist_bounds)(lower, upper, w)
    np.testing.assert_array_equal(np.asarray(lo), np.asarray(lo_x))
    np.testing.assert_array_equal(np.asarray(hi), np.asarray(hi_x))
    l64, u64, w64 = (np.float64(a) for a in (lower, upper, w))
    ref_lo = np.maximum(np.maximum(l64[:, None] - w64[None], w64[None] - u64[:, None]), 0).max(-1)
    ref_hi = np.maximum(u64[:, None] - w64[None], w64[None] - l64[:, None]).max(-1)
    np.testing.assert_allclose(np.asarray(lo), ref_lo, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hi), ref_hi, rtol=1e-6, atol=0)
    for t in (0.0, 1.0, rng.uniform(size=(b, n))):  # corners and an interior point
        z = (lower + (upper - lower) * np.float32(t) if np.ndim(t) == 0
             else lower + (upper - lower) * t.astype(np.float32))
        y = np.abs(np.float64(z)[:, None] - w64[None]).max(-1)
        assert (np.asarray(lo) <= y + 1e-6).all() and (y <= np.asarray(hi) + 1e-6).all()


def test_bounds_nan_and_gradient_follow_xla():
    rng = np.random.default_rng(3)
    lower = rng.standard_normal((4, 21)).astype(np.float32)
    upper = lower + 0.5
    w = rng.standard_normal((5, 21)).astype(np.float32)
    lower[2, 4] = np.nan
    got = _with("native", ops.linf_dist_bounds)(lower, upper, w)
    want = _with("xla", ops.linf_dist_bounds)(lower, upper, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.isnan(np.asarray(a)), np.isnan(np.asarray(b)))
        assert np.isnan(np.asarray(a)[2]).all()
        np.testing.assert_array_equal(np.asarray(a)[[0, 1, 3]], np.asarray(b)[[0, 1, 3]])
    lower[2, 4] = 0.0

    def loss(lower, upper, w):
        lo, hi = ops.linf_dist_bounds(lower, upper, w)
        return (lo * 2.0 + hi).sum()

    g_native = _with("native", jax.grad(loss, (0, 1, 2)))(lower, upper, w)
    g_xla = _with("xla", jax.grad(loss, (0, 1, 2)))(lower, upper, w)
    for a, b in zip(g_native, g_xla, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nested_vmap_and_broadcast_leading_dims():
    """vmap over members and groups, with one operand unbatched (a size-1 leading dimension that
    the kernels broadcast): values, gradients and bounds equal the per-slice calls."""
    rng = np.random.default_rng(9)
    k, gr, b, n, out = 2, 3, 4, 18, 5
    xs = rng.standard_normal((k, gr, b, n)).astype(np.float32)
    ws = rng.standard_normal((gr, out, n)).astype(np.float32)  # shared by the members

    def loss(x, w):
        return (ops.linf_dist(x, w) ** 2).sum()

    f = jax.vmap(jax.vmap(jax.value_and_grad(loss, (0, 1))), in_axes=(0, None))
    (val, (gx, gw)) = _with("native", f)(xs, ws)
    bounds = _with("native", jax.vmap(jax.vmap(ops.linf_dist_bounds), in_axes=(0, 0, None)))(
        xs - 0.2, xs + 0.2, ws)
    one = _with("xla", jax.value_and_grad(loss, (0, 1)))
    one_b = _with("xla", ops.linf_dist_bounds)
    for m in range(k):
        for j in range(gr):
            v, (ax, aw) = one(xs[m, j], ws[j])
            np.testing.assert_array_equal(np.asarray(val[m, j]), np.asarray(v))
            np.testing.assert_array_equal(np.asarray(gx[m, j]), np.asarray(ax))
            np.testing.assert_array_equal(np.asarray(gw[m, j]), np.asarray(aw))
            lo, hi = one_b(xs[m, j] - 0.2, xs[m, j] + 0.2, ws[j])
            np.testing.assert_array_equal(np.asarray(bounds[0][m, j]), np.asarray(lo))
            np.testing.assert_array_equal(np.asarray(bounds[1][m, j]), np.asarray(hi))
    # the batch goes into one call: no while loop around it
    with ops.use_kernels("native"):
        text = jax.jit(lambda *a: f(*a)).lower(xs, ws).as_text()
    assert "linf_jax_linf_fwd" in text and "stablehlo.while" not in text


def _np_decay(w, p):
    """(|w|/‖w‖_p)^(p−2)·w per row in float64; at p = ∞ w where |w| is the row maximum > 0."""
    w = np.float64(w)
    a = np.abs(w)
    m = a.max(1, keepdims=True)
    if np.isinf(p):
        return np.where((a == m) & (m > 0), w, 0.0)
    safe = np.where(m > 0, m, 1.0)
    norm = safe * ((a / safe) ** p).sum(1, keepdims=True) ** (1 / p)
    return np.where(m > 0, (a / np.where(norm > 0, norm, 1.0)) ** (p - 2) * w, 0.0)


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (260, 300), (40, 1030)])
@pytest.mark.parametrize("p,k", [(2.0, 0), (8.0, 6), (10.0, 8), (8.0, None), (2.5, None),
                                 (1000.0, None), (INF, None)])
def test_lp_decay_matches_float64_and_xla(shape, p, k):
    """The optimiser's ℓp decay direction (LpDecay): ragged rows (n % 16 != 0), rows spread over
    several thread jobs, zero rows; integer exponents and the exp/log path against float64 and
    against optim's XLA code."""
    from linf_jax import optim

    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    w = rng.standard_normal(shape).astype(np.float32)
    w[0] = 0.0  # a zero row decays by 0
    got = np.asarray(jax.jit(lambda v: native.lp_decay(v, p, k))(jnp.asarray(w)))
    rtol = 2e-4 if p == 1000.0 else 2e-5
    np.testing.assert_allclose(got, _np_decay(w, p), rtol=rtol, atol=1e-7)
    assert not got[0].any()
    with ops.use_kernels("xla"):
        ref = np.asarray(jax.jit(optim.lp_decay_direction)(jnp.asarray(w), jnp.float32(p)))
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("p", [37.5, 100.0, 1000.0])
def test_lp_negligible_decay_terms_within_the_bound(p):
    """The ℓp decay drops the entries whose (|w|/m)^(p-1) is below 2^-24/n at a general p
    (linf_jax/native/lp_decay.cc): what it drops, per row, sums to less than 2^-24 of the row's
    largest entry, and the rest equals float64 within float32 rounding; gaussian rows and
    heavy-tailed ones (most entries far below the maximum), n ragged and over two jobs."""
    rng = np.random.default_rng(int(p))
    w = rng.standard_normal((40, 1030))
    w[20:] = rng.standard_t(1.5, (20, 1030))
    w = w.astype(np.float32)
    got = np.asarray(jax.jit(lambda v: native.lp_decay(v, p, None))(jnp.asarray(w)))
    ref = _np_decay(w, p)
    top = np.abs(ref).max(1)
    dropped = np.where((got == 0) & (ref != 0), np.abs(ref), 0.0).sum(1)
    assert (dropped <= 2.0**-24 * top * 1.01).all()
    rtol = max(2e-5, 4 * p * 2.0**-24)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=2.0**-24 * top.max())


def test_lp_decay_non_finite_rows_and_ties_follow_xla():
    from linf_jax import optim

    rng = np.random.default_rng(11)
    w = rng.standard_normal((5, 40)).astype(np.float32)
    w[1, 3] = np.nan
    w[2, 7] = np.inf
    w[3, [4, 9]] = 5.0  # a tie for the largest |w| (both decay at p = ∞)
    w[3, 20] = -5.0
    for p in (8.0, 3.3, INF):
        with ops.use_kernels("native"):
            got = np.asarray(jax.jit(optim.lp_decay_direction)(jnp.asarray(w), jnp.float32(p)))
        with ops.use_kernels("xla"):
            ref = np.asarray(jax.jit(optim.lp_decay_direction)(jnp.asarray(w), jnp.float32(p)))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(ref), rtol=2e-5, atol=1e-7)
    assert np.count_nonzero(got[3]) == 3  # p = ∞: all three tied entries


def test_lp_decay_under_vmap_is_one_call():
    """Over stacked ensemble members: one custom call (leading dims), equal to per-member calls,
    with a traced p that is ∞ at run time handled by the same call."""
    from linf_jax import optim

    ws = jnp.asarray(np.random.default_rng(12).standard_normal((5, 33, 70)), jnp.float32)
    for p in (8.0, 37.5, INF):
        fn = _with("native", jax.vmap(optim.lp_decay_direction, in_axes=(0, None)))
        got = fn(ws, jnp.float32(p))
        with ops.use_kernels("native"):
            hlo = jax.jit(jax.vmap(optim.lp_decay_direction, in_axes=(0, None))).lower(
                ws, jnp.float32(p)).compile().as_text()
        assert hlo.count("linf_jax_lp_decay") == 1 and "while" not in hlo
        one = _with("native", optim.lp_decay_direction)
        for i in range(5):
            np.testing.assert_array_equal(got[i], one(ws[i], jnp.float32(p)))


# --------------------------------------------------------------------------------------------
# The default: native only on AVX-512 CPUs


AVX2_FLAGS = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2"
AVX512_FLAGS = AVX2_FLAGS + " avx512f avx512dq avx512cd avx512bw avx512vl"


@pytest.mark.parametrize("machine,flags,want_isa,want_default", [
    ("x86_64", AVX512_FLAGS, "avx512", True),
    ("x86_64", AVX2_FLAGS, "avx2", False),
    ("x86_64", "flags\t\t: fpu sse sse2", "generic", False),
    ("aarch64", "Features\t: fp asimd evtstrm", "neon", False),
])
def test_instruction_set_rule_without_calibration(monkeypatch, tmp_path, install, machine, flags,
                                                  want_isa, want_default):
    """``LINF_JAX_CALIBRATION=off``, ``LINF_JAX_KERNELS`` unset: native where the CPU has
    AVX-512 (the kind the kernels were tuned and measured on), the XLA code on AVX2-only, ARM
    and baseline CPUs — decided before anything is built — and the command lines' kernels line
    says which and why."""
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    built = []

    class Spy(native.NativeBuild):  # records whether anything asks for the build
        def available(self):
            built.append(1)
            return True

    build = Spy(flags, machine, tmp_path, requested_isa="", compiler=native.find_compiler())
    install(build, calibration.Calibration(build, mode="off"))
    assert native.isa() == want_isa
    assert native.preferred()[0] is want_default
    if want_default:
        assert ops.kernel_backend() == "native"
        assert ops.active().line() == ("kernels: native kernels for linf, lp, bounds, decay "
                                      "(native CPU build avx512; instruction-set rule)")
    else:
        assert ops.kernel_backend() == "xla"
        assert not built  # no build, and no wait for one, on a CPU where native is not the default
        line = ops.active().line()
        assert line.startswith("kernels: XLA (cpu;") and f"variant is {want_isa}" in line, line
        assert "AVX-512" in line and "LINF_JAX_KERNELS=native" in line, line
    monkeypatch.setenv(ops.KERNELS_ENV, "xla")
    assert ops.active().line() == "kernels: XLA (cpu)"


@pytest.mark.parametrize("builds", [True, False])
def test_calibration_native_takes_every_pass_native_where_the_kernels_build(monkeypatch, tmp_path,
                                                                           install, builds):
    """``LINF_JAX_CALIBRATION=native`` (the test suite's setting): no timing and no
    instruction-set rule — every pass native on an AVX2-only CPU too, as the kernels line says;
    where the kernels cannot be built, the XLA code and the reason. Sharded programs still get
    the XLA code (the partitioner cannot split a custom call), and an unknown value is a
    one-line error naming the allowed ones."""
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    monkeypatch.setenv(calibration.CALIBRATION_ENV, "Native")

    class Fixed(native.NativeBuild):  # builds, or not, without running a compiler
        def available(self):
            return builds

        def unavailable_reason(self):
            return None if builds else "no C++ compiler found"

    build = Fixed.from_environment(cpu_flags=AVX2_FLAGS, machine="x86_64", cache_dir=tmp_path)
    timed = []
    install(build, calibration.Calibration.from_environment(
        build, measure=lambda *a, **k: timed.append(1) or {}))
    assert native.preferred()[0] is False  # the rule alone would take the XLA code here
    if builds:
        assert calibration.decisions() == dict.fromkeys(calibration.FAMILIES, True)
        assert ops.kernel_backend() == "native"
        assert ops.active().line() == ("kernels: native kernels for linf, lp, bounds, decay "
                                      "(native CPU build avx2; LINF_JAX_CALIBRATION=native)")
        with ops.use_kernels(None):
            assert ops.partitionable(ops.kernel_backend)() == "xla"
    else:
        assert calibration.decisions() == dict.fromkeys(calibration.FAMILIES, False)
        assert ops.kernel_backend() == "xla"
        assert ops.active().line() == ("kernels: XLA (cpu; the native kernels are unavailable: "
                                      "no C++ compiler found)")
    assert not timed
    monkeypatch.setenv(calibration.CALIBRATION_ENV, "fast")
    install(build, calibration.Calibration.from_environment(build))
    for decided in (calibration.decisions, calibration.calibration_mode):
        with pytest.raises(ValueError, match="LINF_JAX_CALIBRATION='fast' is not one of 'on', "
                                             "'off', 'native' \\(or unset\\)"):
            decided()


def test_isa_choice_is_checked(monkeypatch):
    """LINF_JAX_NATIVE_ISA, as a build from the environment reads it, on an AVX2-only x86 CPU."""

    def build():
        return native.NativeBuild.from_environment(cpu_flags=AVX2_FLAGS, machine="x86_64")

    monkeypatch.setenv(native.ISA_ENV, "avx512")  # this CPU cannot run it
    with pytest.raises(ValueError, match="LINF_JAX_NATIVE_ISA=avx512: this CPU cannot run it"):
        build().isa()
    assert build().preferred()[0] is False
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="'sse9' is not allowed: one of native, avx512"):
        build().isa()
    monkeypatch.setenv(native.ISA_ENV, "AVX2")
    assert build().isa() == "avx2" and build().requested_isa() == "avx2"
    assert build().march() == ("-march=x86-64-v3", "-DLINF_VW=8", "-DLINF_TB=2", "-DLINF_TO=2")
    monkeypatch.setenv(native.ISA_ENV, "generic")
    assert build().isa() == "generic"
    assert build().march() == ("-DLINF_VW=4", "-DLINF_TB=2", "-DLINF_TO=2")
    assert build().preferred() == (False, build().preferred()[1])
    monkeypatch.delenv(native.ISA_ENV)
    assert build().march() == ("-march=native", "-DLINF_VW=8", "-DLINF_TB=2", "-DLINF_TO=2")


# Tests of values, arg-max, ties, NaN/inf, gradients, ℓp and bounds that are rerun, in a
# subprocess, on every other instruction-set variant this CPU can run.
VARIANT_TESTS = ("values_index_and_gradients or ties_take_the_first or nan_and_inf_follow or "
                 "lp_uses_native or lp_negligible or bounds_match or bounds_nan or "
                 "lp_decay_non_finite")


def _runnable_variants():
    here = native.NativeBuild.from_environment()
    out = ["generic"]
    if here.machine.lower() in ("x86_64", "amd64") and here.cpu_has("avx2", "fma"):
        out.append("avx2")
    return out


@pytest.mark.skipif(os.environ.get(native.ISA_ENV, "native") != "native",
                    reason="already running one variant")
@pytest.mark.parametrize("variant", _runnable_variants())
def test_other_instruction_set_variants_pass_the_value_tests(variant):
    """The generic build (SSE2 on x86, 4 lanes) and the AVX2 build (8 lanes, 2x2 tiles) pass
    this file's float64 / XLA comparisons too (each built here for its target)."""
    env = dict(os.environ, **{native.ISA_ENV: variant}, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", VARIANT_TESTS], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-500:]


# --------------------------------------------------------------------------------------------
# One traced program, the right kernels on every platform it is lowered for


def test_train_step_and_logits_export_for_cpu_cuda_and_tpu_from_a_cpu_host(monkeypatch):
    """Traced on this CPU host with the default kernel choice, the train step (p ramp: ℓp
    forward and backward, ℓp weight decay) and the classifier's logits and certification
    margins lower for CPU, CUDA and TPU together; the native custom calls appear only in the
    CPU part, and only where the default chose them; CUDA or TPU alone needs no exception for
    custom calls."""
    from conftest import StepSetup, tiny_config

    from linf_jax import evaluation

    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    cfg = tiny_config(**{"ensemble.size": 2, "ensemble.mode": "joint"})
    setup = StepSetup(cfg, "train[:128]", steps_per_epoch=2)
    ds, meta, model, state, step = setup.ds, setup.meta, setup.model, setup.state, setup.step
    args = (state, jnp.asarray(ds.images), jnp.asarray(ds.labels), jnp.arange(64))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits_fn, margins_fn = evaluation.make_eval_fns(model, variables, 2)
    x = jnp.zeros((4, *meta["input_shape"]), jnp.float32)
    y = jnp.zeros((4,), jnp.int32)
    checks = native.export_disabled_checks()
    uses_native = ops.kernel_backend() == "native"
    for fn, fargs in ((lambda *a: step(*a, p_phase="ramp"), args),
                      (lambda x: logits_fn(x), (x,)),
                      (lambda x, y: margins_fn(x - 0.1, x + 0.1, y), (x, y))):
        exported = jax.export.export(jax.jit(fn), platforms=["cpu", "cuda", "tpu"],
                                     disabled_checks=checks)(*fargs)
        assert exported.platforms == ("cpu", "cuda", "tpu")
        assert ("linf_jax_" in exported.mlir_module()) is uses_native
        for accelerator in ("cuda", "tpu"):  # alone: no custom call at all, no check disabled
            text = jax.export.export(jax.jit(fn), platforms=[accelerator])(*fargs).mlir_module()
            assert "linf_jax_" not in text



# --------------------------------------------------------------------------------------------
# auto: native per pass family where measured faster on this machine


def test_calibration_measures_every_family_here():
    times = calibration.measure(rounds=1, batch=16, features=48)  # the decision's code, smaller
    assert set(times) == set(calibration.FAMILIES)
    for t in times.values():
        assert 0 < t["native_ms"] < 1e4 and 0 < t["xla_ms"] < 1e4


@pytest.mark.skipif(not native.available(), reason="no native build on this machine")
def test_first_calibration_inside_a_trace_times_concrete_arrays(monkeypatch, tmp_path, install):
    """The first kernel a program uses is often traced (``jax.jit``, ``jax.eval_shape``): the
    calibration that this triggers must still time concrete arrays (a compiled executable
    refuses tracers), and the traced program goes on with the decision."""
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    # the real timing, one small round (the trace is tested)
    install(native.default(), calibration.Calibration(
        native.default(), "on", tmp_path / "lib.calibration.json",
        measure=lambda: calibration.measure(rounds=1, batch=16, features=48)))
    x, w, _ = _rand(1, 4, 20, 3)
    out = jax.eval_shape(lambda x, w: ops.linf_dist(x, w), x, w)
    assert out.shape == (4, 3)
    assert calibration.how_decided() == "measured"
    assert set(calibration.decisions()) == set(calibration.FAMILIES)


def test_processes_that_start_together_calibrate_once(tmp_path):
    """Calibrations that start together take turns through a lock file beside the cache: one
    measures (so no timing runs against another's load), the others read its decisions.
    Threads stand in for processes (each opens the lock file itself)."""
    import threading
    import time

    path = tmp_path / "lib.calibration.json"
    calls, inside, overlap = [], [0], []

    def measure(rounds=calibration.ROUNDS):
        inside[0] += 1
        overlap.append(inside[0] > 1)
        calls.append(rounds)
        time.sleep(0.3)
        inside[0] -= 1
        return {f: {"native_ms": 1.0, "xla_ms": 2.0 if f == "linf" else 0.5}
                for f in calibration.FAMILIES}

    got = [None] * 4

    def run(i):  # each "process" makes its own calibration
        got[i] = calibration.Calibration(native.default(), "on", path, measure).calibrate()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and not any(overlap), (calls, overlap)
    assert sorted(how for _, how in got) == ["cached"] * 3 + ["measured"]
    assert all(d == {"linf": True, "lp": False, "bounds": False, "decay": False} for d, _ in got)


def test_calibration_decides_per_family_caches_and_dispatches(monkeypatch, tmp_path, caplog,
                                                              capsys, install):
    """Measured faster native for ℓ∞ and the bounds, slower for ℓp and the decay: auto takes the
    native kernels for the first two only; the decision is written once, read back, announced
    in one log record (a library prints nothing) and named by the kernels line; an explicit
    native choice overrides it."""
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    path = tmp_path / "lib.calibration.json"
    fake = {"linf": (1.0, 2.0), "lp": (3.0, 2.0), "bounds": (1.0, 5.0), "decay": (2.0, 1.0)}
    calls = []

    def measure(rounds=calibration.ROUNDS):
        calls.append(rounds)
        return {f: {"native_ms": a, "xla_ms": b} for f, (a, b) in fake.items()}

    def fresh():  # the process-wide calibration, as a new process makes it
        install(native.default(), calibration.Calibration(native.default(), "on", path, measure))

    caplog.set_level(logging.INFO, logger="linf_jax.ops.calibration")
    fresh()
    want = {"linf": True, "lp": False, "bounds": True, "decay": False}
    assert calibration.decisions() == want and calibration.how_decided() == "measured"
    lines = _records(caplog, "linf_jax.ops.calibration")
    assert len(lines) == 2 and lines[0].startswith("timing the native CPU kernels"), lines
    assert ("native kernels for linf, bounds; XLA code for lp, decay (measured; cached in "
            f"{path})") == lines[1]
    assert capsys.readouterr().out == ""
    assert json.loads(path.read_text())["decisions"] == want
    caplog.clear()
    fresh()
    assert calibration.decisions() == want and calibration.how_decided() == "cached"
    assert calls == [calibration.ROUNDS] and _records(caplog, "linf_jax.ops.calibration") == []
    assert ops.kernel_backend() == "native"
    assert ops.active().line() == ("kernels: native kernels for linf, bounds; XLA code for lp, "
                                  "decay (native CPU build " + native.isa()
                                  + "; measured on this machine)")
    x, w, _ = _rand(1, 4, 20, 3)

    def text(fn):
        return jax.jit(fn).lower(x, w).as_text()

    assert "linf_jax_linf_max" in text(ops.linf_dist)
    assert "linf_jax_" not in text(lambda x, w: ops.lp_dist(x, w, 8.0))
    assert "linf_jax_linf_bounds" in text(lambda x, w: ops.linf_dist_bounds(x, x, w))
    with ops.use_kernels("native"):
        assert "linf_jax_lp_sum" in text(lambda x, w: ops.lp_dist(x, w, 8.0))
