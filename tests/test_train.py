"""End to end: a tiny run trains, checkpoints, resumes bit-identically and certifies; the CLIs
write what they promise."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, hand_pgd_agrees_with_project_pgd, read_tensorboard_scalars, tiny_config

from linf_jax import checkpoint as ckpt
from linf_jax import config as config_lib
from linf_jax import data as data_lib
from linf_jax import train_lib, trainer
from linf_jax.classifier import load_classifier


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    result = trainer.train_and_evaluate(tiny_config(), workdir, progress=False)
    return workdir, result


def test_tiny_run_learns_and_certifies(full_run):
    workdir, result = full_run
    assert not result.preempted
    r = result.results
    assert r["num_examples"] == 360 and r["weights"] == "ema"
    assert r["clean_accuracy"] > 0.3  # 10 classes: chance is 0.1
    rows = {row["eps"]: row for row in r["results"]}
    assert set(rows) == {0.02, 0.1}
    for row in rows.values():  # certified ≤ PGD ≤ clean, Lipschitz rule ≤ interval rule + tol
        assert row["certified_accuracy"] <= row["pgd_accuracy"] + 1e-9
        assert row["pgd_accuracy"] <= r["clean_accuracy"] + 1e-9
    assert rows[0.02]["certified_accuracy"] > 0.1
    assert rows[0.1]["certified_accuracy"] <= rows[0.02]["certified_accuracy"]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == sorted({x["step"] for x in lines})
    first, last = lines[0], lines[-1]
    assert last["step"] == result.state.step - 1
    assert last["accuracy"] > first["accuracy"] + 0.2  # ε grows from 0, so the loss may not fall
    assert {"loss", "accuracy", "p", "eps", "lr", "grad_norm"} <= set(last)
    assert last["p"] == float("inf") and first["p"] == 8.0
    assert os.path.exists(os.path.join(workdir, "results.json"))
    # the same figures as TensorBoard scalars, one per logged step, plus the final evaluation
    scalars = read_tensorboard_scalars(workdir)
    for name in ("loss", "accuracy", "eps", "lr"):
        logged = scalars[f"train/{name}"]
        assert sorted(logged) == [x["step"] for x in lines], name
        np.testing.assert_allclose([logged[x["step"]] for x in lines],
                                   [x[name] for x in lines], rtol=1e-6)
    # p while it is finite, 1/p over the whole run (0 at p = ∞): no non-finite scalar, so
    # TensorBoard has nothing to warn about
    finite = [x for x in lines if math.isfinite(x["p"])]
    assert 0 < len(finite) < len(lines)
    assert sorted(scalars["train/p"]) == [x["step"] for x in finite]
    np.testing.assert_allclose([scalars["train/p"][x["step"]] for x in finite],
                               [x["p"] for x in finite], rtol=1e-6)
    np.testing.assert_allclose([scalars["train/inv_p"][x["step"]] for x in lines],
                               [1 / x["p"] for x in lines], rtol=1e-6)
    assert all(math.isfinite(v) for tag in scalars.values() for v in tag.values())
    final = scalars["eval/certified_accuracy_0.1"]
    assert final == {int(result.state.step): pytest.approx(rows[0.1]["certified_accuracy"])}


def test_resume_is_bit_identical(full_run, tmp_path):
    _, full = full_run
    workdir = str(tmp_path / "resumed")
    cfg = tiny_config()
    part = trainer.train_and_evaluate(cfg, workdir, progress=False, max_steps=17)
    assert part.preempted and int(part.state.step) == 17
    part = trainer.train_and_evaluate(cfg, workdir, progress=False, max_steps=20)
    assert part.preempted and int(part.state.step) == 37
    done = trainer.train_and_evaluate(cfg, workdir, progress=False, evaluate_at_end=False)
    assert not done.preempted
    assert int(done.state.step) == int(full.state.step)
    assert leaves_equal(done.state.params, full.state.params)
    assert leaves_equal(done.state.ema_params, full.state.ema_params)
    assert leaves_equal(done.state.opt_state, full.state.opt_state)
    assert leaves_equal(done.state.ema_batch_stats, full.state.ema_batch_stats)
    steps = [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == sorted(set(steps))  # no duplicated lines from the resumed segments


def test_load_classifier_matches_training_state(full_run):
    workdir, result = full_run
    from linf_jax import data as data_lib

    ds = data_lib.load("digits", "test")
    x = np.asarray(data_lib.as_pixels(ds.images[:50]))
    clf = load_classifier(workdir)
    raw = load_classifier(workdir, weights="raw")
    logits = np.asarray(clf(x))
    assert logits.shape == (50, 10)
    variables = ckpt.variables_for(result.state, "ema")
    norm = data_lib.normalize(x, np.asarray(result.meta["mean"]), result.meta["std"])
    np.testing.assert_allclose(logits, result.model.apply(variables, norm), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits, np.asarray(raw(x)))  # EMA and raw weights differ
    cert = np.asarray(clf.certify(x, ds.labels[:50], 0.02))
    assert cert.dtype == bool and cert.shape == (50,)
    assert not np.any(cert & (logits.argmax(-1) != ds.labels[:50]))
    # The interval bounds of an l_inf-dist net are never looser than the Lipschitz margin (each
    # layer's exact interval lies inside [y - eps, y + eps]), so a Lipschitz radius above eps
    # (plus the certificate's rounding margin) implies the interval certificate. The converse
    # does not hold: the interval certifies more.
    radius = np.asarray(clf.certified_radius(x, ds.labels[:50]))
    assert np.all((radius >= 0.02 + 1e-3) <= cert)


def test_certify_cli_writes_json_and_plot(full_run, tmp_path):
    workdir, _ = full_run
    out, png = tmp_path / "r.json", tmp_path / "curve.png"
    cmd = [sys.executable, os.path.join(REPO, "certify.py"), f"--workdir={workdir}",
           "--eps=0.02,0.1", f"--output={out}", f"--plot={png}", "--pgd_steps=5",
           "--progress=false", "--limit=100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    for key in ("clean_accuracy", "num_examples", "weights", "seconds", "results"):
        assert key in r
    assert r["num_examples"] == 100 and r["weights"] == "ema" and r["pgd_steps"] == 5
    assert [row["eps"] for row in r["results"]] == [0.02, 0.1]
    for row in r["results"]:
        assert set(row) >= {"eps", "certified_accuracy", "lipschitz_certified_accuracy",
                            "pgd_accuracy"}
    assert len(r["radii"]) == 100
    assert png.stat().st_size > 1000
    kernels = [ln for ln in proc.stdout.splitlines() if ln.startswith("kernels: ")]
    assert len(kernels) == 1, proc.stdout[-2000:]


@pytest.mark.parametrize("env, field, want", [
    ("native", "xla", ("xla", "config.kernels")),  # the config's choice wins over the variable
    ("xla", "auto", ("xla", "LINF_JAX_KERNELS")),  # auto: the variable
    (None, "native", ("native", "config.kernels")),
])
def test_the_run_traces_under_its_kernels_and_records_them(monkeypatch, tmp_path, env, field,
                                                           want):
    """``config.kernels`` and ``LINF_JAX_KERNELS`` decide, once, which kernels a run uses: the
    run calls native kernels exactly when its meta.json says a pass runs native, and the record
    names the request and where it came from."""
    from linf_jax import native, ops

    if not native.available():
        pytest.skip("no native kernels to tell apart from the XLA code")
    if env is None:
        monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(ops.KERNELS_ENV, env)
    called = []

    def spy(name, real):
        return lambda *args, **kwargs: called.append(name) or real(*args, **kwargs)

    for name in ("linf_max", "linf_fwd", "linf_bwd", "linf_bounds", "lp_sum", "lp_bwd",
                 "lp_decay"):  # the native kernels' Python entry points
        monkeypatch.setattr(native, name, spy(name, getattr(native, name)))
    cfg = tiny_config(**{"kernels": field, "train.epochs": (0, 1, 1, 2, 2)})
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(cfg, str(workdir), progress=False, evaluate_at_end=False,
                               max_steps=12)
    record = json.load(open(workdir / "meta.json"))["kernels"]
    assert (record["requested"], record["from"]) == want
    assert record["platform"] == "cpu"
    assert record["passes"] == dict.fromkeys(("linf", "lp", "bounds", "decay"), want[0])
    assert (len(called) > 0) == (want[0] == "native"), called
    assert json.load(open(workdir / "config.json"))["kernels"] == field


def _cpu_flags():
    from linf_jax import native

    return set(native.cpu_flags().split())


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs an x86 CPU with AVX2")
def test_train_cli_on_an_avx2_cpu_uses_the_xla_code(tmp_path):
    """``python train.py`` on an AVX2-only CPU, simulated by building for AVX2
    (``LINF_JAX_NATIVE_ISA=avx2``), without the timing calibration (``LINF_JAX_CALIBRATION=off``,
    the instruction-set rule): the XLA code runs, and one line says so."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path / 'run'}",
           "--config.model.depth=3", "--config.model.width=16",
           "--config.data.train_split=train[:64]", "--config.train.batch_size=64",
           "--config.train.epochs=(0,0,0,0,1)", "--config.eval.pgd_steps=1",
           "--config.eval.eps=(0.1,)", "--progress=false"]
    env = dict(os.environ, LINF_JAX_NATIVE_ISA="avx2", LINF_JAX_CALIBRATION="off")
    env.pop("LINF_JAX_KERNELS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels = [ln for ln in proc.stdout.splitlines() if ln.startswith("kernels: ")]
    assert kernels == ["kernels: XLA (cpu; this CPU's native kernel variant is avx2; the native "
                       "kernels are the default only on AVX-512 CPUs, where they were measured "
                       "faster (LINF_JAX_KERNELS=native forces them))"], proc.stdout[-2000:]
    recorded = json.load(open(tmp_path / "run" / "meta.json"))["kernels"]
    assert recorded["passes"] == dict.fromkeys(("linf", "lp", "bounds", "decay"), "xla")
    assert "certified" in proc.stdout
    scalars = read_tensorboard_scalars(tmp_path / "run")  # python train.py writes TensorBoard
    assert {"train/loss", "train/accuracy", "train/inv_p", "train/eps", "train/lr"} <= set(scalars)


def test_deterministic_gpu_runs_set_or_demand_xla_flag(monkeypatch):
    """``train.deterministic``: the flag is added to XLA_FLAGS (once); a GPU backend started
    without it is refused in one line; CPU runs need nothing."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    cfg = tiny_config(**{"train.deterministic": True})
    config_lib.check_determinism(cfg)  # CPU: deterministic already
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(config_lib.ConfigError, match="config.train.deterministic=True .*XLA_FLAGS"):
        config_lib.check_determinism(cfg)
    config_lib.request_determinism(cfg)
    config_lib.request_determinism(cfg)
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=1 "
                                       + config_lib.DETERMINISTIC_FLAG)
    config_lib.check_determinism(cfg)
    config_lib.check_determinism(tiny_config())  # not asked for: nothing demanded


def test_classifier_is_a_jax_function(full_run):
    """``load_classifier``'s result works under ``jax.grad``, ``jax.jit`` and ``jax.vmap`` (a
    user's own attack): the input gradient is the chain rule through the normalisation, and a
    hand-written PGD through it never breaks a certified example and does break others."""
    workdir, _ = full_run
    clf = load_classifier(workdir)
    ds = data_lib.load("digits", "test[:120]")
    x = jnp.asarray(data_lib.as_pixels(ds.images))
    y = jnp.asarray(ds.labels, jnp.int32)

    def loss(z):
        return -jnp.take_along_axis(jax.nn.log_softmax(clf(z)), y[:, None], 1).sum()

    g = jax.jit(jax.grad(loss))(x)
    inner = lambda u: -jnp.take_along_axis(jax.nn.log_softmax(clf.logits_fn(u)), y[:, None],
                                           1).sum()
    want = jax.grad(inner)(clf.normalize(x)) / clf.std
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda z: clf(z[None])[0])(x), clf(x), rtol=1e-6,
                               atol=1e-6)
    eps = 0.1
    cert = np.asarray(clf.certify(x, y, eps))
    z, grad_loss = x, jax.jit(jax.grad(loss))
    for _ in range(30):  # PGD, sign steps of eps/4, projected on the eps-ball and [0, 1]
        z = jnp.clip(z + eps / 4 * jnp.sign(grad_loss(z)), x - eps,
                     x + eps).clip(0.0, 1.0)
    fooled = np.asarray(clf(z).argmax(-1) != y)
    assert not np.any(cert & fooled)
    assert np.any(fooled & ~cert)
    hand, project = hand_pgd_agrees_with_project_pgd(clf, x, y, eps)
    assert hand.sum() >= 5 and (hand != project).sum() <= 1, (hand.sum(), project.sum())


def test_print_config_prints_the_resolved_config_and_exits(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--print_config",
           f"--workdir={tmp_path / 'never'}", "--config.train.lr=0.0125",
           "--config.model.width=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads(proc.stdout)
    assert config["train"]["lr"] == 0.0125 and config["model"]["width"] == 64
    assert config["kernels"] == "auto" and config["train"]["schedule"] == "v1"
    assert not (tmp_path / "never").exists()  # nothing trained, nothing written


def test_donated_train_step_reuses_the_state_buffers_and_computes_the_same():
    """The training loop donates the state: the step's output aliases the whole input state
    (compiled memory analysis), the donated input is consumed, and the new state is bit for bit
    the one of the step without donation, over a few steps of every p phase."""
    from conftest import StepSetup

    cfg = tiny_config(**{"train.epochs": (0, 1, 1, 2, 3)})
    plain, donated = StepSetup(cfg), StepSetup(cfg)
    donating = train_lib.make_train_step(cfg, donated.schedule, donated.meta, donate=True)
    images, labels = jnp.asarray(plain.ds.images), jnp.asarray(plain.ds.labels)
    idx = jnp.arange(64)
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(plain.state))
    analysis = donating.lower(donated.state, images, labels, idx, p_phase="start").compile() \
        .memory_analysis()
    assert analysis.alias_size_in_bytes >= state_bytes
    a, b = plain.state, donated.state
    for step, phase in enumerate(["start"] * 3 + ["ramp"] * 3 + ["inf"] * 3):
        a, _ = plain.step(a, images, labels, idx, phase)
        before = b
        b, _ = donating(b, images, labels, idx, phase)
        assert jax.tree.leaves(before.params)[0].is_deleted(), step
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_all_checkpoints_certifies_every_kept_step_as_certifying_it_alone(tmp_path):
    """A tiny run keeps every epoch's checkpoint (train.keep_every_epochs=1); ``certify.py
    --all_checkpoints`` writes one row per (kept step, weights), each with the figures of
    certifying that step alone, and the plot of the run's course."""
    workdir = str(tmp_path / "run")
    cfg = tiny_config(**{"train.checkpoint_every_epochs": 1, "train.keep_every_epochs": 2,
                         "train.keep_checkpoints": 1})
    trainer.train_and_evaluate(cfg, workdir, progress=False, evaluate_at_end=False)
    steps = ckpt.checkpoint_steps(workdir)
    assert steps == [20, 40, 60]  # 640 examples / 64: 10 steps an epoch; every 2nd epoch kept
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    cmd = [sys.executable, os.path.join(REPO, "certify.py"), f"--workdir={workdir}",
           "--all_checkpoints", "--eps=0.02,0.1", "--pgd_steps=0", "--limit=120",
           f"--output={out}", f"--plot={png}", "--progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["step"], r["weights"]) for r in report["rows"]] == [
        (s, w) for s in steps for w in ("ema", "raw")]
    assert report["p_phases"] == {"ramp_epoch": 2.0, "inf_epoch": 4.0}
    ds = data_lib.load("digits", "test")
    x, y = data_lib.as_pixels(ds.images[:120]), ds.labels[:120]
    for row in (report["rows"][i] for i in (0, 3, 4)):  # EMA and raw, early and late
        alone = load_classifier(workdir, weights=row["weights"], step=row["step"]).evaluate(
            x, y, eps=(0.02, 0.1), pgd_steps=0)
        assert row["epoch"] == row["step"] / 10
        assert row["clean_accuracy"] == alone["clean_accuracy"]
        assert [r["certified_accuracy"] for r in row["results"]] == [
            r["certified_accuracy"] for r in alone["results"]]
    ema, raw = ([r["clean_accuracy"] for r in report["rows"] if r["weights"] == w]
                for w in ("ema", "raw"))
    assert ema != raw  # two sets of weights, not one read twice
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
