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
    margins_fn = jax.jit(lambda lo, hi, yy: model.apply(v, lo, hi, yy, method="certify_margins"))
    lo, hi = -1.0, 1.0
    attack = jax.jit(lambda key, eps: certify.pgd_attack(logits_fn, key, x, y, eps, lo, hi,
                                                         steps=40, restarts=4))
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
        _, fooled = attack(jax.random.key(10 + i), eps)
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


# ---------------------------------------------------------------------------------------------
# Models that are not 1-Lipschitz: no Lipschitz rule, interval radii, full-precision products


def _stretched_mlp(seed=0, gain=20.0):
    """A model with an MLP head whose linear layers stretch ℓ∞ distances ``gain``-fold: far from
    1-Lipschitz, so the Lipschitz rule would certify examples an attack breaks."""
    shape = (64, 3, 3, 1)
    model, v = _model(CASES["mlp"], shape, seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * gain if "kernel" in jax.tree_util.keystr(path) else a, v["params"])
    return model, {**v, "params": params}, shape


def test_lipschitz_rule_is_not_reported_for_an_mlp_head():
    """The rule ``margin > 2ε`` is unsound for a model with an MLP head (here PGD breaks examples
    it would certify); evaluation computes it only for 1-Lipschitz models, and what it does
    report (interval certificate, interval radii) survives the attack."""
    from linf_jax.models import is_1_lipschitz

    model, v, shape = _stretched_mlp()
    assert not is_1_lipschitz(model) and is_1_lipschitz(_model(CASES["pure"], shape, 0)[0])
    x, y = _data(shape, 1, model, v)
    logits_fn = jax.jit(lambda z: model.apply(v, z))
    margins_fn = lambda lo, hi, yy: model.apply(v, lo, hi, yy, method="certify_margins")
    logits = logits_fn(x)
    correct = np.asarray(logits.argmax(-1) == y)
    eps = float(np.quantile(np.asarray(certify.certified_radius(logits, y))[correct], 0.5))
    naive = np.asarray(certify.lipschitz_certified(logits, y, eps)) & correct
    _, fooled = certify.pgd_attack(logits_fn, jax.random.key(3), x, y, eps, -1.0, 1.0, steps=40,
                                   restarts=4)
    assert np.any(naive & np.asarray(fooled)), "the rule should have been unsound here"
    out = certify.evaluate_batch(logits_fn, margins_fn, jax.random.key(0), x, y, (eps,), -1.0,
                                 1.0, pgd_steps=0, lipschitz=is_1_lipschitz(model))
    assert "lipschitz_certified" not in out
    assert not np.any(np.asarray(out["certified"][0]) & np.asarray(fooled))
    with pytest.raises(ValueError, match="not 1-Lipschitz needs margins_fn"):
        certify.evaluate_batch(logits_fn, None, jax.random.key(0), x, y, (eps,), -1.0, 1.0,
                               pgd_steps=0, lipschitz=False)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_interval_radius_is_verified_and_tight(kind):
    """The bisection radius is one at which the interval certificate holds, a slightly larger
    one fails (the bisection's resolution), an attack at the radius finds nothing, and for the
    pure net it is at least the Lipschitz radius (the interval certificate contains that rule)."""
    shape = (64, 3, 3, 1)
    model, v = _model(CASES[kind], shape, seed=4)
    x, y = _data(shape, 5, model, v)
    logits_fn = jax.jit(lambda z: model.apply(v, z))
    margins_fn = jax.jit(lambda lo, hi, yy: model.apply(v, lo, hi, yy, method="certify_margins"))
    lo, hi, steps = -1.0, 1.0, 20
    radius = np.asarray(jax.jit(lambda x, y: certify.interval_radius(
        margins_fn, x, y, lo, hi, steps=steps))(x, y))
    correct = np.asarray(logits_fn(x).argmax(-1) == y)
    assert np.all(radius[~correct] == 0) and (radius > 0).any()
    resolution = (hi - lo) / 2 ** steps
    col = (-1, 1, 1, 1)

    def certified_at(r):
        b_lo, b_hi = certify.input_box(x, jnp.asarray(r, jnp.float32).reshape(col), lo, hi)
        return np.asarray(certify.interval_certified(margins_fn(b_lo, b_hi, y), y))

    has = radius > 0
    assert np.all(certified_at(radius)[has])
    below_top = has & (radius < (hi - lo) - 2 * resolution)
    assert not np.any(certified_at(radius + 2 * resolution)[below_top])
    r_col = jnp.asarray(radius).reshape(col)
    _, fooled = certify.pgd_attack(logits_fn, jax.random.key(9), x[has], y[has], r_col[has], lo,
                                   hi, steps=40, restarts=4)
    assert not np.asarray(fooled).any()
    if kind == "pure":
        lip = np.asarray(certify.certified_radius(logits_fn(x), y))
        assert np.all(radius >= lip - resolution)


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
def test_certification_products_run_at_highest_precision(kind):
    """Every dot_general and convolution of the certification path carries HIGHEST precision,
    even under ``jax_default_matmul_precision='bfloat16'`` (TF32 or bfloat16 products would carry
    ~5e-4 relative error, more than the certificate's margin); the certificates are the same."""
    cfg = CASES["mlp"] if kind == "mlp" else dict(name="linf_lenet", channels=(3,),
                                                    kernel_size=3, dense=(12, 8), head_hidden=8)
    shape = (16, 6, 6, 1)
    model, v = _model(cfg, shape, seed=6)
    x, y = _data(shape, 7, model, v)

    def certified(x, y):
        logits = model.apply(v, x)
        margins = model.apply(v, x - 0.05, x + 0.05, y, method="certify_margins")
        return certify.interval_certified(margins, y) & (logits.argmax(-1) == y)

    want = np.asarray(jax.jit(certified)(x, y))
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(certified)(x, y)
        got = np.asarray(jax.jit(certified)(x, y))
    np.testing.assert_array_equal(got, want)
    products = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                products.append(eqn)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    names = {e.primitive.name for e in products}
    assert "dot_general" in names and (kind == "mlp" or "conv_general_dilated" in names)
    highest = jax.lax.Precision.HIGHEST
    for eqn in products:
        if eqn.primitive.name == "dot_general":
            assert eqn.params["precision"] == (highest, highest), eqn.params
        else:  # the patch copy: the data operand at HIGHEST; the one-hot filter is exact in
            # any format (jax.lax.conv_general_dilated_patches leaves it DEFAULT) and XLA
            # computes at the highest precision of the two operands
            assert eqn.params["precision"][0] == highest, eqn.params


def test_weights_are_inputs_of_the_evaluation_programs_not_constants():
    """Classifiers of one architecture with different weights (two seeds: as raw and EMA weights,
    or two checkpoints) share one compiled program each for logits, certification, radii and
    evaluate_dataset, and still give each model's own values (against model.apply)."""
    import ml_collections

    from linf_jax import classifier, evaluation, ops

    cfg = ml_collections.ConfigDict(CASES["mlp"])
    models = [_model(cfg, (8, 6, 6, 1), seed) for seed in (0, 1)]
    meta = {"input_shape": (6, 6, 1), "num_classes": 4, "mean": (0.3,), "std": 0.25}
    x = np.random.default_rng(5).uniform(0, 1, size=(24, 6, 6, 1)).astype(np.float32)
    y = np.arange(24) % 4
    programs = (classifier._logits_program, classifier._certify_program,
                classifier._radius_program, certify._evaluate_program)
    for program in programs:
        program.clear_cache()
    outs = []
    for model, variables in models:
        clf = classifier.Classifier(model, variables, meta, weights="raw")
        logits = np.asarray(clf(x))
        expected = model.apply(variables, (jnp.asarray(x) - 0.3) / 0.25)
        np.testing.assert_allclose(logits, np.asarray(expected), rtol=1e-5, atol=1e-5)
        report = clf.evaluate(x, y, eps=(0.01, 0.05), pgd_steps=3, batch_size=12)
        outs.append((logits, np.asarray(clf.certify(x, y, 0.01)),
                     np.asarray(clf.certified_radius(x, y)), report["radii"]))
    assert [p._cache_size() for p in programs] == [1, 1, 1, 1]
    requested = ops.kernel_request()
    with ops.use_kernels("xla"):  # another kernel choice traces anew: it is part of the key
        np.testing.assert_allclose(np.asarray(clf(x)), outs[1][0], rtol=1e-5, atol=1e-5)
    assert classifier._logits_program._cache_size() == (1 if requested == "xla" else 2)
    assert not np.allclose(outs[0][0], outs[1][0])  # two models, two results
    logits_fn, margins_fn = evaluation.make_eval_fns(*models[0], None)
    leaves = jax.tree.leaves(logits_fn)  # the weights are the functions' pytree leaves
    assert len(leaves) == len(jax.tree.leaves(models[0][1])) and len(leaves) > 2
    assert jax.tree.structure(logits_fn) == jax.tree.structure(
        evaluation.make_eval_fns(*models[1], None)[0])  # equal: one trace serves both


@pytest.mark.parametrize("kind", sorted(CASES))
def test_classifier_public_parts_and_model_radius(kind):
    """The Classifier's public pieces in network units (``normalize``, ``logits_fn``,
    ``margins_fn``, ``pixel_box``) rebuild its outputs, and :func:`certify.model_radius` is the
    radius of ``certified_radius`` (times std) and of ``evaluate_batch``; ``labels=None`` is the
    radius against the predicted class (as an exported program gives it)."""
    import ml_collections

    from linf_jax import classifier, data

    model, variables = _model(ml_collections.ConfigDict(CASES[kind]), (8, 6, 6, 1), seed=2)
    meta = {"input_shape": (6, 6, 1), "num_classes": 4, "mean": (0.3,), "std": 0.25}
    clf = classifier.Classifier(model, variables, meta, weights="raw")
    assert clf.num_members is None and clf.lipschitz == (kind == "pure")
    x = np.random.default_rng(8).uniform(0, 1, size=(24, 6, 6, 1)).astype(np.float32)
    y = jnp.asarray(np.arange(24) % 4, jnp.int32)
    xn = clf.normalize(jnp.asarray(x))
    np.testing.assert_allclose(xn, (x - 0.3) / 0.25, rtol=1e-6, atol=1e-6)
    logits = clf.logits_fn(xn)
    np.testing.assert_allclose(logits, clf(x), rtol=1e-5, atol=1e-5)
    lo, hi = clf.pixel_box
    want_lo, want_hi = data.pixel_bounds(meta["mean"], meta["std"])
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(hi, want_hi)
    radius = jax.jit(lambda xn, y: certify.model_radius(
        clf.logits_fn, clf.margins_fn, xn, y, lo, hi, lipschitz=clf.lipschitz))(xn, y)
    np.testing.assert_allclose(np.asarray(radius) * clf.std, clf.certified_radius(x, y),
                               rtol=1e-6, atol=1e-7)
    out = certify.evaluate_batch(clf.logits_fn, clf.margins_fn, jax.random.key(0), xn, y, (0.01,),
                                 lo, hi, pgd_steps=0, lipschitz=clf.lipschitz)
    np.testing.assert_allclose(out["radius"], radius, rtol=1e-6, atol=1e-7)
    assert (np.asarray(radius)[np.asarray(logits.argmax(-1) != y)] == 0).all()
    pred = logits.argmax(-1).astype(jnp.int32)
    against_pred = certify.model_radius(clf.logits_fn, clf.margins_fn, xn, None, lo, hi,
                                        lipschitz=clf.lipschitz, logits=logits)
    np.testing.assert_allclose(against_pred, certify.model_radius(
        clf.logits_fn, clf.margins_fn, xn, pred, lo, hi, lipschitz=clf.lipschitz),
        rtol=1e-6, atol=1e-7)
    assert (np.asarray(against_pred) > 0).any()
    if not clf.lipschitz:
        with pytest.raises(ValueError, match="not 1-Lipschitz needs margins_fn"):
            certify.model_radius(clf.logits_fn, None, xn, y, lo, hi, lipschitz=False)
