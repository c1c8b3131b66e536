"""Schedules at their boundary steps (both recipe families), losses and the optimiser against
NumPy (docs/RECIPES.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linf_jax import data, experiment, losses, ops, optim
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
    # e2 = 0: eps_train from step 0, whatever e0 (the official code's r_eps = 1)
    flat = make(epochs=(3, 10, 0, 30, 40))
    assert f(flat.eps(0)) == pytest.approx(flat.eps_train)
    assert f(flat.eps(3 * SPE - 1)) == pytest.approx(flat.eps_train)


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
    got = losses.worst_case_margins(jnp.asarray(z, jnp.float32), jnp.asarray(y), eps)
    np.testing.assert_allclose(got, r, rtol=1e-5, atol=1e-5)
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
def test_decay_with_a_python_number_p_gives_the_same_update(phase_p):
    """``tx.update(..., p=8.0 or inf)`` (the train step's start / inf phases) selects the
    specialised decay code; the update equals the one with the schedule's traced p."""
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
    plain, _ = jax.jit(lambda g, st, pr, t: tx.update(g, st, pr, p=s.p(t), step=t))(
        grads, state, params, step_at)
    hinted, _ = jax.jit(lambda g, st, pr, t: tx.update(g, st, pr, p=phase_p, step=t))(
        grads, state, params, step_at)
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
    # Adam's count at step_at (its bias correction); the lr and the decay read the step given
    state = jax.tree.map(lambda a: jnp.full_like(a, step_at) if a.dtype == jnp.int32 else a, state)
    updates, _ = tx.update(grads, state, params, p=s.p(step_at), step=step_at)
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
    # biases decay too (plain), as every parameter of the official AdamW
    ref_b = -lr * (np.asarray(direction["layer"]["bias"]) + 5e-3 * np.asarray(
        params["layer"]["bias"]))
    np.testing.assert_allclose(updates["layer"]["linf_weight"], ref_w, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(updates["head"]["kernel"], ref_k, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(updates["layer"]["bias"], ref_b, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# The v2 family, the v2 loss at ε = 0, κ for the hinge, the v2 optimiser, batches, crops
# ----------------------------------------------------------------------------------------------

V2_EPOCHS = (0, 0, 10, 30, 40)  # (es, ee, ps, pe, T)


def make_v2(**kw):
    return make(**{"epochs": V2_EPOCHS, "family": "v2", "lr": 0.03, **kw})


def test_v2_schedule_boundaries():
    s = make_v2()
    ps, pe, total = 10 * SPE, 30 * SPE, 40 * SPE
    # ε constant from step 0 (ee <= es); lr a cosine from step 0 over the whole run
    assert f(s.eps(0)) == pytest.approx(s.eps_train) and f(s.eps(total)) == pytest.approx(
        s.eps_train)
    for step in (0, 1, ps, total // 2, total - 1, total):
        want = 0.015 * (1 + math.cos(math.pi * step / total))
        assert f(s.lr_at(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert f(s.lr_at(1)) < 0.03
    # p: p_start until ps, geometric on [ps, pe), inf from pe (p_end >= 100)
    assert f(s.p(ps)) == 8.0 and f(s.p(ps - 1)) == 8.0
    mid = (ps + pe) // 2
    r = (mid - ps) / (pe - ps)
    assert f(s.p(mid)) == pytest.approx(8 * 125 ** r, rel=1e-5)
    assert f(s.p(pe - 1)) < 1000 and math.isinf(f(s.p(pe)))
    assert [s.p_phase(t) for t in (0, ps - 1, ps, pe - 1, pe)] == \
        ["start", "start", "ramp", "ramp", "inf"]
    # λ along the p ratio
    assert f(s.lam(ps)) == pytest.approx(0.05)
    assert f(s.lam(mid)) == pytest.approx(0.05 * (2e-4 / 0.05) ** r, rel=1e-5)
    assert f(s.lam(pe)) == pytest.approx(2e-4, rel=1e-5)
    # an ε ramp es -> ee when ee > es
    ramp = make_v2(epochs=(2, 6, 10, 30, 40))
    assert f(ramp.eps(2 * SPE)) == 0.0
    assert f(ramp.eps(4 * SPE)) == pytest.approx(0.5 * ramp.eps_train, rel=1e-6)
    assert f(ramp.eps(6 * SPE)) == pytest.approx(ramp.eps_train, rel=1e-6)


def test_v2_p_end_below_100_never_switches_to_inf():
    s = make_v2(p_end=64.0)
    pe = 30 * SPE
    assert f(s.p(pe)) == pytest.approx(64.0) and f(s.p(40 * SPE)) == pytest.approx(64.0)
    assert s.p_phase(pe) == "ramp" and s.p_phase(40 * SPE - 1) == "ramp"
    # ps == pe: the official ratio is 1 from step 0
    flat = make_v2(epochs=(0, 0, 0, 0, 4))
    assert math.isinf(f(flat.p(0))) and flat.p_phase(0) == "inf"


def test_lr_keeps_float32_accuracy_to_the_last_step():
    """½(1 + cos) cancels near T in float32; the schedule uses sin² and stays accurate."""
    s = make(epochs=(0, 100, 0, 750, 800), steps_per_epoch=98)
    total = 800 * 98
    for step in (total - 1, total - 50, total - 2000):
        want = 0.01 * (1 + math.cos(math.pi * (step - 9800) / (total - 9800)))
        assert f(s.lr_at(step)) == pytest.approx(want, rel=1e-5)


def test_v2_loss_is_finite_at_eps_zero_with_its_limit():
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.normal(size=(32, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32))
    z = z.at[0].set(z[0].at[y[0]].set(z[0].max() + 1.0))  # one correct example
    scale = jnp.float32(1.3)
    r0 = losses.worst_case_margins(z, y, 0.0)

    @jax.jit
    def loss(z, eps):
        return losses.v2_mixture_loss(z, losses.worst_case_margins(z, y, eps), y, eps, 0.05,
                                      scale)

    at0 = loss(z, jnp.float32(0.0))
    wrong = np.asarray((z.argmax(-1) != y) | (np.asarray(r0) >= 0).sum(-1) > 1)
    want = wrong.mean() + 0.05 * f(losses.cross_entropy(scale * z, y))
    assert f(at0) == pytest.approx(want, rel=1e-6)
    # the limit from above, and finite gradients (ε traced, and a Python 0.0)
    assert f(loss(z, jnp.float32(1e-12))) == pytest.approx(f(at0), rel=1e-6)
    g_z, g_eps = jax.jit(jax.grad(loss, argnums=(0, 1)))(z, jnp.float32(0.0))
    assert bool(jnp.isfinite(g_z).all()) and bool(jnp.isfinite(g_eps))
    static = losses.v2_mixture_loss(z, r0, y, 0.0, 0.05, scale)
    assert f(static) == pytest.approx(f(at0), rel=1e-6)


def test_hinge_kappa_mixes_worst_case_and_clean_margins():
    rng = np.random.default_rng(8)
    z = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16))
    r = losses.worst_case_margins(z, y, 0.4)
    clean = losses.worst_case_margins(z, y, 0.0)
    hinge = lambda m, _: losses.hinge_loss(m, 0.75)  # noqa: E731
    assert f(losses.kappa_mix(hinge, z, r, y, 1.0)) == f(losses.hinge_loss(r, 0.75))
    want = 0.3 * f(losses.hinge_loss(r, 0.75)) + 0.7 * f(losses.hinge_loss(clean, 0.75))
    assert f(losses.kappa_mix(hinge, z, r, y, 0.3)) == pytest.approx(want, rel=1e-6)


def test_v2_optimizer_is_plain_adam_with_its_own_scale_lr():
    """weight_decay = 0: Adam only; the logit scale's lr is its own base lr on the same
    cosine (0.006 vs 0.03 in the v2 scripts)."""
    rng = np.random.default_rng(9)
    s = make_v2()
    params = {"layer": {"linf_weight": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
              "logit_scale": jnp.float32(1.0)}
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=np.shape(a)), jnp.float32),
                         params)
    tx = optim.make_optimizer(s, 0.0, logit_scale_lr=0.006)
    step_at = 123
    state = jax.tree.map(lambda a: jnp.full_like(a, step_at) if a.dtype == jnp.int32 else a,
                         tx.init(params))
    updates, _ = tx.update(grads, state, params, p=s.p(step_at), step=step_at)
    adam = optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-10)
    ast = jax.tree.map(lambda a: jnp.full_like(a, step_at) if a.dtype == jnp.int32 else a,
                       adam.init(params))
    direction, _ = adam.update(grads, ast, params)
    factor = 0.5 * (1 + math.cos(math.pi * step_at / (40 * SPE)))
    for path in (("layer", "linf_weight"), ("layer", "bias")):
        got, d = updates, direction
        for k in path:
            got, d = got[k], d[k]
        np.testing.assert_allclose(got, -0.03 * factor * np.asarray(d), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(updates["logit_scale"],
                               -0.006 * factor * np.asarray(direction["logit_scale"]),
                               rtol=1e-5)
    # v1: the logit scale (no such parameter in v1) is the one leaf that is not decayed
    tx1 = optim.make_optimizer(make(), 5e-3)
    st1 = tx1.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    up1, _ = tx1.update(zero, st1, params, p=8.0, step=0)
    assert f(up1["logit_scale"]) == 0.0 and bool((up1["layer"]["bias"] != 0).all())


def test_epoch_batches_keep_the_last_partial_batch():
    assert experiment.epoch_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert experiment.epoch_batches(10, 4, drop_last=True) == [(0, 4), (4, 8)]
    assert experiment.epoch_batches(8, 4) == [(0, 4), (4, 8)]
    assert experiment.epoch_batches(3, 4) == [(0, 3)]
    assert experiment.epoch_batches(3, 4, drop_last=True) == []
    # several data devices: the partial batch is cut to a multiple of their number
    assert experiment.epoch_batches(11, 4, data_devices=2) == [(0, 4), (4, 8), (8, 10)]
    assert experiment.epoch_batches(9, 4, data_devices=2) == [(0, 4), (4, 8)]
    assert experiment.steps_per_epoch(60000, 512) == 118
    assert experiment.steps_per_epoch(50000, 512) == 98
    assert experiment.steps_per_epoch(60000, 512, drop_last=True) == 117


@pytest.mark.parametrize("mode", ["zeros", "edge"])
def test_crop_padding_modes(mode):
    """Crops of an all-ones image: zero padding brings in black pixels, edge padding never."""
    x = jnp.ones((64, 6, 6, 1), jnp.float32)
    out = np.asarray(data.crop_flip(jax.random.key(0), x, 3, mode, flip=True))
    assert out.shape == x.shape
    if mode == "edge":
        assert (out == 1).all()
    else:
        assert (out == 0).any() and set(np.unique(out)) == {0.0, 1.0}
    ramp = jnp.broadcast_to(jnp.arange(6, dtype=jnp.float32)[None, None, :, None], (64, 6, 6, 1))
    edge = np.asarray(data.crop_flip(jax.random.key(1), ramp, 2, "edge", flip=False))
    # every crop row is a run of the ramp with its ends clamped to the edge values 0 and 5
    assert edge.min() == 0 and edge.max() == 5 and (np.diff(edge[:, 0, :, 0], axis=1) >= 0).all()


def _np_adam_decay_lr(params, grads, s, steps, wd, logit_scale_lr, dist_decay="lp",
                      decay_logit_scale=False):
    """Float64 NumPy reference of ``make_optimizer``: Adam(0.9, 0.99, eps 1e-10) from zero
    moments, plus wd · (ℓp decay on linf_weight, plain on every other leaf but the logit scale),
    times −lr (the logit scale: its own base lr on the same schedule). With
    ``dist_decay='none'`` the leaves under a module holding a ``linf_weight`` (its weight and
    bias) are not decayed; ``decay_logit_scale``: plain decay on the logit scale. Returns the
    updates of every step and the parameters after them."""
    dist_modules = {k.rsplit("/", 1)[0] for k in params if k.endswith("/linf_weight")}
    b1, b2, eps = 0.9, 0.99, 1e-10
    theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in theta.items()}
    nu = {k: np.zeros_like(v) for k, v in theta.items()}
    out = []
    for t, step in enumerate(steps, start=1):
        g = {k: np.asarray(v, np.float64) for k, v in grads[t - 1].items()}
        factor, p = f(s.lr_factor(step)), f(s.p(step))
        upd = {}
        for k in theta:
            mu[k] = b1 * mu[k] + (1 - b1) * g[k]
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
            # optax counts from the schedule's step: bias correction uses count + 1
            direction = (mu[k] / (1 - b1 ** (step + 1))) / (
                np.sqrt(nu[k] / (1 - b2 ** (step + 1))) + eps)
            w = theta[k]
            in_dist = "/" in k and k.rsplit("/", 1)[0] in dist_modules
            if in_dist and dist_decay == "none":
                pass
            elif k.endswith("linf_weight"):
                direction = direction + wd * np_decay(w.reshape(w.shape[0], -1), p).reshape(
                    w.shape)
            elif k != "logit_scale" or decay_logit_scale:
                direction = direction + wd * w
            lr0 = logit_scale_lr if k == "logit_scale" and logit_scale_lr is not None else s.lr
            upd[k] = -lr0 * factor * direction
        theta = {k: theta[k] + upd[k] for k in theta}
        out.append(upd)
    return out, theta


@pytest.mark.parametrize("phase", ["start", "ramp", "inf"])
@pytest.mark.parametrize("wd,logit_scale_lr,dist_decay,decay_scale", [
    (5e-3, None, "lp", False), (5e-3, 0.006, "lp", False), (0.0, 0.006, "lp", False),
    (0.02, None, "none", True)])  # the last: SortNet's AdamW
def test_optimizer_steps_match_float64_numpy_reference(phase, wd, logit_scale_lr, dist_decay,
                                                       decay_scale):
    """Four steps of ``make_optimizer`` on ℓ∞-dist weights (dense and conv), a distance layer's
    bias, a head kernel and bias and the logit scale, with p and the step as the train step
    passes them in each p phase (a Python number in the start and inf phases, traced in the
    ramp), against a float64 NumPy Adam + decay (ℓp or none on the distance layers) + per-label
    lr."""
    rng = np.random.default_rng(11)
    s = make()
    start = {"start": 3, "ramp": EPOCHS[1] * SPE + 9, "inf": EPOCHS[3] * SPE + 2}[phase]
    phase_p = {"start": 8.0, "ramp": None, "inf": math.inf}[phase]
    steps = list(range(start, start + 4))
    assert all(s.p_phase(t) == phase for t in steps)
    shapes = {"dense/linf_weight": (6, 11), "conv/linf_weight": (4, 3, 3, 2), "dense/bias": (6,),
              "head/kernel": (11, 3), "head/bias": (3,), "logit_scale": ()}
    flat = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    grads = [{k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
             for _ in steps]

    def nest(d):
        tree = {}
        for k, v in d.items():
            *parents, leaf = k.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(v)
        return tree

    tx = optim.make_optimizer(s, wd, logit_scale_lr=logit_scale_lr, dist_decay=dist_decay,
                              decay_logit_scale=decay_scale)
    params = nest(flat)
    state = jax.tree.map(lambda a: jnp.full_like(a, start) if a.dtype == jnp.int32 else a,
                         tx.init(params))
    update = jax.jit(lambda g, st, pr, t: tx.update(
        g, st, pr, p=s.p(t) if phase_p is None else phase_p, step=t))
    got = []
    for t, g in zip(steps, grads, strict=True):
        u, state = update(nest(g), state, params, t)
        params = optax.apply_updates(params, u)
        got.append(u)
    want, theta = _np_adam_decay_lr(flat, grads, s, steps, wd, logit_scale_lr, dist_decay,
                                    decay_scale)
    for u, ref in zip(got, want, strict=True):
        for k in shapes:
            np.testing.assert_allclose(_at(u, k), ref[k], rtol=2e-5, atol=1e-9, err_msg=k)
    for k in shapes:
        np.testing.assert_allclose(_at(params, k), theta[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _at(tree, key):
    for part in key.split("/"):
        tree = tree[part]
    return np.asarray(tree)


def test_leaves_are_selected_by_the_label_tree():
    """``param_labels`` labels a model's leaves from their names; the decay and the lr read only
    that tree (a given tree works as well as the function); the decay and the lr keep no state
    (the train state's step is the one counter: Adam's own count aside, the state is empty)."""
    from linf_jax.models import build_model

    model = build_model(dict(name="linf_dist_net_mlp", depth=2, width=8, head_hidden=4), 3)
    params = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), p=8.0)["params"]
    labels = optim.param_labels(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat == {"['dists_0']['linf_weight']": "linf_weight",
                    "['dists_1']['linf_weight']": "linf_weight",
                    "['fc1']['kernel']": "other", "['fc1']['bias']": "other",
                    "['fc2']['kernel']": "other", "['fc2']['bias']": "other",
                    "['logit_scale']": "logit_scale"}
    s = make()
    zero = jax.tree.map(jnp.zeros_like, params)
    decay = optim.lp_weight_decay(0.1)
    by_fn, _ = decay.update(zero, decay.init(params), params, p=8.0)
    by_tree, _ = optim.lp_weight_decay(0.1, labels=labels).update(
        zero, decay.init(params), params, p=8.0)
    for a, b in zip(jax.tree.leaves(by_fn), jax.tree.leaves(by_tree), strict=True):
        np.testing.assert_array_equal(a, b)
    # relabel everything 'logit_scale': no leaf is decayed, every leaf gets the scale's lr
    scale = jax.tree.map(lambda _: "logit_scale", labels)
    kept, _ = optim.lp_weight_decay(0.1, labels=scale).update(
        zero, decay.init(params), params, p=8.0)
    assert all(not np.asarray(a).any() for a in jax.tree.leaves(kept))
    ones = jax.tree.map(jnp.ones_like, params)
    lr = optim.scale_by_learning_rate(s, 0.5, labels=scale)
    at = EPOCHS[1] * SPE + 5  # inside the cosine
    scaled, _ = lr.update(ones, lr.init(params), step=at)
    assert all(np.allclose(a, -0.5 * f(s.lr_factor(at))) for a in jax.tree.leaves(scaled))
    assert f(s.lr_factor(at)) < 1
    state = optim.make_optimizer(s, 5e-3).init(params)
    assert [type(x).__name__ for x in state] == ["ScaleByAdamState", "EmptyState", "EmptyState"]
    with pytest.raises(ValueError, match="needs the step"):
        lr.update(ones, lr.init(params))
    with pytest.raises(ValueError, match="the step's p"):
        decay.update(zero, decay.init(params), params)
