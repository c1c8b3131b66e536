"""Certificates are sound: no attack breaks a certified example; misclassified never certified."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_with_running_means

from linf_jax import certify, ensemble


def _model(cfg, shape, seed):
    return init_with_running_means(cfg, shape, seed, num_classes=4)


def _data(shape, seed, model, v):
    """Inputs in a box [-1, 1] labelled by the model itself at half of them, so some are certified
    and some misclassified."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, size=shape), jnp.float32)
    pred = np.asarray(model.apply(v, x).argmax(-1))
    y = np.where(np.arange(shape[0]) % 2 == 0, pred, rng.integers(0, 4, size=shape[0]))
    return x, jnp.asarray(y)


CASES = {
    "pure": dict(name="linf_dist_net", depth=3, width=16),
    "mlp": dict(name="linf_dist_net_mlp", depth=2, width=16, head_hidden=8),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_no_attack_breaks_a_certified_example(kind):
    shape = (64, 3, 3, 1)
    model, v = _model(CASES[kind], shape, seed=0)
    x, y = _data(shape, 1, model, v)
    logits_fn = jax.jit(lambda z: model.apply(v, z))  # one compile for the 40 probes below
    margins_fn = lambda lo, hi, yy: model.apply(v, lo, hi, yy, method="certify_margins")
    lo, hi = -1.0, 1.0
    # radii chosen around the data's margins so that some, not all, examples certify
    radius = np.asarray(certify.certified_radius(logits_fn(x), y))
    eps_list = tuple(float(e) for e in np.quantile(radius[radius > 0], [0.3, 0.7]))
    out = certify.evaluate_batch(logits_fn, margins_fn, jax.random.key(0), x, y, eps_list, lo, hi,
                                 pgd_steps=20, pgd_restarts=2)
    assert out["certified"].any() and not out["certified"].all()
    rng = np.random.default_rng(2)
    for i, eps in enumerate(eps_list):
        cert = np.asarray(out["certified"][i])
        # PGD with several restarts never fools a certified example
        _, fooled = certify.pgd_attack(logits_fn, jax.random.key(10 + i), x, y, eps, lo, hi,
                                       steps=40, restarts=4)
        assert not np.any(cert & np.asarray(fooled))
        # nor do random corners of the (clipped) box or random points inside it
        b_lo, b_hi = certify.input_box(x, eps, lo, hi)
        for _ in range(20):
            corner = jnp.where(jnp.asarray(rng.random(x.shape) < 0.5), b_lo, b_hi)
            point = b_lo + (b_hi - b_lo) * jnp.asarray(rng.random(x.shape), jnp.float32)
            for z in (corner, point):
                wrong = np.asarray(logits_fn(z).argmax(-1) != y)
                assert not np.any(cert & wrong)
        # the Lipschitz rule certifies a subset of what the interval rule certifies (pure net)
        if kind == "pure":
            assert np.all(~np.asarray(out["lipschitz_certified"][i]) | cert)


def test_certificate_never_claims_a_misclassified_example():
    shape = (64, 3, 3, 1)
    model, v = _model(CASES["pure"], shape, seed=3)
    x, y = _data(shape, 4, model, v)
    logits = model.apply(v, x)
    wrong = np.asarray(logits.argmax(-1) != y)
    assert wrong.any()
    for eps in (0.0, 1e-3, 0.05):
        m = model.apply(v, x - eps, x + eps, y, method="certify_margins")
        assert not np.any(np.asarray(certify.interval_certified(m, y)) & wrong)
        assert not np.any(np.asarray(certify.lipschitz_certified(logits, y, eps)) & wrong)
    assert np.all(np.asarray(certify.certified_radius(logits, y))[wrong] == 0)


def test_lipschitz_margin_and_radius_match_a_numpy_reference():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(50, 7)).astype(np.float32)
    y = rng.integers(0, 7, size=50)
    zz = z.astype(np.float64).copy()
    zy = zz[np.arange(50), y]
    zz[np.arange(50), y] = -np.inf
    ref = zy - zz.max(1)
    np.testing.assert_allclose(certify.lipschitz_margin(z, y), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(certify.certified_radius(z, y, tol=0.0), np.maximum(ref / 2, 0),
                               rtol=1e-6, atol=1e-6)
    eps = 0.3
    np.testing.assert_array_equal(certify.lipschitz_certified(z, y, eps, tol=0.0), ref > 2 * eps)


def test_pgd_stays_in_the_ball_and_the_box_and_finds_easy_adversarials():
    w = jnp.asarray([[1.0, -1.0]])  # logits = [x0 - x1, 0]; label 0 needs x0 > x1
    logits_fn = lambda x: jnp.concatenate([x @ w.T, jnp.zeros((x.shape[0], 1))], axis=1)
    x = jnp.asarray([[0.05, 0.0], [0.9, 0.0], [0.3, 0.2]], jnp.float32)
    y = jnp.zeros(3, jnp.int32)
    adv, fooled = certify.pgd_attack(logits_fn, jax.random.key(0), x, y, 0.1, 0.0, 1.0, steps=20)
    assert np.all(np.abs(np.asarray(adv - x)) <= 0.1 + 1e-6)
    assert np.all((np.asarray(adv) >= 0) & (np.asarray(adv) <= 1))
    np.testing.assert_array_equal(fooled, [True, False, True])


def test_ensemble_certificate_is_sound_for_the_averaged_model():
    shape = (48, 3, 3, 1)
    cfg = CASES["pure"]
    members = [_model(cfg, shape, seed=s) for s in range(3)]
    model = members[0][0]
    stacked = ensemble.stack([v for _, v in members])
    x, y = _data(shape, 6, model, members[0][1])
    logits_fn = jax.jit(lambda z: ensemble.apply(model, stacked, z))
    margins_fn = lambda lo, hi, yy: ensemble.apply(model, stacked, lo, hi, yy,
                                                   method="certify_margins")
    np.testing.assert_allclose(
        logits_fn(x), np.mean([np.asarray(model.apply(v, x)) for _, v in members], axis=0),
        rtol=1e-5, atol=1e-5)
    radius = np.asarray(certify.certified_radius(logits_fn(x), y))
    eps = float(np.quantile(radius[radius > 0], 0.5))
    out = certify.evaluate_batch(logits_fn, margins_fn, jax.random.key(1), x, y, (eps,), -1.0,
                                 1.0, pgd_steps=20, pgd_restarts=2)
    cert = np.asarray(out["certified"][0])
    assert cert.any()
    _, fooled = certify.pgd_attack(logits_fn, jax.random.key(2), x, y, eps, -1.0, 1.0, 40, 4)
    assert not np.any(cert & np.asarray(fooled))
