"""Ensembles as one stacked pytree: vmapped apply, Lipschitz, stacking errors, joint and
independent training in one program, loading and certifying, member-axis sharding."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, StepSetup, hand_pgd_agrees_with_project_pgd, tiny_config, xla_flags
from hypothesis import given, settings
from hypothesis import strategies as st

from linf_jax import config as config_lib
from linf_jax import data as data_lib
from linf_jax import ensemble, experiment, trainer
from linf_jax.classifier import load_classifier
from linf_jax.models import build_model

CFG = dict(name="linf_dist_net", depth=3, width=24)


def members(num_members, cfg=CFG, shape=(8, 4, 4, 1)):
    """``(model, [variables of each member])``: ``num_members`` inits of one architecture."""
    model = build_model(cfg, 5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    out = []
    for s in range(num_members):
        v = model.init(jax.random.key(s), x, p=8.0, train=True)
        _, upd = model.apply(v, x, p=8.0, train=True, mutable=["batch_stats"])
        out.append({**v, **upd})
    return model, out


def test_stack_unstack_roundtrip_and_vmapped_logits_equal_member_mean():
    model, vs = members(4)
    stacked = ensemble.stack(vs)
    assert ensemble.size(stacked) == 4
    for a, b in zip(ensemble.unstack(stacked), vs, strict=True):
        assert all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4, 4, 1)), jnp.float32)
    one_by_one = np.mean([np.asarray(model.apply(v, x), np.float64) for v in vs], axis=0)
    np.testing.assert_allclose(ensemble.apply(model, stacked, x), one_by_one, rtol=1e-5,
                               atol=1e-5)
    lo, hi, y = x - 0.1, x + 0.1, jnp.arange(16) % 5
    margins = np.mean([np.asarray(model.apply(v, lo, hi, y, method="certify_margins"))
                       for v in vs], axis=0)
    np.testing.assert_allclose(ensemble.apply(model, stacked, lo, hi, y, method="certify_margins"),
                               margins, rtol=1e-5, atol=1e-5)


@functools.cache
def three_members():
    """``(model, members, stacked, jitted ensemble logits)`` of a 3-member ensemble, built on
    first use (not at collection: every xdist worker collects this file, one runs it)."""
    model, vs = members(3)
    stacked = ensemble.stack(vs)
    return model, vs, stacked, jax.jit(lambda z: ensemble.apply(model, stacked, z))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 3.0))
def test_ensemble_is_1_lipschitz_at_p_inf(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 4, 4, 1)).astype(np.float32)
    delta = (rng.uniform(-1, 1, size=x.shape) * scale).astype(np.float32)
    apply = three_members()[3]  # compiled once per shape
    f = lambda z: np.asarray(apply(jnp.asarray(z)), np.float64)
    lhs = np.abs(f(x) - f(x + delta)).max(axis=1)
    rhs = np.abs(delta.astype(np.float64)).reshape(6, -1).max(axis=1)
    assert np.all(lhs <= rhs * (1 + 1e-5) + 1e-5)


def test_stacking_mismatched_members_names_the_first_differing_leaf():
    _, a = members(1)
    _, b = members(1, cfg=dict(CFG, width=16))
    with pytest.raises(ensemble.EnsembleError, match=r"batch_stats/norms_0/mean.*shape \(16,\)"):
        ensemble.stack([a[0], b[0]])
    _, c = members(1, cfg=dict(CFG, depth=4))
    with pytest.raises(ensemble.EnsembleError, match="member 1: parameter"):
        ensemble.stack([a[0], c[0]])
    with pytest.raises(ensemble.EnsembleError, match="no members"):
        ensemble.stack([])


def fixed_p_config(mode, workdir_name):
    """p = 8, constant ε and lr throughout: the loss is comparable from the first step to the
    last."""
    return tiny_config(**{"ensemble.size": 3, "ensemble.mode": mode,
                          "train.epochs": (0, 4, 0, 4, 4), "train.log_every": 1,
                          "eval.eps": (0.05,)})


@pytest.fixture(scope="module", params=["joint", "independent"])
def ensemble_run(request, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp(request.param))
    result = trainer.train_and_evaluate(fixed_p_config(request.param, workdir), workdir,
                                          progress=False)
    return request.param, workdir, result


def test_hand_written_pgd_through_the_loaded_ensemble_finds_what_the_project_pgd_finds(
        ensemble_run):
    """A user's attack differentiates through ``load_classifier`` of a stacked ensemble
    (``jax.grad`` of the averaged logits) and fools the same examples as the project's PGD."""
    _, workdir, _ = ensemble_run
    clf = load_classifier(workdir)
    ds = data_lib.load("digits", "test[:120]")
    hand, project = hand_pgd_agrees_with_project_pgd(clf, data_lib.as_pixels(ds.images),
                                                     ds.labels, 0.1)
    assert hand.sum() >= 5 and (hand != project).sum() <= 1, (hand.sum(), project.sum())


def test_ensemble_training_lowers_its_loss_in_one_program(ensemble_run):
    mode, workdir, result = ensemble_run
    leaves = jax.tree.leaves(result.state.params)
    assert all(leaf.shape[0] == 3 for leaf in leaves)
    w = np.asarray(result.state.params["dists_0"]["linf_weight"])
    assert not np.allclose(w[0], w[1])  # members have their own init
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    first, last = np.mean([x["loss"] for x in lines[:3]]), np.mean([x["loss"] for x in lines[-3:]])
    assert last < 0.7 * first, (mode, first, last)
    assert result.results["clean_accuracy"] > 0.3


def test_loaded_ensemble_evaluates_all_members_in_one_call(ensemble_run):
    _, workdir, result = ensemble_run
    clf = load_classifier(workdir)
    assert clf.num_members == 3 and len(clf.members) == 3
    ds = data_lib.load("digits", "test[:40]")
    x = np.asarray(data_lib.as_pixels(ds.images))
    mean = np.mean([np.asarray(m(x), np.float64) for m in clf.members], axis=0)
    np.testing.assert_allclose(clf(x), mean, rtol=1e-5, atol=1e-5)
    cert = np.asarray(clf.certify(x, ds.labels, 0.05))
    assert not np.any(cert & (np.asarray(clf(x)).argmax(-1) != ds.labels))


def test_several_workdirs_stack_into_one_ensemble(tmp_path_factory):
    dirs = []
    for seed in (1, 2):
        d = str(tmp_path_factory.mktemp(f"member{seed}"))
        cfg = tiny_config(**{"seed": seed, "train.epochs": (0, 1, 0, 1, 1)})
        trainer.train_and_evaluate(cfg, d, progress=False, evaluate_at_end=False)
        dirs.append(d)
    clf = load_classifier(dirs, weights="raw")
    assert clf.num_members == 2
    ds = data_lib.load("digits", "test[:20]")
    x = np.asarray(data_lib.as_pixels(ds.images))
    singles = [load_classifier(d, weights="raw") for d in dirs]
    np.testing.assert_allclose(clf(x), np.mean([np.asarray(s(x)) for s in singles], axis=0),
                               rtol=1e-5, atol=1e-5)


SHARD_SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_check.py")


def test_sharding_over_four_host_devices_matches_one_device(tmp_path):
    """Data parallelism and member-axis sharding over 4 forced CPU devices give the parameters
    of one device; a checkpoint saved on 4 devices resumes on 2 (script: sharded_check.py)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
               PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, SHARD_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    for case, diff in report["max_abs_diff"].items():
        assert diff < 1e-5, (case, diff)
    assert report["sharded_member_axis"] is True


# ----------------------------------------------------------------------------------------------
# ensemble.execution: the member axis batched (jax.vmap) or one member after the other inside
# the same program (lax.map); both must give the one-by-one results, values and gradients.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_both_executions_equal_the_member_loop_values_and_input_gradients(execution):
    x = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, size=(12, 4, 4, 1)), jnp.float32)
    y = jnp.arange(12) % 5
    lo, hi = x - 0.07, x + 0.07
    model, vs, stacked, _ = three_members()

    def one_by_one(fn):
        return np.mean([np.asarray(fn(v), np.float64) for v in vs], axis=0)

    logits = ensemble.apply(model, stacked, x, execution=execution)
    np.testing.assert_allclose(logits, one_by_one(lambda v: model.apply(v, x)), rtol=1e-5,
                               atol=1e-5)
    margins = ensemble.apply(model, stacked, lo, hi, y, method="certify_margins",
                             execution=execution)
    np.testing.assert_allclose(
        margins, one_by_one(lambda v: model.apply(v, lo, hi, y, method="certify_margins")),
        rtol=1e-5, atol=1e-5)

    # PGD differentiates the averaged logits with respect to the input.
    def target(xx, fn):
        return (fn(xx) * jax.nn.one_hot(y, 5)).sum()

    g = jax.jit(jax.grad(lambda xx: target(
        xx, lambda z: ensemble.apply(model, stacked, z, execution=execution))))(x)
    g_ref = np.mean([np.asarray(jax.grad(lambda xx, v=v: target(
        xx, lambda z: model.apply(v, z)))(x)) for v in vs], axis=0)
    assert np.abs(g_ref).sum() > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_train_step_is_the_same_batched_or_sequential(mode):
    """One train step from the same state: parameters, EMA, Adam state, running means and
    metrics agree (Adam eps 1e-3, so rounding in tiny gradients is not amplified to ±lr)."""
    steps, state = {}, None
    for execution in ("batched", "sequential"):
        cfg = tiny_config(**{"ensemble.size": 3, "ensemble.mode": mode,
                             "ensemble.execution": execution, "train.adam_eps": 1e-3})
        setup = StepSetup(cfg, adam_eps=1e-3)
        ds, step = setup.ds, setup.step
        if state is None:
            state = setup.state
        idx = np.arange(64) if mode == "joint" else np.stack([np.arange(64) + 64 * i
                                                              for i in range(3)])
        steps[execution] = step(state, jnp.asarray(ds.images), jnp.asarray(ds.labels),
                                jnp.asarray(idx), "start")
    (a, ma), (b, mb) = steps["batched"], steps["sequential"]
    moved = max(float(np.abs(np.asarray(u) - np.asarray(v)).max())
                for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(state.params),
                                strict=True))
    assert moved > 1e-4  # the step did update the parameters
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)
    for key in ("loss", "accuracy", "grad_norm", "param_norm"):
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-4, err_msg=key)


def test_auto_execution_is_batched_when_training_or_sharded_and_rejects_unknown_names():
    cpu = jax.default_backend() == "cpu"
    assert ensemble.resolve_execution("auto") == ("sequential" if cpu else "batched")
    assert ensemble.resolve_execution("auto", training=True) == "batched"
    assert ensemble.resolve_execution("auto", sharded=True) == "batched"
    assert ensemble.resolve_execution("sequential", training=True) == "sequential"
    with pytest.raises(ValueError, match="ensemble.execution='fast' is not allowed"):
        ensemble.resolve_execution("fast")
    with pytest.raises(config_lib.ConfigError, match="ensemble.execution"):
        config_lib.validate_config(tiny_config(**{"ensemble.execution": "fast"}))


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_joint_and_independent_steps_take_different_gradients(mode):
    """A joint step's gradient is that of ONE loss on the members' averaged logits and margins
    (the EMA paper's ensemble training), not the average of the members' own losses; an
    independent step's is that of each member's own loss. Both are told apart by the step's
    loss and gradient-norm metrics, all members seeing the same batch here. (κ-CE: a loss
    whose value on averaged logits differs from the average of its values.)"""
    cfg = tiny_config(**{"ensemble.size": 3, "ensemble.mode": mode, "train.loss": "kappa_ce"})
    setup = StepSetup(cfg)
    ds, meta, schedule, model, state = (setup.ds, setup.meta, setup.schedule, setup.model,
                                        setup.state)
    step = setup.step
    rows = np.arange(64)
    idx = rows if mode == "joint" else np.stack([rows] * 3)
    images, labels = jnp.asarray(ds.images), jnp.asarray(ds.labels)
    _, metrics = step(state, images, labels, jnp.asarray(idx), "start")

    x = data_lib.normalize(data_lib.as_pixels(images[rows]), jnp.asarray(meta["mean"]),
                           meta["std"])
    y = labels[rows]
    p, eps, lam = schedule.p_start, schedule.eps(0), schedule.lam(0)

    def member(params, stats):
        (logits, margins), _ = model.apply({"params": params, "batch_stats": stats}, x, p=p,
                                           train=True, eps=eps, labels=y,
                                           mutable=["batch_stats"])
        return logits, margins

    def loss_of(logits, margins, scale):
        return experiment.make_loss_fn(cfg)(logits, margins, y, eps, lam, scale)

    def joint(params):
        logits, margins = jax.vmap(member)(params, state.batch_stats)
        return loss_of(logits.mean(0), margins.mean(0), params["logit_scale"].mean())

    def summed(params):  # every member's own loss; its gradient is each member's own
        losses = jax.vmap(lambda q, s: loss_of(*member(q, s), q["logit_scale"]))(
            params, state.batch_stats)
        return losses.sum()

    # jitted: one compilation each instead of one per operation of an eager pass
    joint, summed = jax.jit(joint), jax.jit(summed)
    global_norm = jax.jit(lambda g: jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(g))))
    norm = lambda g: float(global_norm(g))
    grad_joint = jax.jit(jax.grad(joint))(state.params)
    grad_members = jax.jit(jax.grad(summed))(state.params)
    g_joint, g_members = norm(grad_joint), norm(grad_members)
    # the two rules do differ here: joint is not the average of the members' own gradients
    gap = norm(jax.tree.map(lambda a, b: a - b / 3, grad_joint, grad_members))
    assert gap > 0.05 * g_joint and abs(g_joint - g_members / 3) > 1e-3 * g_joint
    if mode == "joint":
        np.testing.assert_allclose(float(metrics["loss"]), float(joint(state.params)), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), g_joint, rtol=1e-4)
    else:
        np.testing.assert_allclose(float(metrics["loss"]), float(summed(state.params)) / 3,
                                   rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), g_members, rtol=1e-4)
