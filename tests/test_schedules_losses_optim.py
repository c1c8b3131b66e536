"""Schedules at their boundary steps, losses and the optimiser against NumPy (SPEC §4–§5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linf_jax import losses, ops, optim
from linf_jax.schedules import Schedule

SPE = 7  # steps per epoch
EPOCHS = (2, 10, 6, 30, 40)


def make(**kw):
    args = dict(epochs=EPOCHS, steps_per_epoch=SPE, lr=0.02, eps_train=0.45 / 0.3081,
                p_start=8.0, p_end=1000.0, lam_start=0.05, lam_end=2e-4, ema_decay=0.99)
    args.update(kw)
    return Schedule(**args)


def f(v):
    return float(np.asarray(v))


def test_p_schedule_boundaries():
    s = make()
    e1, e3 = EPOCHS[1] * SPE, EPOCHS[3] * SPE
    assert f(s.p(0)) == 8.0 and f(s.p(e1 - 1)) == 8.0 and f(s.p(e1)) == 8.0
    mid = (e1 + e3) // 2
    r = (mid - e1) / (e3 - e1)
    assert f(s.p(mid)) == pytest.approx(8 * (1000 / 8) ** r, rel=1e-5)
    assert f(s.p(e3 - 1)) == pytest.approx(8 * (1000 / 8) ** ((e3 - 1 - e1) / (e3 - e1)), rel=1e-5)
    assert f(s.p(e3 - 1)) < 1000.0
    assert math.isinf(f(s.p(e3))) and math.isinf(f(s.p(s.total_steps - 1)))
    assert [s.p_phase(t) for t in (0, e1 - 1, e1, e3 - 1, e3)] == \
        ["start", "start", "ramp", "ramp", "inf"]
    # the jitted schedule equals the eager one
    steps = jnp.arange(s.total_steps)
    np.testing.assert_allclose(jax.jit(jax.vmap(s.p))(steps), [f(s.p(t)) for t in range(
        s.total_steps)], rtol=1e-6)


def test_lr_schedule_boundaries():
    s = make()
    e1, total = EPOCHS[1] * SPE, EPOCHS[4] * SPE
    assert f(s.lr_at(0)) == pytest.approx(0.02) and f(s.lr_at(e1)) == pytest.approx(0.02)
    t = (e1 + 5 - e1) / (total - e1)
    assert f(s.lr_at(e1 + 5)) == pytest.approx(0.01 * (1 + math.cos(math.pi * t)), rel=1e-5)
    assert f(s.lr_at(total)) == pytest.approx(0.0, abs=1e-9)
    lrs = np.array([f(s.lr_at(i)) for i in range(total)])
    assert np.all(np.diff(lrs) <= 1e-9)


def test_eps_schedule_boundaries():
    s = make()
    e0, e2 = EPOCHS[0] * SPE, EPOCHS[2] * SPE
    assert f(s.eps(0)) == 0.0 and f(s.eps(e0)) == 0.0
    assert f(s.eps(e0 + e2 // 2)) == pytest.approx(s.eps_train * (e2 // 2) / e2, rel=1e-6)
    assert f(s.eps(e0 + e2)) == pytest.approx(s.eps_train, rel=1e-6)
    assert f(s.eps(s.total_steps - 1)) == pytest.approx(s.eps_train, rel=1e-6)
    flat = make(epochs=(3, 10, 0, 30, 40))
    assert f(flat.eps(3 * SPE - 1)) == 0.0
    assert f(flat.eps(3 * SPE)) == pytest.approx(flat.eps_train)


def test_lambda_and_ema_decay():
    s = make()
    e1, e3 = EPOCHS[1] * SPE, EPOCHS[3] * SPE
    assert f(s.lam(0)) == pytest.approx(0.05) and f(s.lam(e1)) == pytest.approx(0.05)
    assert f(s.lam(e3)) == pytest.approx(2e-4, rel=1e-5)
    mid = (e1 + e3) // 2
    r = (mid - e1) / (e3 - e1)
    assert f(s.lam(mid)) == pytest.approx(0.05 * (2e-4 / 0.05) ** r, rel=1e-5)
    assert f(make(lam_start=0.0).lam(mid)) == 0.0
    for step in (0, SPE - 1, SPE, 2 * SPE, 50 * SPE, 150 * SPE):
        epoch = step // SPE
        assert f(s.ema_decay_at(step)) == pytest.approx(min(1 - 1 / (epoch + 1), 0.99))


def test_ema_update_matches_formula():
    rng = np.random.default_rng(1)
    s = make()
    theta = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(5)]
    ema = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    ref = np.asarray(ema["w"], np.float64)
    for i, th in enumerate(theta):
        step = i * SPE * 3  # several epochs apart so α changes
        alpha = s.ema_decay_at(step)
        ema = optim.ema_update(ema, {"w": jnp.asarray(th)}, alpha)
        a = min(1 - 1 / (step // SPE + 1), 0.99)
        ref = a * ref + (1 - a) * th
    np.testing.assert_allclose(ema["w"], ref, rtol=1e-5, atol=1e-6)


def np_margins(z, y, eps):
    r = z - z[np.arange(len(y)), y][:, None] + 2 * eps
    r[np.arange(len(y)), y] = 0
    return r


def np_ce(z, y):
    z = z - z.max(1, keepdims=True)
    return (np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean()


def test_losses_against_numpy():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(16, 10)) * 2
    y = rng.integers(0, 10, 16)
    eps = 0.7
    r = np_margins(z, y, eps)
    np.testing.assert_allclose(losses.lipschitz_margins(jnp.asarray(z, jnp.float32), jnp.asarray(y),
                                                        eps), r, rtol=1e-5, atol=1e-5)
    rj = jnp.asarray(r, jnp.float32)
    hinge = 0.75 * np.maximum(r.max(1), 0).mean() + 0.25 * np.maximum(r, 0).mean()
    assert f(losses.hinge_loss(rj, 0.75)) == pytest.approx(hinge, rel=1e-5)
    kce = 0.5 * np_ce(r, y) + 0.5 * np_ce(z, y)
    assert f(losses.kappa_ce_loss(jnp.asarray(z, jnp.float32), rj, jnp.asarray(y), 0.5)) == \
        pytest.approx(kce, rel=1e-5)
    v2 = np.clip(r / (2 * eps), 0, 1).max(1).mean() + 0.05 * np_ce(1.3 * z, y)
    got = losses.v2_mixture_loss(jnp.asarray(z, jnp.float32), rj, jnp.asarray(y), eps, 0.05, 1.3)
    assert f(got) == pytest.approx(v2, rel=1e-5)


def np_decay(w, p):
    w = w.astype(np.float64)
    if math.isinf(p):
        return np.where(np.abs(w) == np.abs(w).max(1, keepdims=True), w, 0.0)
    m = np.abs(w).max(1, keepdims=True)  # float64 overflows at p = 1000 without the scaling
    norm = m * ((np.abs(w) / m) ** p).sum(1, keepdims=True) ** (1 / p)
    return (np.abs(w) / norm) ** (p - 2) * w


@pytest.mark.parametrize("kernels", ["native", "xla"])
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("p", [2.0, 8.0, 37.5, 1000.0, math.inf])
def test_lp_decay_direction_is_gradient_of_half_norm_squared(p, traced, kernels):
    """Every code path: a Python-number p (specialised) or a traced one, native or XLA."""
    if kernels == "native" and not ops.native.available():
        pytest.skip(f"native kernels unavailable: {ops.native.unavailable_reason()}")
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 11)).astype(np.float32)
    with ops.use_kernels(kernels):
        if traced:
            got = jax.jit(optim.lp_decay_direction)(jnp.asarray(w), jnp.float32(p))
        else:
            got = jax.jit(lambda v: optim.lp_decay_direction(v, p))(jnp.asarray(w))
    # (|w|/‖w‖)^(p−2) amplifies float32 rounding of |w|/max|w| by p−2: 1e-4 relative at p = 1000
    rtol = 2e-4 if p == 1000.0 else 2e-5
    np.testing.assert_allclose(got, np_decay(w, p), rtol=rtol, atol=1e-6)
    if p in (2.0, 8.0):  # the analytic form is the autodiff gradient of ½‖w‖_p² per row
        g = jax.grad(lambda v: 0.5 * (jnp.sum(jnp.abs(v) ** p, axis=1) ** (2 / p)).sum())(
            jnp.asarray(w))
        np.testing.assert_allclose(got, g, rtol=1e-4, atol=1e-6)
    with ops.use_kernels(kernels):
        assert bool(jnp.isfinite(optim.lp_decay_direction(jnp.asarray(w) * 1e3, p)).all())


def test_lp_decay_direction_rejects_p_below_two():
    with pytest.raises(ValueError, match="p=1.5 is not allowed"):
        optim.lp_decay_direction(jnp.ones((2, 3)), 1.5)


@pytest.mark.parametrize("phase_p", [8.0, math.inf])
def test_decay_p_hint_gives_the_same_update(phase_p):
    """``tx.update(..., decay_p=p)`` (the train step's start / inf phases) selects the
    specialised decay code; the update equals the one from the schedule's traced p."""
    rng = np.random.default_rng(5)
    s = make()
    step_at = 3 if phase_p == 8.0 else EPOCHS[3] * SPE + 2
    assert s.p_phase(step_at) == ("start" if phase_p == 8.0 else "inf")
    params = {"layer": {"linf_weight": jnp.asarray(rng.normal(size=(9, 20)), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)}}
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    tx = optim.make_optimizer(s, 5e-2)
    state = jax.tree.map(lambda a: jnp.full_like(a, step_at) if a.dtype == jnp.int32 else a,
                         tx.init(params))
    plain, _ = jax.jit(tx.update)(grads, state, params)
    hinted, _ = jax.jit(lambda g, st, pr: tx.update(g, st, pr, decay_p=phase_p))(
        grads, state, params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(hinted), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)


def test_optimizer_step_matches_reference():
    """One step = Adam direction + wd·(ℓp decay on linf_weight, plain on kernel), times −lr."""
    rng = np.random.default_rng(4)
    s = make()
    step_at = EPOCHS[1] * SPE + 9  # inside the p ramp
    params = {"layer": {"linf_weight": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)}}
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    tx = optim.make_optimizer(s, 5e-3)
    state = tx.init(params)
    # advance the step counters to step_at with zero gradients on a copy (no decay effect on ref)
    state = jax.tree.map(lambda a: jnp.full_like(a, step_at) if a.dtype == jnp.int32 else a, state)
    updates, _ = tx.update(grads, state, params)
    adam = optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-10)
    ast = jax.tree.map(lambda a: jnp.full_like(a, step_at) if a.dtype == jnp.int32 else a,
                       adam.init(params))
    direction, _ = adam.update(grads, ast, params)
    lr = f(s.lr_at(step_at))
    p = f(s.p(step_at))
    ref_w = -lr * (np.asarray(direction["layer"]["linf_weight"]) +
                   5e-3 * np_decay(np.asarray(params["layer"]["linf_weight"]), p))
    ref_k = -lr * (np.asarray(direction["head"]["kernel"]) + 5e-3 * np.asarray(
        params["head"]["kernel"]))
    ref_b = -lr * np.asarray(direction["layer"]["bias"])
    np.testing.assert_allclose(updates["layer"]["linf_weight"], ref_w, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(updates["head"]["kernel"], ref_k, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(updates["layer"]["bias"], ref_b, rtol=1e-5, atol=1e-8)
