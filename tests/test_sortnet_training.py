"""SortNet's training pieces (``zbh2047/SortNet``, ``main.py``; docs/RECIPES.md): the smooth ε
ramp, the ``ce_hinge`` loss, the optimiser policy (no decay on the distance layers, decay on the
logit scale) and their config fields."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linf_jax import config as config_lib
from linf_jax import experiment, losses, optim
from linf_jax.schedules import Schedule, preview, smooth_eps_ratio

SPE = 5


def f(v):
    return float(np.asarray(v))


def official_smooth(t, r):
    """main.py's create_schedule, as written there (float64): k·t⁴ below r, else
    ((1 − k·r⁴)/(1 − r)·(t − 1) + 1)."""
    k = 1 / ((4 - 3 * r) * r ** 3)
    if t < r:
        return k * t ** 4
    return (1 - k * r ** 4) / (1 - r) * (t - 1) + 1


@pytest.mark.parametrize("r0", [0.4, 0.1, 0.75])
def test_smooth_eps_ratio_follows_the_official_formula(r0):
    ts = np.concatenate([np.linspace(0, 1, 401), [r0 - 1e-4, r0, r0 + 1e-4, 1.0]])
    got = np.asarray(smooth_eps_ratio(jnp.asarray(ts, jnp.float32), r0), np.float64)
    want = np.array([official_smooth(float(np.float32(t)), r0) for t in ts])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    for t in (0.0, 0.05, r0 / 2, r0, 0.5 * (1 + r0), 1.0):  # the Python-float path
        assert smooth_eps_ratio(t, r0) == pytest.approx(official_smooth(t, r0), rel=1e-12,
                                                        abs=1e-15)
    # 0 at 0, 1 at 1, increasing
    assert f(smooth_eps_ratio(jnp.float32(0.0), r0)) == 0.0
    assert f(smooth_eps_ratio(jnp.float32(1.0), r0)) == 1.0
    assert np.all(np.diff(got[:401]) >= 0)
    # continuous in value and slope at r0 (both branches, float64)
    value, slope = r0 / (4 - 3 * r0), 4 / (4 - 3 * r0)
    h = 1e-7
    assert official_smooth(r0 - 1e-12, r0) == pytest.approx(value, rel=1e-9)
    assert smooth_eps_ratio(r0, r0) == pytest.approx(value, rel=1e-12)
    left = (smooth_eps_ratio(r0 - 1e-12, r0) - smooth_eps_ratio(r0 - 1e-12 - h, r0)) / h
    right = (smooth_eps_ratio(r0 + h, r0) - smooth_eps_ratio(r0, r0)) / h
    assert left == pytest.approx(slope, rel=1e-5) and right == pytest.approx(slope, rel=1e-9)


def test_smooth_eps_ratio_at_r0_04():
    """The published script value r0 = 0.4: ε/ε_train 0.142857 at t = 0.4, slope 1.428571."""
    assert smooth_eps_ratio(0.4, 0.4) == pytest.approx(1 / 7, rel=1e-12)
    assert smooth_eps_ratio(0.2, 0.4) == pytest.approx(0.2 ** 4 / (2.8 * 0.064), rel=1e-12)
    assert smooth_eps_ratio(0.7, 0.4) == pytest.approx(1 - 4 * 0.3 / 2.8, rel=1e-12)


@pytest.mark.parametrize("family, epochs, start, length", [
    ("v2", (2, 12, 4, 16, 20), 2, 10),  # (es, ee, ps, pe, T)
    ("v1", (3, 5, 8, 16, 20), 3, 8),  # (e0, e1, e2, e3, T): e2 is the ramp's length
])
def test_schedule_eps_follows_the_smooth_ramp(family, epochs, start, length):
    kw = dict(epochs=epochs, steps_per_epoch=SPE, lr=0.02, eps_train=0.5, family=family)
    linear = Schedule(**kw)
    smooth = Schedule(**kw, eps_smooth=0.4)
    steps = jnp.arange(epochs[4] * SPE + 1)
    t = np.asarray(linear.eps_ratio(steps), np.float64)
    want = np.array([official_smooth(float(np.float32(x)), 0.4) for x in t])
    np.testing.assert_allclose(np.asarray(smooth.eps_ratio(steps)), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(smooth.eps(steps)), 0.5 * want, rtol=2e-6, atol=1e-7)
    eps = np.asarray(smooth.eps(steps))
    assert eps[start * SPE] == 0.0 and eps[(start + length) * SPE] == pytest.approx(0.5)
    assert np.all(np.diff(eps) >= 0) and eps[-1] == pytest.approx(0.5)
    # the jitted schedule is the eager one
    np.testing.assert_allclose(jax.jit(smooth.eps)(steps), eps, rtol=1e-6, atol=1e-9)
    # p, lr and λ are the linear schedule's
    for name in ("p", "lr_at", "lam"):
        np.testing.assert_array_equal(getattr(smooth, name)(steps), getattr(linear, name)(steps))
    # the knee r0 is among the preview's boundaries; the preview carries r0 and the ε values
    knee = start + 0.4 * length
    assert knee in smooth.boundaries() and knee not in linear.boundaries()
    got = preview(smooth, [0, round(knee * SPE), epochs[4] * SPE], std=0.25)
    assert got["eps_smooth"] == 0.4 and preview(linear, [0])["eps_smooth"] == 0.0
    assert got["eps_train"][1] == pytest.approx(0.5 * 0.25 / 7, rel=1e-6)
    # a constant ε (v2: ee <= es; v1: e2 = 0) is unchanged by the smooth ramp
    flat = (0, 0, 4, 16, 20) if family == "v2" else (3, 5, 0, 16, 20)
    const = Schedule(**{**kw, "epochs": flat}, eps_smooth=0.4)
    assert np.all(np.asarray(const.eps(steps)) == np.float32(0.5))


def test_schedule_refuses_eps_smooth_outside_0_1():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="eps_smooth"):
            Schedule(epochs=(0, 1, 0, 1, 2), steps_per_epoch=1, lr=0.1, eps_train=0.1,
                     eps_smooth=bad)


# ----------------------------------------------------------------------------------------------
# ce_hinge
# ----------------------------------------------------------------------------------------------


def np_ce(z, y):
    z = z - z.max(1, keepdims=True)
    return (np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean()


def np_ce_hinge(outputs, worst, y, lam):
    """main.py's ce_hinge on NumPy arrays (outputs: the scaled logits s·z)."""
    rows = np.arange(len(y))
    correct = (outputs.argmax(1) == y).astype(np.float64)
    margin = worst - worst[rows, y][:, None]
    margin = margin + 1
    margin[rows, y] = 0
    return (correct * margin.max(1)).mean() + lam * np_ce(outputs, y)


def _margins(rng, b, c, y):
    r = rng.normal(size=(b, c)) * 1.5 - 0.5
    r[np.arange(b), y] = 0.0
    return r


def test_ce_hinge_against_numpy():
    rng = np.random.default_rng(3)
    b, c = 64, 10
    y = rng.integers(0, c, b)
    z = rng.normal(size=(b, c)) * 2
    z[: b // 2] += 3 * np.eye(c)[y[: b // 2]]  # most of these classified correctly
    r = _margins(rng, b, c, y)
    r[0] = -5.0  # certified with room: hinge 0
    r[0, y[0]] = 0.0
    for scale, lam in ((1.0, 1.0), (1.7, 0.01), (0.3, 0.0)):
        got = losses.ce_hinge_loss(jnp.asarray(z, jnp.float32), jnp.asarray(r, jnp.float32),
                                   jnp.asarray(y), lam, jnp.float32(scale))
        assert f(got) == pytest.approx(np_ce_hinge(scale * z, r, y, lam), rel=1e-5)
    correct = z.argmax(1) == y
    assert 0 < correct.sum() < b  # both kinds of examples are in the batch
    # a non-zero r_y is subtracted, as in the official code
    shifted = r + 0.3 * np.eye(c)[y]
    got = losses.ce_hinge_loss(jnp.asarray(z, jnp.float32), jnp.asarray(shifted, jnp.float32),
                               jnp.asarray(y), 0.5, 1.0)
    assert f(got) == pytest.approx(np_ce_hinge(z, shifted, y, 0.5), rel=1e-5)


def test_ce_hinge_gradients():
    """The 0/1 factor carries no gradient: d/dz is λ·dCE/dz; d/dr is 1/B at the largest
    r_j (j ≠ y) of each correctly classified example whose hinge is active, 0 elsewhere."""
    rng = np.random.default_rng(4)
    b, c, lam, scale = 32, 7, 0.2, 1.3
    y = jnp.asarray(rng.integers(0, c, b))
    z = jnp.asarray(rng.normal(size=(b, c)), jnp.float32)
    r = jnp.asarray(_margins(rng, b, c, np.asarray(y)), jnp.float32)
    gz, gr = jax.grad(losses.ce_hinge_loss, argnums=(0, 1))(z, r, y, lam, scale)
    gce = jax.grad(lambda z: lam * losses.cross_entropy(scale * z, y))(z)
    np.testing.assert_allclose(gz, gce, rtol=1e-6, atol=1e-8)
    rn, yn = np.asarray(r), np.asarray(y)
    others = np.where(np.eye(c, dtype=bool)[yn], -np.inf, rn)
    active = (np.asarray(z).argmax(1) == yn) & (others.max(1) + 1 > 0)
    want = np.zeros((b, c))
    want[np.arange(b), others.argmax(1)] = active / b
    want[np.arange(b), yn] -= active / b  # through − r_y
    np.testing.assert_allclose(gr, want, atol=1e-7)


def _config(**train):
    c = config_lib.base_config()
    c.train.update(schedule="v2", epochs=(0, 2, 1, 3, 4), **train)
    return c


def test_make_loss_fn_and_schedule_for_ce_hinge():
    c = _config(loss="ce_hinge", lam_start=1.0, lam_end=0.01, weight_decay=0.0)
    config_lib.validate_config(c)
    rng = np.random.default_rng(5)
    y = jnp.asarray(rng.integers(0, 10, 8))
    z = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
    r = jnp.asarray(_margins(rng, 8, 10, np.asarray(y)), jnp.float32)
    got = experiment.make_loss_fn(c)(z, r, y, 0.3, 0.1, 1.2)
    assert f(got) == pytest.approx(f(losses.ce_hinge_loss(z, r, y, 0.1, 1.2)))
    s = experiment.make_schedule(c, SPE, 0.5)
    assert f(s.lam(0)) == pytest.approx(1.0) and f(s.lam(3 * SPE)) == pytest.approx(0.01, rel=1e-5)
    assert s.eps_smooth == 0.0
    c.train.eps_smooth = 0.4
    assert experiment.make_schedule(c, SPE, 0.5).eps_smooth == 0.4
    # λ must be 0 at both ends or at neither, as for the v2 loss; ε = 0 is fine (no 1/ε)
    with pytest.raises(config_lib.ConfigError, match="lam_end"):
        config_lib.validate_config(_config(loss="ce_hinge", lam_start=1.0, lam_end=0.0))
    config_lib.validate_config(_config(loss="ce_hinge", eps_train=0.0, weight_decay=0.0))


# ----------------------------------------------------------------------------------------------
# The optimiser policy
# ----------------------------------------------------------------------------------------------


def test_distance_layer_biases_are_labelled_by_their_module():
    from linf_jax.models import build_model

    model = build_model(dict(name="linf_dist_net", depth=3, width=8), 4)
    params = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), p=8.0)["params"]
    labels = optim.param_labels(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat == {"['dists_0']['linf_weight']": "linf_weight",
                    "['dists_1']['linf_weight']": "linf_weight",
                    "['dists_2']['linf_weight']": "linf_weight",
                    "['dists_2']['bias']": "dist_bias", "['logit_scale']": "logit_scale"}
    # a head's bias (no linf_weight beside it) stays 'other'; gradients label alike
    tree = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "d": {
        "linf_weight": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    assert optim.param_labels(tree) == {"fc": {"kernel": "other", "bias": "other"},
                                        "d": {"linf_weight": "linf_weight",
                                              "bias": "dist_bias"}}


@pytest.mark.parametrize("dist_decay, decay_scale", [("lp", False), ("none", True),
                                                     ("none", False)])
def test_decay_policy_selects_the_leaves(dist_decay, decay_scale):
    params = {"d": {"linf_weight": jnp.full((3, 4), 2.0), "bias": jnp.full(3, 2.0)},
              "fc": {"kernel": jnp.full((4, 2), 2.0), "bias": jnp.full(2, 2.0)},
              "logit_scale": jnp.float32(2.0)}
    rules = optim.decay_rules(dist_decay, decay_scale)
    zero = jax.tree.map(jnp.zeros_like, params)
    decay = optim.lp_weight_decay(0.5, rules=rules)
    got, _ = decay.update(zero, decay.init(params), params, p=8.0)
    assert np.all(np.asarray(got["fc"]["kernel"]) == 1.0)
    assert np.all(np.asarray(got["fc"]["bias"]) == 1.0)
    assert f(got["logit_scale"]) == (1.0 if decay_scale else 0.0)
    dist = dist_decay == "lp"
    assert np.all(np.asarray(got["d"]["bias"]) == (1.0 if dist else 0.0))
    assert bool(np.asarray(got["d"]["linf_weight"]).any()) == dist
    with pytest.raises(ValueError, match="dist_decay"):
        optim.decay_rules("l2")


def test_config_fields_of_the_decay_policy():
    c = _config(loss="v2", lam_start=0.1, lam_end=0.001, weight_decay=0.02, p_start=1.5,
                dist_decay="none", decay_logit_scale=True)
    config_lib.validate_config(c)  # p_start >= 2 is the l_p decay's rule only
    c.train.dist_decay = "lp"
    with pytest.raises(config_lib.ConfigError, match="p_start"):
        config_lib.validate_config(c)
    for field, bad, word in (("dist_decay", "l2", "dist_decay"),
                             ("decay_logit_scale", 1, "decay_logit_scale"),
                             ("eps_smooth", 1.0, "eps_smooth"),
                             ("eps_smooth", -0.2, "eps_smooth")):
        c = _config(loss="hinge")
        with c.ignore_type():  # a value of the wrong type, as a JSON config could hold
            c.train[field] = bad
        with pytest.raises(config_lib.ConfigError, match=word) as err:
            config_lib.validate_config(c)
        assert "\n" not in str(err.value)
    base = config_lib.base_config().train
    assert (base.eps_smooth, base.dist_decay, base.decay_logit_scale) == (0.0, "lp", False)
    # experiment.make_optimizer passes the policy on: a decayed logit scale
    c = _config(loss="hinge", weight_decay=0.1, dist_decay="none", decay_logit_scale=True)
    s = experiment.make_schedule(c, SPE, 1.0)
    tx = experiment.make_optimizer(c, s)
    params = {"d": {"linf_weight": jnp.ones((2, 3))}, "logit_scale": jnp.float32(1.0)}
    up, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params, p=8.0,
                      step=0)
    assert f(up["logit_scale"]) == pytest.approx(-0.02 * 0.1) and not np.asarray(
        up["d"]["linf_weight"]).any()
    assert math.isfinite(f(up["logit_scale"]))
