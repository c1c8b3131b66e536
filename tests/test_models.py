"""Layers and models: 1-Lipschitz at p = ∞, sound interval bounds, MeanShift, init, registry."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_with_running_means
from hypothesis import given, settings
from hypothesis import strategies as st

from linf_jax import layers
from linf_jax.layers import Box
from linf_jax.models import build_model

MODELS = {
    "pure": (dict(name="linf_dist_net", depth=4, width=24), (6, 5, 5, 1)),
    "mlp": (dict(name="linf_dist_net_mlp", depth=3, width=24, head_hidden=16), (6, 5, 5, 1)),
    "lenet": (dict(name="linf_lenet", channels=(3, 4), kernel_size=3, dense=(12, 20)),
              (6, 10, 10, 2)),
}


def _trained_variables(cfg, shape, seed=0):
    """Random init plus one training-mode pass, so the running means are non-zero."""
    model, v = init_with_running_means(cfg, shape, seed)
    assert any(np.abs(a).max() > 0 for a in jax.tree.leaves(v["batch_stats"]))
    return model, v


@pytest.fixture(scope="module")
def pure_model():
    model, v = _trained_variables(*MODELS["pure"])
    return model, v, jax.jit(lambda z: model.apply(v, z))  # compiled once for every example


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 3.0))
def test_deep_linf_net_is_1_lipschitz(pure_model, seed, scale):
    _, _, f = pure_model
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 5, 5, 1)).astype(np.float32)
    x2 = x + scale * rng.uniform(-1, 1, size=x.shape).astype(np.float32)
    out_diff = np.abs(np.asarray(f(x)) - np.asarray(f(x2))).max(axis=1)
    in_diff = np.abs(x - x2).reshape(6, -1).max(axis=1)
    assert np.all(out_diff <= in_diff * (1 + 1e-5) + 1e-5)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_interval_bounds_contain_every_sampled_point_and_corner(kind):
    cfg, shape = MODELS[kind]
    model, v = _trained_variables(cfg, shape, seed=1)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=shape[0]))
    eps = 0.2
    lo, hi = x - eps, x + eps
    box = jax.jit(lambda lo, hi: model.apply(v, lo, hi, method="logit_bounds"))(lo, hi)
    margins = jax.jit(lambda lo, hi, y: model.apply(v, lo, hi, y, method="certify_margins"))(
        lo, hi, y)
    f = jax.jit(lambda z: model.apply(v, z))
    samples = [rng.uniform(-eps, eps, size=shape) for _ in range(30)]
    samples += [eps * rng.choice([-1.0, 1.0], size=shape) for _ in range(30)]  # random corners
    for s in samples:
        z = np.asarray(f(x + jnp.asarray(s, jnp.float32)))
        assert np.all(z >= np.asarray(box.lo) - 1e-4) and np.all(z <= np.asarray(box.hi) + 1e-4)
        diff = z - z[np.arange(shape[0]), np.asarray(y)][:, None]
        assert np.all(diff <= np.asarray(margins) + 1e-4)
    # the bounds are not vacuous: they are tighter than the Lipschitz box for the pure net
    if kind == "pure":
        z0 = np.asarray(f(x))
        assert np.all(np.asarray(box.hi) <= z0 + eps + 1e-4)
        assert np.all(np.asarray(box.lo) >= z0 - eps - 1e-4)


def test_linf_layer_bounds_are_attained_at_box_points():
    rng = np.random.default_rng(3)
    layer = layers.LinfDist(7)
    lo = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    hi = lo + jnp.asarray(rng.uniform(0.1, 1.0, size=(4, 9)), jnp.float32)
    v = layer.init(jax.random.key(0), lo)
    box = layer.apply(v, Box(lo, hi))
    w = np.asarray(v["params"]["linf_weight"], np.float64)
    l, u = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    for b, o in itertools.product(range(4), range(7)):
        z_max = np.where(np.abs(l[b] - w[o]) > np.abs(u[b] - w[o]), l[b], u[b])
        z_min = np.clip(w[o], l[b], u[b])
        assert np.isclose(np.abs(z_max - w[o]).max(), box.hi[b, o], rtol=1e-6)
        assert np.isclose(np.abs(z_min - w[o]).max(), box.lo[b, o], rtol=1e-6)


def test_mean_shift_training_and_evaluation_semantics():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(8, 3, 3, 5)) + 2.0, jnp.float32)
    ms = layers.MeanShift()
    v = ms.init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(5))
    y, upd = ms.apply(v, x, train=True, mutable=["batch_stats"])
    batch_mean = np.asarray(x, np.float64).reshape(-1, 5).mean(0)
    np.testing.assert_allclose(y, np.asarray(x) - batch_mean, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * batch_mean, rtol=1e-5)
    y_eval = ms.apply(upd, x, train=False)
    np.testing.assert_allclose(y_eval, np.asarray(x) - 0.1 * batch_mean, atol=1e-5)
    box = ms.apply(upd, Box(x, x + 1), train=False)
    np.testing.assert_allclose(box.hi - box.lo, 1.0, atol=1e-6)


def test_identity_init_puts_minus_ten_where_in_le_out():
    w = layers.linf_init()(jax.random.key(0), (12, 5))
    np.testing.assert_array_equal(w[np.arange(12), np.arange(12) % 5], -10.0)
    assert np.abs(np.asarray(w)[w != -10.0]).max() < 6  # the rest is N(0, 1)
    w_last = layers.linf_init()(jax.random.key(0), (3, 5))  # in > out: no identity
    assert not np.any(np.asarray(w_last) == -10.0)
    wc = layers.linf_init()(jax.random.key(0), (8, 4, 3, 3))
    np.testing.assert_array_equal(wc[np.arange(8), np.arange(8) % 4, 1, 1], -10.0)


def test_pure_net_logits_are_negated_distances_with_bias():
    model, v = _trained_variables(*MODELS["pure"])
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 5, 5, 1)), jnp.float32)
    bias = v["params"]["dists_3"]["bias"]
    assert bias.shape == (10,)
    f = model.apply(v, x, method=lambda m, z: m.trunk(z, float("inf"), False))
    np.testing.assert_allclose(model.apply(v, x), -np.asarray(f), rtol=1e-6)


def test_training_margins_of_pure_net_are_lipschitz_margins():
    model, v = _trained_variables(*MODELS["pure"])
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(6, 5, 5, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=6))
    logits, margins = model.apply(v, x, eps=0.3, labels=y)
    z = np.asarray(logits, np.float64)
    ref = z - z[np.arange(6), np.asarray(y)][:, None] + 0.6
    ref[np.arange(6), np.asarray(y)] = 0
    np.testing.assert_allclose(margins, ref, atol=1e-5)


@pytest.mark.parametrize("bad,field", [
    (dict(name="nope"), "model.name"), (dict(name="linf_dist_net", width=0), "model.width"),
    (dict(name="linf_dist_net", depth=-1), "model.depth"),
    (dict(name="linf_dist_net", head="cnn"), "model.head"),
    (dict(name="linf_dist_net", widht=64), "model.widht"),
    (dict(name="linf_lenet", depth=4), "model.depth"),
    (dict(name="linf_dist_net", num_classes=10), "model.num_classes")])
def test_build_model_rejects_bad_fields_with_the_field_name(bad, field):
    with pytest.raises(ValueError, match=field) as err:
        build_model(bad, 10)
    assert str(err.value).startswith(field + "=") and "\n" not in str(err.value)


def test_unknown_model_field_names_the_model_and_its_fields():
    with pytest.raises(ValueError) as err:
        build_model(dict(name="linf_dist_net", depth=3, widht=64), 10)
    assert str(err.value) == ("model.widht=64 is not allowed: unknown field of linf_dist_net; "
                              "allowed: depth, head, head_hidden, width")
    with pytest.raises(ValueError) as err:
        build_model(dict(name="linf_lenet", depth=4, width=512), 10)
    assert str(err.value) == ("model.depth=4 is not allowed: unknown field of linf_lenet; "
                              "allowed: channels, dense, head, head_hidden, kernel_size")
    # head_hidden is a field of every model, used with head='mlp' only: a pure net's config may
    # carry it (base_config has it)
    assert build_model(dict(name="linf_dist_net", depth=2, width=8, head="none",
                            head_hidden=256), 10).head == "none"


def test_models_accept_a_traced_p_schedule():
    model, v = _trained_variables(*MODELS["mlp"])
    x = jnp.asarray(np.random.default_rng(7).normal(size=(6, 5, 5, 1)), jnp.float32)
    f = jax.jit(lambda p: model.apply(v, x, p=p))
    for p in (8.0, 37.5, float("inf")):
        np.testing.assert_allclose(f(jnp.float32(p)), model.apply(v, x, p=p), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
def test_mlp_head_trunk_is_the_official_feature_trunk(kind):
    """With an MLP head every ℓ∞-dist layer of the trunk, the last included, is mean-shifted and
    none has a bias (the official ``MLPFeature``/``LeNetFeature``), so the head's tanh units are
    not saturated at initialisation; the pure net keeps its bias on the logit layer only."""
    cfg, shape = MODELS[kind]
    model, v = init_with_running_means(cfg, shape, seed=3)
    params, stats = v["params"], v["batch_stats"]
    dists = sorted(k for k in params if k.startswith("dists_"))
    assert all("bias" not in params[k] for k in dists), params.keys()
    assert sorted(k for k in stats if k.startswith("norms_")) == [
        d.replace("dists", "norms") for d in dists]
    x = jnp.asarray(np.random.default_rng(4).normal(size=(256, *shape[1:])), jnp.float32)
    h = jax.jit(lambda v, x: model.apply(
        v, x, p=8.0, train=True, mutable=["batch_stats"],
        method=lambda m, x, p, train: m.fc1(_flat(m.trunk(x, p, train))))[0])(v, x)
    saturated = float((np.abs(np.tanh(np.asarray(h))) > 0.99).mean())
    assert saturated < 0.2, saturated
    pure, vp = init_with_running_means(MODELS["pure"][0], MODELS["pure"][1], seed=3)
    last = sorted(k for k in vp["params"] if k.startswith("dists_"))[-1]
    assert "bias" in vp["params"][last]
    assert len(vp["batch_stats"]) == len(vp["params"]) - 2  # all but the logit layer (+ scale)


def _flat(x):
    return x.reshape(x.shape[0], -1)


def test_registry_variants_are_partials_of_a_class_with_overridable_defaults():
    """``MODELS[name](num_classes, **fields)``: the ++ variant is the ℓ∞-dist Net with
    ``head='mlp'`` by default, and a config's ``head`` still wins."""
    import functools

    from linf_jax.models import MODELS, LinfDistNet, model_fields

    assert isinstance(MODELS["linf_dist_net_mlp"], functools.partial)
    assert MODELS["linf_dist_net_mlp"].func is LinfDistNet
    assert model_fields("linf_dist_net_mlp")["head"] == "mlp"
    assert model_fields("linf_dist_net")["head"] == "none"
    assert model_fields("linf_lenet")["head"] == "mlp"
    assert set(model_fields("linf_dist_net")) == {"depth", "width", "head", "head_hidden"}
    assert set(model_fields("linf_lenet")) == {"channels", "kernel_size", "dense", "head",
                                                "head_hidden"}
    assert build_model(dict(name="linf_dist_net_mlp", depth=2, width=8), 3).head == "mlp"
    assert build_model(dict(name="linf_dist_net_mlp", depth=2, width=8, head="none"),
                       3).head == "none"
    m = build_model(dict(name="linf_dist_net", depth=2, width=8), 3)
    assert type(m) is LinfDistNet and (m.num_classes, m.depth, m.width) == (3, 2, 8)
