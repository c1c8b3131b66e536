"""SortNet models: the masked training neuron and MeanShift against float64 NumPy, q = 1 equal to
the ℓ∞-dist net, the pure SortNet 1-Lipschitz, the running means re-estimated and saved with
every checkpoint (certify.py needs no data; a checkpoint without them is one error line), the
dropout randomness resumed bit for bit, and the one-line errors of bad SortNet fields."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config

from linf_jax import checkpoint as ckpt
from linf_jax import recalibrate, trainer
from linf_jax.classifier import load_classifier
from linf_jax.layers import Box, MeanShift, SortDist
from linf_jax.models import build_model, is_1_lipschitz, uses_dropout

INF = float("inf")
SORT = {"model.name": "sort_net", "model.depth": 3, "model.width": 32, "model.q": 0.75,
        "model.top_k": 5, "model.mask_block": 16}


def sort_config(**overrides):
    c = tiny_config(**overrides)
    fields = {**SORT, **{k: v for k, v in overrides.items() if k.startswith("model.")}}
    c.model = {k.split(".", 1)[1]: v for k, v in fields.items()}
    return c


def _lp64(x, w, p):
    """float64 ‖x_b − w_o‖_p for every (b, o): [B, out]."""
    d = np.abs(x[:, None, :].astype(np.float64) - w[None].astype(np.float64))
    return d.max(-1) if p == INF else (d ** p).sum(-1) ** (1.0 / p)


@pytest.mark.parametrize("p", [8.0, 37.5, INF])
def test_masked_sort_layer_matches_float64_on_kept_units(p):
    """A block's outputs are the ℓp distances of its kept output rows over its kept inputs;
    both gradients reach exactly those weights, as the float64 gradient says."""
    rng = np.random.default_rng(0)
    s, r, n, out, m_in, m_out = 3, 5, 23, 17, 15, 11
    x = rng.normal(size=(s, r, m_in)).astype(np.float32)
    in_idx = np.stack([np.sort(rng.choice(n, m_in, replace=False)) for _ in range(s)])
    out_idx = np.stack([np.sort(rng.choice(out, m_out, replace=False)) for _ in range(s)])
    layer = SortDist(out, n, q=0.75, use_bias=True)
    v = layer.init(jax.random.key(0), jnp.zeros((1, n)))
    w = rng.normal(size=(out, n)).astype(np.float32)
    b = rng.normal(size=(out,)).astype(np.float32)
    v = {"params": {"linf_weight": jnp.asarray(w), "bias": jnp.asarray(b)}}
    g = rng.normal(size=(s, r, m_out)).astype(np.float32)

    def f(v, x):
        return layer.apply(v, x, p, in_index=jnp.asarray(in_idx), out_index=jnp.asarray(out_idx))

    y, vjp = jax.vjp(f, v, jnp.asarray(x))
    gv, gx = vjp(jnp.asarray(g))
    want_gw, want_gx, want_gb = np.zeros((out, n)), np.zeros((s, r, m_in)), np.zeros(out)
    for k in range(s):
        wk = w[out_idx[k]][:, in_idx[k]]
        yk = _lp64(x[k], wk, p)
        np.testing.assert_allclose(np.asarray(y[k]), yk + b[out_idx[k]], rtol=2e-5, atol=2e-5)
        d = x[k][:, None, :].astype(np.float64) - wk[None]
        if p == INF:
            a = np.abs(d)
            t = (a == a.max(-1, keepdims=True)) * np.sign(d)
        else:
            t = np.sign(d) * (np.abs(d) / yk[..., None]) ** (p - 1)
        gt = g[k][..., None] * t  # [r, m_out, m_in]
        want_gx[k] = gt.sum(1)
        np.add.at(want_gw, (out_idx[k][:, None], in_idx[k][None, :]), -gt.sum(0))
        np.add.at(want_gb, out_idx[k], g[k].sum(0))
    np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gv["params"]["linf_weight"]), want_gw, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(gv["params"]["bias"]), want_gb, rtol=1e-5, atol=1e-4)


def test_masked_mean_shift_averages_each_unit_over_the_blocks_that_kept_it():
    rng = np.random.default_rng(1)
    s, r, m, units = 4, 6, 5, 9
    x = rng.normal(size=(s, r, m)).astype(np.float32)
    idx = np.stack([np.sort(rng.choice(units, m, replace=False)) for _ in range(s)])
    valid = np.ones((s, r), np.float32)
    valid[-1, 4:] = 0  # padding rows of a ragged last block
    ms = MeanShift(units=units)
    v = ms.init(jax.random.key(0), jnp.zeros((2, units)))
    out, new = ms.apply(v, jnp.asarray(x), True, jnp.asarray(idx), jnp.asarray(valid),
                        mutable=["batch_stats", "intermediates"])
    sums, counts = np.zeros(units), np.zeros(units)
    for k in range(s):
        np.add.at(sums, idx[k], (x[k] * valid[k][:, None]).sum(0))
        np.add.at(counts, idx[k], valid[k].sum())
    mean = np.where(counts > 0, sums / np.maximum(counts, 1e-10), 0.0)
    np.testing.assert_allclose(np.asarray(new["intermediates"]["batch_mean"][0]), mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), x - mean[idx][:, None, :], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_keep_all_sort_net_is_the_linf_dist_net(train):
    """q = 1: the same parameters give the pure ℓ∞-dist net's logits, margins and running means
    (training at p = 8 and evaluation at ∞), and no random masks are drawn."""
    sort = build_model(dict(name="sort_net", depth=3, width=24, q=1.0), 10)
    linf = build_model(dict(name="linf_dist_net", depth=3, width=24, head="none"), 10)
    x = jax.random.normal(jax.random.key(2), (9, 8, 8, 1))
    y = jnp.arange(9) % 10
    v = linf.init(jax.random.key(3), x, p=INF, train=False)
    p = 8.0 if train else INF
    kw = dict(p=p, train=train, eps=0.1, labels=y)
    if train:
        a, sa = linf.apply(v, x, mutable=["batch_stats"], **kw)
        b, sb = sort.apply(v, x, mutable=["batch_stats"], **kw)
        jax.tree.map(np.testing.assert_array_equal, sa, sb)
    else:
        a, b = linf.apply(v, x, **kw), sort.apply(v, x, **kw)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not uses_dropout(dict(name="sort_net", q=1.0)) and uses_dropout(dict(name="sort_net"))


def test_pure_sort_net_is_1_lipschitz_and_its_bounds_hold():
    """Evaluation mode: every logit moves by at most ‖x − x'‖∞, and the interval bounds of the
    logits contain the logits of random points of the box."""
    model = build_model(dict(name="sort_net", depth=4, width=40, q=0.6, top_k=7), 10)
    assert is_1_lipschitz(model)
    assert not is_1_lipschitz(build_model(dict(name="sort_net_mlp", depth=4, width=8), 10))
    key = jax.random.key(4)
    x = jax.random.normal(key, (64, 6, 6, 2))
    v = model.init(key, x[:1], p=INF, train=False)
    _, st = model.apply(v, x, p=INF, train=True, mutable=["batch_stats"])  # non-zero means
    v = {**v, **st}
    f = jax.jit(lambda z: model.apply(v, z))
    d = 0.3 * jax.random.uniform(jax.random.key(5), x.shape, minval=-1.0)
    gap = jnp.abs(f(x + d) - f(x)).max(-1)
    assert float((gap - jnp.abs(d).reshape(64, -1).max(-1)).max()) <= 1e-5
    assert float(gap.max()) > 0.01  # the network is not constant
    box = model.apply(v, x - 0.3, x + 0.3, method="logit_bounds")
    for i in range(8):
        z = x + 0.3 * jax.random.uniform(jax.random.key(10 + i), x.shape, minval=-1.0)
        logits = f(z)
        assert bool(jnp.all(logits >= box.lo - 1e-4)) and bool(jnp.all(logits <= box.hi + 1e-4))
    assert isinstance(box, Box)


@pytest.mark.parametrize("name", ["sort_net", "sort_net_mlp", "sort_net_conv_mlp"])
def test_masked_training_pass_and_gradients_are_finite(name):
    """Every SortNet trains in blocks of ``mask_block`` (a ragged last block included) at a
    finite and at an infinite p, each mask key giving other outputs, and its parameters all get
    gradient."""
    extra = {} if name == "sort_net" else {"head_hidden": 16}
    model = build_model(dict(name=name, depth=4, width=24, q=0.7, top_k=4, mask_block=4,
                             **extra), 10)
    x = jax.random.normal(jax.random.key(6), (10, 12, 12, 3))
    y = jnp.arange(10) % 10
    v = model.init(jax.random.key(7), x[:1], p=INF, train=False)

    def loss(params, key, p):
        (logits, margins), _ = model.apply({**v, "params": params}, x, p=p, train=True, eps=0.1,
                                           labels=y, mutable=["batch_stats"],
                                           rngs={"dropout": key})
        return (logits ** 2).mean() + margins.mean()

    for p in (8.0, INF):
        l1, g = jax.value_and_grad(loss)(v["params"], jax.random.key(1), p)
        l2 = loss(v["params"], jax.random.key(2), p)
        assert np.isfinite(float(l1)) and float(l1) != float(l2)
        norms = {jax.tree_util.keystr(k): float(jnp.abs(a).sum())
                 for k, a in jax.tree_util.tree_leaves_with_path(g)}
        assert all(np.isfinite(list(norms.values())))
        assert all(val > 0 for k, val in norms.items() if "linf_weight" in k), norms


@pytest.fixture(scope="module")
def sort_run(tmp_path_factory):
    """A tiny pure SortNet trained on the digits, interrupted once half-way and resumed, and
    the same run uninterrupted."""
    cfg = sort_config()
    full = str(tmp_path_factory.mktemp("sort_full"))
    part = str(tmp_path_factory.mktemp("sort_part"))
    done = trainer.train_and_evaluate(cfg, full, progress=False, evaluate_at_end=False)
    first = trainer.train_and_evaluate(cfg, part, progress=False, evaluate_at_end=False,
                                       max_steps=25)
    assert first.preempted
    resumed = trainer.train_and_evaluate(cfg, part, progress=False, evaluate_at_end=False)
    return cfg, full, part, done.state, resumed.state


def test_resume_with_random_masks_is_bit_identical(sort_run):
    _, _, _, done, resumed = sort_run
    for field in ("params", "opt_state", "ema_params", "batch_stats", "ema_batch_stats",
                  "recalibrated"):
        jax.tree.map(np.testing.assert_array_equal, getattr(done, field),
                     getattr(resumed, field))
    assert int(done.recalibrated["step"]) == int(done.step)


def test_recalibrated_means_centre_the_training_set(sort_run):
    """The re-estimation over the training set in one batch, without augmentation, gives
    running means under which every MeanShift's evaluation-mode output averages to 0 over that
    set, for the raw and the EMA weights; they differ from the training network's means."""
    cfg, full, _, state, _ = sort_run
    _, meta, model, _ = ckpt.load_run(full)
    from linf_jax import data as data_lib

    ds = data_lib.load("digits", cfg.data.train_split)
    x = data_lib.normalize(data_lib.as_pixels(jnp.asarray(ds.images)), jnp.asarray(meta["mean"]),
                           meta["std"])
    idx = np.arange(len(ds.labels))
    means_fn = recalibrate.make_means_fn(model.apply, lambda im, lb, i, k: (im[i], lb[i]), None)
    for params, bs in ((state.params, state.batch_stats),
                       (state.ema_params, state.ema_batch_stats)):
        stats = recalibrate.recalibrate(means_fn, params, bs, x, jnp.asarray(ds.labels), [idx],
                                        jax.random.key(0))
        _, inter = model.apply({"params": params, "batch_stats": stats}, x, p=INF, train=False,
                               capture_intermediates=lambda mdl, _: isinstance(mdl, MeanShift),
                               mutable=["intermediates"])
        for name, val in inter["intermediates"].items():
            if name.startswith("norms_"):
                out = val["__call__"][0]
                assert float(jnp.abs(out.mean(0)).max()) < 1e-4, name
        diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), stats, bs)
        assert max(jax.tree.leaves(diff)) > 1e-3


def test_certify_needs_no_data_and_refuses_checkpoints_without_recalibration(sort_run, tmp_path):
    """certify.py certifies a SortNet run from its checkpoint alone (every kept step), and a
    SortNet checkpoint saved without re-estimated means is one error line."""
    cfg, full, _, state, _ = sort_run
    clf = load_classifier(full)
    assert clf.lipschitz
    out = tmp_path / "c.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "certify.py"), "--workdir", full,
                           "--eps", "0.1", "--pgd_steps", "2", "--all_checkpoints",
                           "--output", str(out)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a checkpoint of the same run whose running means were never re-estimated
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "meta.json"):
        (bad / f).write_text(open(os.path.join(full, f)).read())
    mngr = ckpt.checkpoint_manager(str(bad))
    stale = state.replace(recalibrated={**state.recalibrated, "step": jnp.asarray(-1)})
    ckpt.save_checkpoint(mngr, stale)
    mngr.close()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "certify.py"), "--workdir",
                           str(bad), "--eps", "0.1"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no re-estimated running means" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(ckpt.CheckpointError, match="no re-estimated running means"):
        ckpt.variables_for(stale, "ema")


@pytest.mark.parametrize("field,value,message", [
    ("model.q", 0.0, "model.q=0.0 is not allowed: a keep probability in (0, 1]"),
    ("model.q", 1.5, "model.q=1.5 is not allowed"),
    ("model.top_k", 0, "model.top_k=0 is not allowed: a positive integer"),
    ("model.head_hidden", 64, "model.head_hidden=64 is not allowed: unknown field of sort_net"),
    ("model.depth", 1, "model.depth=1 is not allowed: at least 2 for sort_net"),
])
def test_bad_sortnet_fields_are_one_line(field, value, message):
    cfg = {**dict(name="sort_net", depth=3, width=8), field.split(".")[1]: value}
    with pytest.raises(ValueError, match=None) as err:
        build_model(cfg, 10)
    assert str(err.value).startswith(message.split(" is not")[0]) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_sortnet_field_on_a_linf_dist_net_is_one_line():
    with pytest.raises(ValueError) as err:
        build_model(dict(name="linf_dist_net", depth=3, width=8, q=0.7), 10)
    assert str(err.value).startswith("model.q=0.7 is not allowed: unknown field of linf_dist_net")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "default.py"), "--config.model.q=0.5",
         "--workdir", "/nonexistent/never"], capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "q" in proc.stderr.strip().splitlines()[-1]


def test_python_m_schedules_previews_a_sortnet_preset():
    proc = subprocess.run([sys.executable, "-m", "linf_jax.schedules", "--config",
                           "sortnet_cifar10_2_mlp"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "smooth eps ramp r0 0.4, loss ce_hinge" in proc.stdout
    assert "(0, 500, 200, 2950, 3000)" in proc.stdout


def test_export_of_a_sortnet_serves_its_logits_and_radii(sort_run, tmp_path):
    """linf_jax.export lowers the SortNet (sort neurons, re-estimated means) for the CPU, CUDA
    and TPU with a symbolic batch; the CPU program gives the classifier's logits and radii."""
    from linf_jax import data as data_lib
    from linf_jax import export

    _, full, _, _, _ = sort_run
    exp = export.export(full, str(tmp_path / "sort.jax"), platforms=("cpu", "cuda", "tpu"))
    clf = load_classifier(full)
    x = jnp.asarray(data_lib.as_pixels(data_lib.load("digits", "test[:37]").images))
    logits, radii = exp.call(x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(clf(x)), rtol=1e-5, atol=1e-5)
    pred = jnp.argmax(logits, -1)
    np.testing.assert_allclose(np.asarray(radii), np.asarray(clf.certified_radius(x, pred)),
                               rtol=1e-4, atol=1e-5)
    assert float(radii.max()) > 0


def test_block_weights_gather_gradient_equals_the_scatter_transpose():
    """ops.blocks.block_weights: each block's kept rows and columns, and a gradient computed by
    gathers equal to the plain take's scatter-add (rows or columns kept whole included)."""
    from linf_jax.ops.blocks import block_weights

    rng = np.random.default_rng(3)
    out, n, s = 13, 11, 4
    w = jnp.asarray(rng.normal(size=(out, n)), jnp.float32)
    for m_out, m_in in ((7, 5), (out, 6), (9, n)):
        oi = jnp.asarray(np.stack([np.sort(rng.choice(out, m_out, replace=False))
                                   for _ in range(s)]), jnp.int32)
        ii = jnp.asarray(np.stack([np.sort(rng.choice(n, m_in, replace=False))
                                   for _ in range(s)]), jnp.int32)
        g = jnp.asarray(rng.normal(size=(s, m_out, m_in)), jnp.float32)
        plain = lambda w: jnp.take_along_axis(jnp.take(w, oi, axis=0), ii[:, None, :], axis=2)
        got, vjp = jax.vjp(lambda w: block_weights(w, oi, ii), w)
        want, vjp_plain = jax.vjp(plain, w)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_plain(g)[0]),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["independent", "joint"])
def test_sortnet_ensembles_train_recalibrate_and_certify(mode, tmp_path):
    """A K = 2 SortNet ensemble (each member its own masks) trains, its running means are
    re-estimated per member for raw and EMA weights, and it certifies from the checkpoint."""
    cfg = sort_config(**{"ensemble.size": 2, "ensemble.mode": mode,
                         "train.epochs": (0, 1, 1, 2, 2)})
    res = trainer.train_and_evaluate(cfg, str(tmp_path), progress=False, evaluate_at_end=False)
    rec = res.state.recalibrated
    assert int(rec["step"]) == int(res.state.step)
    for weights in ("raw", "ema"):
        for leaf in jax.tree.leaves(rec[weights]):
            assert leaf.shape[0] == 2 and float(jnp.abs(leaf[0] - leaf[1]).max()) > 0
    clf = load_classifier(str(tmp_path))
    from linf_jax import data as data_lib

    x = jnp.asarray(data_lib.as_pixels(data_lib.load("digits", "test[:30]").images))
    y = jnp.asarray(data_lib.load("digits", "test[:30]").labels)
    members = clf.members
    np.testing.assert_allclose(np.asarray(clf(x)), np.mean([np.asarray(m(x)) for m in members],
                                                           axis=0), rtol=1e-5, atol=1e-5)
    assert clf.lipschitz and clf.certify(x, y, 0.02).shape == (30,)
