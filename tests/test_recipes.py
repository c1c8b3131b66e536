"""The presets train: each loss family (hinge, κ-CE, v2) learns on the embedded digits with its
preset's schedule semantics, every preset in configs/ trains a step or two without NaN when
scaled down on the command line, and configs whose loss is undefined are refused in one line.

Scaled down: width, depth, epochs and data are overridden as a user would on the command line
(``--config.model.width=...``); everything else (schedule family, loss and its parameters, lr,
weight decay, crop padding and mode) is the preset's.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from test_presets import OFFICIAL, OWN, load

from linf_jax import checkpoint as ckpt
from linf_jax import config as config_lib
from linf_jax import data as data_lib
from linf_jax import experiment, train_lib, trainer
from linf_jax.models import build_model

INF = float("inf")


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _loss_fn(config, model, meta, x, y, eps_px, lam):
    """``variables ↦`` the training loss on one batch at p = ∞ and a fixed ε (train mode)."""
    xn = data_lib.normalize(data_lib.as_pixels(x), np.asarray(meta["mean"]), meta["std"])
    eps = eps_px / meta["std"]
    y = jnp.asarray(y)

    @jax.jit
    def loss(variables):
        (logits, margins), _ = model.apply(variables, xn, p=INF, train=True, eps=eps, labels=y,
                                           mutable=["batch_stats"])
        return experiment.make_loss_fn(config)(logits, margins, y, eps, lam,
                                          variables["params"]["logit_scale"])

    return lambda variables: float(loss(variables))


# (preset, scaled-down epochs with the preset's meaning, training examples, width, first-step
# ε ratio): the v1 pure net (ε constant from step 0; 600 examples make a partial last batch,
# 10 steps of 64, the last one 24), the v1 +MLP net (ε ramps from 0 over e2), the v2 recipe
# (ε constant, lr cosine from step 0, p = 8 until ps, then the p ramp with λ along it; width 64:
# at width 32 the clipped v2 margin term stalls on the digits).
FAMILIES = [
    ("mnist_03.py", (0, 2, 0, 2, 4), 600, 32, 1.0),
    ("mnist_03_mlp.py", (0, 2, 2, 2, 4), 640, 32, 0.0),
    ("mnist_01.py", (0, 0, 2, 4, 6), 640, 64, 1.0),
]


@pytest.mark.parametrize("preset, epochs, n, width, eps0", FAMILIES,
                         ids=[f[0].removesuffix(".py") for f in FAMILIES])
def test_loss_family_lowers_its_loss(preset, epochs, n, width, eps0, tmp_path):
    overrides = ["--config.data.source=digits", f"--config.data.train_split=train[:{n}]",
                 "--config.model.depth=3", f"--config.model.width={width}",
                 "--config.model.head_hidden=16", "--config.train.batch_size=64",
                 f"--config.train.epochs={epochs}", "--config.train.eps_train=0.1",
                 "--config.train.log_every=1"]
    config = load(preset, overrides)
    workdir = str(tmp_path / "run")
    result = trainer.train_and_evaluate(config, workdir, progress=False,
                                          evaluate_at_end=False)  # a NaN would raise
    t = config.train
    spe = -(-n // 64)
    assert int(result.state.step) == epochs[4] * spe
    m = _metrics(workdir)
    assert [r["step"] for r in m] == list(range(epochs[4] * spe))
    # the schedule the train step read, at its first and last steps
    assert m[0]["eps"] == pytest.approx(eps0 * 0.1, abs=1e-7)
    assert m[-1]["eps"] == pytest.approx(0.1, rel=1e-6)
    assert m[0]["p"] == 8.0 and m[-1]["p"] == INF
    assert m[0]["lr"] == pytest.approx(t.lr)
    if t.schedule == "v2":
        assert m[1]["lr"] < t.lr  # the cosine starts at step 0
        assert m[2 * spe - 1]["p"] == 8.0 and m[2 * spe + 1]["p"] > 8.0  # the ramp from ps
        assert m[0]["lam"] == pytest.approx(t.lam_start) and \
            m[-1]["lam"] == pytest.approx(t.lam_end, rel=1e-5)
    else:
        assert m[2 * spe - 1]["lr"] == pytest.approx(t.lr)  # constant until e1
        assert m[-1]["lam"] == 0.0
    # The loss at the final ε, p = ∞ and the final λ, on a fixed batch, before and after.
    ds = data_lib.load("digits", f"train[:{n}]")
    x, y = ds.images[:256], ds.labels[:256]
    model = build_model(config.model, 10)
    tx = experiment.make_optimizer(config, experiment.make_schedule(config, spe, ds.std))
    init = train_lib.create_train_state(config, model, ds.input_shape, tx)
    lam_end = t.lam_end if t.loss == "v2" else 0.0
    loss = _loss_fn(config, model, result.meta, x, y, 0.1, lam_end)
    before = loss(ckpt.variables_for(init, "raw"))
    after = loss(ckpt.variables_for(result.state, "raw"))
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.95 * before, (before, after)


# ----------------------------------------------------------------------------------------------
# Every preset, scaled down, through the command-line config path
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    """64 random 28×28×1 and 32×32×3 uint8 images with 10 classes: MNIST- and CIFAR-shaped. The
    64×64 data sets (Tiny ImageNet, ImageNet 64×64) are scaled down to the 32×32 images too: the
    2x model's first kernel follows the image size (size − stride), and its 60×60 patches cost
    about 10 s of CPU for a two-step run where 28×28 ones take 2 s."""
    tmp = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    paths = {}
    for name, shape in (("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))):
        path = str(tmp / f"{name}.npz")
        np.savez(path, x=rng.integers(0, 256, size=(64, *shape), dtype=np.uint8),
                 y=np.arange(64) % 10)
        paths[name] = path
    paths["fashion_mnist"] = paths["mnist"]
    paths["tinyimagenet"] = paths["imagenet64"] = paths["cifar10"]
    return paths


def scaled_down(name, npz_data):
    """Command-line overrides that make the preset ``name`` a 2-step run (batch 32 of 64 random
    images of its data set's shape), keeping its schedule family and ε semantics. Returns the
    overrides and whether ε ramps from 0 over the run."""
    c = load(name)
    kind = OFFICIAL[name][2]["data"] if name in OFFICIAL else "mnist"
    out = [f"--config.data.source=npz:{npz_data[kind]}",
           "--config.data.train_split=train", "--config.train.batch_size=32",
           "--config.train.log_every=1"]
    if c.model.name == "linf_lenet":
        out += ["--config.model.channels=(2,3)", "--config.model.dense=(8,16)",
                "--config.model.head_hidden=8"]
    else:  # depth 4: a SortNet + MLP keeps a sort layer with its masks
        out += [f"--config.model.depth={4 if 'head_hidden' in c.model else 3}",
                "--config.model.width=16"]
        if "head_hidden" in c.model:
            out.append("--config.model.head_hidden=8")
    if c.ensemble.size > 1:
        out.append("--config.ensemble.size=2")
    e = c.train.epochs
    ramp = e[2] > 0 if c.train.schedule == "v1" else e[1] > e[0]
    # one epoch in the p ramp (traced p from 8 towards 1000); v1 ++: ε from 0 over that epoch
    # (e2 = 1), v2 with an ε ramp (SortNet + MLP): es = 0 -> ee = 1
    if c.train.schedule == "v1":
        out.append("--config.train.epochs=(0,0,1,1,1)" if ramp else
                   "--config.train.epochs=(0,0,0,1,1)")
    else:
        out.append("--config.train.epochs=(0,1,0,1,1)" if ramp else
                   "--config.train.epochs=(0,0,0,1,1)")
    return out, ramp


# The SortNet presets that train here: one per model and loss (the others differ from these in
# numbers only, which test_presets pins); the pure net, the + MLP net with the smooth ε ramp and
# ce_hinge, and the convolutional 2x model on 64×64 images.
SORTNET_TRAINED = {"sortnet_mnist_01.py", "sortnet_cifar10_8_mlp.py",
                   "sortnet_tinyimagenet_1_mlp2x.py"}
TRAINED = sorted(n for n in set(OFFICIAL) | OWN
                 if OFFICIAL.get(n, ("",))[0] != "zbh2047/SortNet" or n in SORTNET_TRAINED)


@pytest.mark.parametrize("name", TRAINED)
def test_every_preset_trains_scaled_down(name, npz_data, tmp_path):
    overrides, ramp = scaled_down(name, npz_data)
    if name.endswith("mnist_local.py"):  # its data is the offline MNIST folder; the npz stands in
        overrides.append("--config.data.test_split=train")
    config = load(name, overrides)
    config_lib.validate_config(config)
    workdir = str(tmp_path / "run")
    result = trainer.train_and_evaluate(config, workdir, progress=False,
                                          evaluate_at_end=False)
    assert not result.preempted and int(result.state.step) == 2
    m = _metrics(workdir)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in m)
    eps = config.train.eps_train
    assert m[0]["eps"] == pytest.approx(0.0 if ramp else eps, abs=1e-7)
    if ramp and config.train.schedule == "v2":  # half-way through the ramp at the second step
        t, r0 = 0.5, config.train.eps_smooth
        want = 1 - 4 * (1 - t) / (4 - 3 * r0) if 0 < r0 <= t else t
        assert m[1]["eps"] == pytest.approx(eps * want, rel=1e-6)
    assert all(math.isfinite(float(v)) for v in jax.tree.leaves(
        jax.tree.map(lambda a: jnp.abs(a).max(), result.state.params)))


def test_train_cli_runs_the_v2_preset_scaled_down(npz_data, tmp_path):
    """``python train.py --config configs/cifar10_8_v2.py`` with width, epochs and data
    overridden: trains (ε_train = 0.09411 from step 0, no NaN) and certifies."""
    overrides, _ = scaled_down("cifar10_8_v2.py", npz_data)
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/cifar10_8_v2.py",
           f"--workdir={workdir}", *overrides, "--config.eval.pgd_steps=1",
           "--config.eval.batch_size=64", "--progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "certified" in proc.stdout
    m = _metrics(workdir)
    assert m[0]["eps"] == pytest.approx(0.09411, rel=1e-6) and m[0]["step"] == 0
    assert all(math.isfinite(r["loss"]) for r in m)


def test_train_cli_refuses_an_undefined_loss(tmp_path):
    """``train.py`` with the v2 preset and λ's end at 0: refused before anything is written,
    in one line with exit code 2 (the other cases below go through the same check)."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/mnist_01.py",
           f"--workdir={workdir}", "--config.train.lam_end=0.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in ("config.train.lam_end=0.0", "lam_start", "undefined"):
        assert w in lines[0], (w, lines[0])
    assert not workdir.exists()


@pytest.mark.parametrize("overrides, words", [
    (["--config.train.eps_train=0.0"], ["config.train.eps_train", "v2 loss", "0-1 error"]),
    # v1 reading: the ε ramp starts at e0 = T, so ε is 0 at every step
    (["--config.train.schedule=v1", "--config.train.epochs=(5,0,2,0,5)"],
     ["config.train.eps_train", "ε ramp"]),
    (["--config.train.lam_start=0.0"], ["config.train.lam_end", "undefined"]),
    (["--config.train.epochs=(0,0,30,20,40)"], ["config.train.epochs", "ps <= pe <= T"]),
    (["--config.train.schedule=v3"], ["config.train.schedule", "'v3'", "v1", "v2"]),
    (["--config.train.crop_mode=reflect"], ["config.train.crop_mode", "zeros", "edge"]),
    (["--config.train.crop_padding=-1"], ["config.train.crop_padding", "-1"]),
    (["--config.train.p_start=1.5"], ["config.train.p_start", "weight decay"]),
])
def test_undefined_or_bad_schedule_settings_are_refused(overrides, words):
    base = ["--config.train.weight_decay=5e-3"] if "p_start" in overrides[0] else []
    config = load("mnist_01.py", [*base, *overrides])
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate_config(config)
    line = str(err.value)
    assert "\n" not in line
    for w in words:
        assert w in line, (w, line)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb, strict=True))


def test_resume_is_bit_identical_with_a_partial_last_batch(tmp_path):
    """600 examples in batches of 64: 10 steps per epoch, the 10th of 24 examples. A run
    stopped inside the second epoch's partial-batch neighbourhood and resumed ends exactly as
    an uninterrupted one; a run folder made before ``model.head_hidden`` existed resumes."""
    overrides = ["--config.data.source=digits", "--config.data.train_split=train[:600]",
                 "--config.model.depth=3", "--config.model.width=16",
                 "--config.train.batch_size=64", "--config.train.epochs=(0,0,1,1,2)",
                 "--config.train.checkpoint_every_epochs=1"]
    config = load("mnist_01.py", overrides)
    full = trainer.train_and_evaluate(config, str(tmp_path / "full"), progress=False,
                                        evaluate_at_end=False)
    assert int(full.state.step) == 20
    work = str(tmp_path / "parts")
    part = trainer.train_and_evaluate(config, work, progress=False, evaluate_at_end=False,
                                        max_steps=9)  # stops before the first partial batch
    assert part.preempted and int(part.state.step) == 9
    part = trainer.train_and_evaluate(config, work, progress=False, evaluate_at_end=False,
                                        max_steps=10)  # through it, into the second epoch
    assert part.preempted and int(part.state.step) == 19
    # a config.json written before model.head_hidden existed
    path = os.path.join(work, "config.json")
    old = json.load(open(path))
    del old["model"]["head_hidden"]
    json.dump(old, open(path, "w"))
    ckpt.check_resume(config, work)
    done = trainer.train_and_evaluate(config, work, progress=False, evaluate_at_end=False)
    assert int(done.state.step) == 20
    for field in ("params", "opt_state", "ema_params", "batch_stats", "ema_batch_stats"):
        assert _leaves_equal(getattr(done.state, field), getattr(full.state, field)), field
    with pytest.raises(config_lib.ConfigError, match="head_hidden=512"):
        ckpt.check_resume(load("mnist_01.py", [*overrides, "--config.model.head_hidden=512"]),
                               str(tmp_path / "full"))
