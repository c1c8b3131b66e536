"""Every paper preset in configs/ pinned to the official script it mirrors, and its schedule
preview against the official formulas and against values of the official schedule functions
(docs/RECIPES.md describes both).

The values below were read from the official repositories' scripts and ``main.py`` (V1
``zbh2047/L_inf-dist-net``, EMA ``Theia-4869/EMA-and-Ensemble-Lip-Networks``, V2
``zbh2047/L_inf-dist-net-v2``, SortNet ``zbh2047/SortNet``); a change to a preset that departs
from its script fails here.
"""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from linf_jax import config as config_lib
from linf_jax import data as data_lib
from linf_jax import experiment, schedules
from linf_jax.dataset import known_tfds
from linf_jax.models import build_model

V1, EMA, V2, SORT = ("zbh2047/L_inf-dist-net", "Theia-4869/EMA-and-Ensemble-Lip-Networks",
                     "zbh2047/L_inf-dist-net-v2", "zbh2047/SortNet")

# Normalisation of the official dataset.py files: per-channel mean, ONE scalar std.
NORMALISATION = {"mnist": ((0.1307,), 0.3081), "fashion_mnist": ((0.2860,), 0.3520),
                 "cifar10": ((0.4914, 0.4822, 0.4465), 0.2009),
                 "cifar100": ((0.5071, 0.4867, 0.4408), 0.2667),
                 "tinyimagenet": ((0.4802, 0.4481, 0.3975), 0.2276),
                 "imagenet64": ((0.4815, 0.4578, 0.4082), 0.2128)}
TRAIN_SIZE = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "tinyimagenet": 100000,
              "imagenet64": 1281167}
# ceil(N / batch): 512, and 1024 for ImageNet 64×64 (the official two GPUs of 512 examples
# over ceil(N / 2) examples each give the same count)
STEPS_PER_EPOCH = {"mnist": 118, "fashion_mnist": 118, "cifar10": 98, "tinyimagenet": 196,
                   "imagenet64": 1252}
# data.source and the evaluation split of each data set; the others are tfds:<name> and 'test'
SOURCES = {"tinyimagenet": ("tinyimagenet:data/tinyimagenet.npz", "test"),
           "imagenet64": ("tfds:imagenet_resized/64x64", "validation")}

V1_COMMON = dict(schedule="v1", batch_size=512, drop_last=False, lr=0.02, logit_scale_lr=None,
                 weight_decay=5e-3, adam_eps=1e-10, p_start=8.0, p_end=1000.0, lam_start=0.0,
                 lam_end=0.0, augment=True, crop_mode="zeros", pgd_steps=20, ensemble=1)
V2_COMMON = dict(schedule="v2", batch_size=512, drop_last=False, lr=0.03, logit_scale_lr=0.006,
                 weight_decay=0.0, adam_eps=1e-10, p_start=8.0, p_end=1000.0, loss="v2",
                 augment=True, crop_mode="edge", pgd_steps=100, ensemble=1)
PURE = dict(name="linf_dist_net", head="none")

# preset -> (repository, script, official values)
OFFICIAL = {
    "mnist_03.py": (V1, "command/ell_inf_dist_net_mnist.sh", dict(
        V1_COMMON, data="mnist", model=dict(PURE, depth=5, width=5120),
        epochs=(0, 50, 0, 350, 400), eps_train=0.45, loss="hinge", mix=0.75, kappa=1.0,
        crop_padding=1, flip=False, eps_test=0.3)),
    "mnist_03_mlp.py": (V1, "command/ell_inf_dist_net++_mnist.sh", dict(
        V1_COMMON, data="mnist",
        model=dict(name="linf_dist_net_mlp", depth=4, width=5120, head="mlp", head_hidden=256),
        epochs=(0, 50, 50, 350, 400), eps_train=0.35, loss="kappa_ce", kappa=0.5,
        crop_padding=1, flip=False, eps_test=0.3)),
    "fashion_mnist_01.py": (V1, "command/ell_inf_dist_net_fashionmnist.sh", dict(
        V1_COMMON, data="fashion_mnist", model=dict(PURE, depth=5, width=5120),
        epochs=(0, 50, 0, 350, 400), eps_train=0.225, loss="hinge", mix=1.0, kappa=1.0,
        crop_padding=1, flip=False, eps_test=0.1)),
    "fashion_mnist_01_mlp.py": (V1, "command/ell_inf_dist_net++_fashionmnist.sh", dict(
        V1_COMMON, data="fashion_mnist",
        model=dict(name="linf_dist_net_mlp", depth=4, width=5120, head="mlp", head_hidden=512),
        epochs=(0, 50, 50, 350, 400), eps_train=0.11, loss="kappa_ce", kappa=0.5,
        crop_padding=1, flip=False, eps_test=0.1)),
    "cifar10_8.py": (V1, "command/ell_inf_dist_net_cifar10.sh", dict(
        V1_COMMON, data="cifar10", model=dict(PURE, depth=6, width=5120),
        epochs=(0, 100, 0, 750, 800), eps_train=0.1568, loss="hinge", mix=0.75, kappa=1.0,
        crop_padding=4, flip=True, eps_test=0.03137)),
    "cifar10_8_mlp.py": (V1, "command/ell_inf_dist_net++_cifar10.sh", dict(
        V1_COMMON, data="cifar10",
        model=dict(name="linf_dist_net_mlp", depth=5, width=5120, head="mlp", head_hidden=512),
        epochs=(0, 100, 100, 750, 800), eps_train=0.03451, loss="kappa_ce", kappa=1.0,
        crop_padding=4, flip=True, eps_test=0.03137)),
    "cifar10_8_lenet_ensemble.py": (EMA, "command/liplenet++_ensemble_cifar10.sh", dict(
        V1_COMMON, data="cifar10",
        model=dict(name="linf_lenet", channels=(6, 16), kernel_size=5, dense=(120, 1024),
                   head="mlp", head_hidden=512),
        epochs=(0, 100, 100, 750, 800), eps_train=0.03451, loss="kappa_ce", kappa=0.95,
        crop_padding=4, flip=True, eps_test=0.03137, ensemble=10, ensemble_mode="joint",
        ema_decay=0.99)),
    "mnist_01.py": (V2, "command/mnist_0.1.sh", dict(
        V2_COMMON, data="mnist", model=dict(PURE, depth=5, width=5120),
        epochs=(0, 0, 25, 400, 450), eps_train=0.3, lam_start=0.05, lam_end=0.0002,
        crop_padding=1, flip=False, eps_test=0.1)),
    "cifar10_8_v2.py": (V2, "command/cifar_0.03137.sh", dict(
        V2_COMMON, data="cifar10", model=dict(PURE, depth=6, width=5120),
        epochs=(0, 0, 100, 1250, 1300), eps_train=0.09411, lam_start=0.1, lam_end=0.0005,
        crop_padding=3, flip=True, eps_test=0.03137)),
    "cifar10_2_v2.py": (V2, "command/cifar_0.0078425.sh", dict(
        V2_COMMON, data="cifar10", model=dict(PURE, depth=6, width=5120),
        epochs=(0, 0, 100, 1250, 1300), eps_train=0.03922, lam_start=0.05, lam_end=0.002,
        crop_padding=3, flip=True, eps_test=0.0078425)),
}

# SortNet (zbh2047/SortNet, commands/*.sh): the v2 schedule, eps-smooth 0.4, AdamW wd 0.02 with
# no decay on the distance layers and decay on the scalar, one lr, PGD-100, edge crops.
SORT_COMMON = dict(schedule="v2", batch_size=512, drop_last=False, lr=0.02, logit_scale_lr=None,
                   weight_decay=0.02, dist_decay="none", decay_logit_scale=True, adam_eps=1e-10,
                   p_start=8.0, p_end=1000.0, eps_smooth=0.4, augment=True, crop_mode="edge",
                   pgd_steps=100, ensemble=1)
SORT_MLP = dict(SORT_COMMON, loss="ce_hinge", lam_start=1.0, lam_end=0.01)


def _sort(q, depth=6, identity=False):
    return dict(name="sort_net", depth=depth, width=5120, q=q, identity_init=identity)


def _sort_mlp(q, hidden, conv=False):
    m = dict(name="sort_net_mlp", depth=7, width=5120, head_hidden=hidden, q=q,
             identity_init=False)
    return dict(m, name="sort_net_conv_mlp", stride=4) if conv else m


OFFICIAL.update({
    "sortnet_mnist_01.py": (SORT, "commands/mnist0.1.sh", dict(
        SORT_COMMON, data="mnist", model=_sort(0.7, depth=5, identity=True),
        epochs=(0, 0, 100, 1450, 1500), eps_train=0.3, loss="v2", lam_start=0.1,
        lam_end=0.001, crop_padding=1, flip=False, eps_test=0.1)),
    "sortnet_mnist_03.py": (SORT, "commands/mnist0.3.sh", dict(
        SORT_COMMON, data="mnist", model=_sort(0.75, depth=5, identity=True),
        epochs=(0, 0, 100, 1450, 1500), eps_train=0.45, loss="v2", lam_start=0.02,
        lam_end=0.0002, crop_padding=1, flip=False, eps_test=0.3)),
    "sortnet_cifar10_2.py": (SORT, "commands/cifar2_255.sh", dict(
        SORT_COMMON, data="cifar10", model=_sort(0.75), epochs=(0, 0, 200, 2950, 3000),
        eps_train=0.03137, loss="v2", lam_start=1.0, lam_end=0.01, crop_padding=3, flip=True,
        eps_test=0.007843)),
    "sortnet_cifar10_8.py": (SORT, "commands/cifar8_255.sh", dict(
        SORT_COMMON, data="cifar10", model=_sort(0.85), epochs=(0, 0, 200, 2950, 3000),
        eps_train=0.09411, loss="v2", lam_start=0.2, lam_end=0.002, crop_padding=3, flip=True,
        eps_test=0.03137)),
    "sortnet_cifar10_2_mlp.py": (SORT, "commands/cifar2_255_mlp.sh", dict(
        SORT_MLP, data="cifar10", model=_sort_mlp(0.7, 512), epochs=(0, 500, 200, 2950, 3000),
        eps_train=0.008627, crop_padding=3, flip=True, eps_test=0.007843)),
    "sortnet_cifar10_8_mlp.py": (SORT, "commands/cifar8_255_mlp.sh", dict(
        SORT_MLP, data="cifar10", model=_sort_mlp(0.6, 512), epochs=(0, 500, 200, 2950, 3000),
        eps_train=0.03451, crop_padding=3, flip=True, eps_test=0.03137)),
    "sortnet_tinyimagenet_1_mlp.py": (SORT, "commands/tinyimagenet1_255_mlp.sh", dict(
        SORT_MLP, data="tinyimagenet", model=_sort_mlp(0.7, 512),
        epochs=(0, 500, 100, 980, 1000), eps_train=0.00431, crop_padding=5, flip=True,
        eps_test=0.00392)),
    "sortnet_tinyimagenet_1_mlp2x.py": (SORT, "commands/tinyimagenet1_255_mlp2x.sh", dict(
        SORT_MLP, data="tinyimagenet", model=_sort_mlp(0.7, 512, conv=True),
        epochs=(0, 500, 100, 980, 1000), eps_train=0.00431, crop_padding=5, flip=True,
        eps_test=0.00392)),
    "sortnet_imagenet64_1_mlp.py": (SORT, "commands/imagenet1_255_mlp.sh", dict(
        SORT_MLP, data="imagenet64", model=_sort_mlp(0.7, 2048), batch_size=1024, lr=0.01,
        epochs=(0, 200, 30, 290, 300), eps_train=0.00431, crop_padding=4, flip=True,
        eps_test=0.00392)),
    "sortnet_imagenet64_1_mlp2x.py": (SORT, "commands/imagenet1_255_mlp2x.sh", dict(
        SORT_MLP, data="imagenet64", model=_sort_mlp(0.7, 2048, conv=True), batch_size=1024,
        lr=0.01, epochs=(0, 200, 50, 290, 300), eps_train=0.00431, crop_padding=4, flip=True,
        eps_test=0.00392)),
})
# Not paper presets: the quick digits default, the offline MNIST protocol of RESULTS.md and its
# SortNet counterpart.
OWN = {"default.py", "mnist_local.py", "sortnet_mnist_local.py"}
# The fields of the decay policy and the smooth ε ramp that the scripts before SortNet leave at
# base_config's values.
POLICY_DEFAULTS = dict(dist_decay="lp", decay_logit_scale=False, eps_smooth=0.0)


def source_facts(data):
    """``(data.source, test split, mean, std, augmentation kind)`` of a preset's data set."""
    source, test = SOURCES.get(data, (f"tfds:{data}", "test"))
    kind, _, name = source.partition(":")
    if kind in data_lib.NAMED_SOURCES:
        spec = data_lib.NAMED_SOURCES[kind]
        return source, test, spec.mean, spec.std, spec.augment
    mean, std, aug = known_tfds(name)
    return source, test, mean, std, aug


def load(name, overrides=()):
    """The preset as train.py loads it (ml_collections config_flags with --config.* overrides)."""
    from absl import flags
    from ml_collections import config_flags

    path = os.path.join(REPO, "configs", name)
    argv = ["train.py", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", path, flag_values=fv, lock_config=True,
                                             sys_argv=argv)
    fv(argv)
    return holder.value


def test_every_preset_is_pinned():
    found = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
    found.discard("__init__.py")  # the package marker (installed as linf_jax.configs)
    assert found == set(OFFICIAL) | OWN, "a new preset needs its row in OFFICIAL"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_equals_official_script(name):
    repo, script, o = OFFICIAL[name]
    c = load(name)
    doc = open(os.path.join(REPO, "configs", name)).read().split('"""')[1]
    assert repo in doc and script in doc, "the docstring names the repository and the script"
    assert "Deliberate differences" in doc and "Published" in doc
    config_lib.validate_config(c)
    t = c.train
    source, test_split, mean, std, kind = source_facts(o["data"])
    assert (c.data.source, c.data.train_split, c.data.test_split) == (source, "train",
                                                                      test_split)
    model = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.model.items()}
    if repo == SORT:  # a model section of its own, no field but the script's
        assert set(model) == set(o["model"]), sorted(set(model) ^ set(o["model"]))
    for key, value in o["model"].items():
        assert model[key] == value, (key, model[key])
    for key in ("schedule", "batch_size", "drop_last", "lr", "logit_scale_lr", "weight_decay",
                "adam_eps", "p_start", "p_end", "eps_train", "loss", "augment",
                "crop_padding", "crop_mode", "flip"):
        assert t[key] == o[key], (key, t[key], o[key])
    for key, default in POLICY_DEFAULTS.items():
        assert t[key] == o.get(key, default), (key, t[key])
    assert tuple(t.epochs) == o["epochs"]
    if o["loss"] in config_lib.LAMBDA_LOSSES:
        assert (t.lam_start, t.lam_end) == (o["lam_start"], o["lam_end"])
    else:
        assert t.kappa == o["kappa"]
        if o["loss"] == "hinge":
            assert t.mix == o["mix"]
    assert c.ensemble.size == o["ensemble"]
    if o["ensemble"] > 1:
        assert c.ensemble.mode == o["ensemble_mode"]
    assert t.ema_decay == o.get("ema_decay", 0.99)
    assert o["eps_test"] in tuple(c.eval.eps) and c.eval.pgd_steps == o["pgd_steps"]
    # Normalisation and steps per epoch as the official loaders give them.
    assert (mean, std) == NORMALISATION[o["data"]]
    assert experiment.steps_per_epoch(TRAIN_SIZE[o["data"]], t.batch_size, t.drop_last) == \
        STEPS_PER_EPOCH[o["data"]]
    # The augmentation the train step runs.
    assert experiment.augmentation(c, {"augment": kind}) == (o["crop_padding"], o["crop_mode"],
                                                             o["flip"])
    # The model builds with the head width of the script.
    m = build_model(c.model, 10)
    if "head_hidden" in o["model"]:
        assert m.head_hidden == o["model"]["head_hidden"]


@pytest.mark.parametrize("name", sorted(set(OFFICIAL) | OWN))
def test_every_preset_model_section_builds(name):
    """Each preset's model section holds only fields of its model (build_model rejects any
    other), the paper presets and the own ones alike."""
    c = load(name)
    m = build_model(c.model, 10)
    assert {k for k in c.model if k != "name"} <= set(m.__dataclass_fields__)


# ----------------------------------------------------------------------------------------------
# The schedules: an independent float64 transcription of the official create_schedule functions
# ----------------------------------------------------------------------------------------------


def reference(family, epochs, ef, lr0, eps_px, lam0, lam_end, p_start=8.0, p_end=1000.0,
              smooth=0.0):
    """(p, eps_px, lr, lam) at the position ``ef`` (epochs) of the official code (``smooth``:
    SortNet's --eps-smooth, its create_schedule's 'smooth' ε)."""
    clip = lambda x: min(max(x, 0.0), 1.0)  # noqa: E731
    if family == "v1":
        e0, e1, e2, e3, total = epochs
        lr = 0.5 * lr0 * (1 + math.cos(math.pi * max((ef - e1) / (total - e1), 0.0)))
        r = clip((ef - e1) / (e3 - e1))
        p = math.inf if r >= 1 else p_start * (p_end / p_start) ** r
        eps = eps_px * (clip((ef - e0) / e2) if e2 > 0 else 1.0)
    else:
        es, ee, ps, pe, total = epochs
        ratio = lambda s, e: 1.0 if e <= s else clip((ef - s) / (e - s))  # noqa: E731
        lr = 0.5 * lr0 * (1 + math.cos(math.pi * ratio(0, total)))
        r = ratio(ps, pe)
        p = math.inf if (r >= 1 and p_end >= 100) else p_start * (p_end / p_start) ** r
        t = ratio(es, ee)
        if smooth > 0:  # SortNet main.py, create_schedule(..., 'smooth'), as written there
            k = 1 / ((4 - 3 * smooth) * smooth ** 3)
            t = k * t ** 4 if t < smooth else (1 - k * smooth ** 4) / (1 - smooth) * (t - 1) + 1
        eps = eps_px * t
    lam = lam0 * (lam_end / lam0) ** r if lam0 > 0 else 0.0
    return p, eps, lr, lam


def preset_preview(name, steps):
    c = load(name)
    o = OFFICIAL[name][2]
    std = NORMALISATION[o["data"]][1]
    s = experiment.make_schedule(c, STEPS_PER_EPOCH[o["data"]], std)
    return c, s, schedules.preview(s, steps, std, experiment.logit_scale_lr(c))


def close(got, want, rel):
    if math.isinf(want) or want == 0:
        return got == want if math.isinf(want) else abs(got) < 1e-9
    return abs(got - want) <= rel * abs(want)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preview_follows_the_official_formulas(name):
    """At every epoch boundary, the steps on either side, the middle of each phase and 300
    evenly spaced steps: p, ε (pixels and normalised), lr (and the logit scale's), λ."""
    o = OFFICIAL[name][2]
    b = STEPS_PER_EPOCH[o["data"]]
    total = o["epochs"][4] * b
    points = {0, total, total - 1}
    for e in o["epochs"]:
        points |= {e * b - 1, e * b, e * b + 1, e * b + b // 2}
    points |= set(np.linspace(0, total, 300).round().astype(int).tolist())
    smooth = o.get("eps_smooth", 0.0)
    if smooth:  # the steps around the knee of the smooth ε ramp
        es, ee = o["epochs"][:2]
        knee = round((es + smooth * (ee - es)) * b)
        points |= {knee - 1, knee, knee + 1}
    steps = sorted(s for s in points if 0 <= s <= total)
    c, s, got = preset_preview(name, steps)
    assert got["eps_smooth"] == smooth
    std = NORMALISATION[o["data"]][1]
    lam0, lam_end = ((o["lam_start"], o["lam_end"]) if o["loss"] in config_lib.LAMBDA_LOSSES
                     else (0.0, 0.0))
    for i, step in enumerate(steps):
        p, eps, lr, lam = reference(o["schedule"], o["epochs"], step / b, o["lr"],
                                    o["eps_train"], lam0, lam_end, smooth=smooth)
        gp = math.inf if got["p"][i] == "inf" else got["p"][i]
        where = f"{name} step {step} (epoch {step / b:.4f})"
        assert close(gp, p, 2e-6), (where, "p", gp, p)
        assert close(got["eps_train"][i], eps, 1e-6), (where, "eps", got["eps_train"][i], eps)
        assert close(got["eps_train_normalized"][i], eps / std, 1e-6), where
        # lr: float32 rounding of the position (≤ 1e-7 of the run) moves lr by up to
        # lr0 · π · 1e-7 in absolute terms near the middle of the cosine.
        assert abs(got["lr"][i] - lr) <= 2e-6 * abs(lr) + 1e-8 * o["lr"], (where, "lr")
        scale0 = o["logit_scale_lr"] if o["logit_scale_lr"] is not None else o["lr"]
        assert abs(got["logit_scale_lr"][i] - lr * scale0 / o["lr"]) <= \
            2e-6 * abs(lr) + 1e-8 * scale0, (where, "scale lr")
        assert close(got["lam"][i], lam, 2e-6), (where, "lam", got["lam"][i], lam)
        # The host-side phase of the compiled step agrees with p.
        want_phase = "inf" if math.isinf(p) else ("start" if p == 8.0 and step <
                                                  s.step_of("e1" if o["schedule"] == "v1" else "ps")
                                                  else "ramp")
        assert got["phase"][i] == want_phase, (where, got["phase"][i], want_phase)


# Values of the official create_schedule functions (V1 and V2 main.py, run with these scripts'
# arguments) at selected epochs, to six significant digits:
# (epoch, p, eps normalised, eps pixels, lr, lam or None).
TABLES = {
    "mnist_03.py": [  # command/ell_inf_dist_net_mnist.sh, B = 118
        (0, 8, 1.46056, 0.45, 0.02, None), (50, 8, 1.46056, 0.45, 0.02, None),
        (100, 17.8885, 1.46056, 0.45, 0.0190097, None),
        (200, 89.4427, 1.46056, 0.45, 0.0122252, None),
        (349 + 117 / 118, 999.864, 1.46056, 0.45, 0.000990641, None),
        (350, math.inf, 1.46056, 0.45, 0.000990311, None),
        (400, math.inf, 1.46056, 0.45, 0.0, None)],
    "cifar10_8.py": [  # command/ell_inf_dist_net_cifar10.sh, B = 98
        (0, 8, 0.780488, 0.1568, 0.02, None), (50, 8, 0.780488, 0.1568, 0.02, None),
        (100, 8, 0.780488, 0.1568, 0.02, None),
        (200, 16.8148, 0.780488, 0.1568, 0.0190097, None),
        (350, 51.2382, 0.780488, 0.1568, 0.0143388, None),
        (400, 74.2839, 0.780488, 0.1568, 0.0122252, None),
        (425, 89.4427, 0.780488, 0.1568, 0.0111196, None),
        (749 + 97 / 98, 999.924, 0.780488, 0.1568, 0.000250823, None),
        (750, math.inf, 0.780488, 0.1568, 0.000250721, None),
        (800, math.inf, 0.780488, 0.1568, 0.0, None)],
    "cifar10_8_v2.py": [  # command/cifar_0.03137.sh, B = 98
        (0, 8, 0.468442, 0.09411, 0.03, 0.1), (50, 8, 0.468442, 0.09411, 0.0298906, 0.1),
        (100, 8, 0.468442, 0.09411, 0.0295641, 0.1),
        (200, 12.1739, 0.468442, 0.09411, 0.0282818, 0.0630827),
        (350, 22.8528, 0.468442, 0.09411, 0.0249468, 0.0316065),
        (400, 28.191, 0.468442, 0.09411, 0.023521, 0.0251033),
        (675, 89.4427, 0.468442, 0.09411, 0.0140943, 0.00707107),
        (1249 + 97 / 98, 999.957, 0.468442, 0.09411, 0.000109411, 0.000500024),
        (1250, math.inf, 0.468442, 0.09411, 0.000109367, 0.0005),
        (1300, math.inf, 0.468442, 0.09411, 0.0, 0.0005)],
    "mnist_01.py": [  # command/mnist_0.1.sh, B = 118
        (0, 8, 0.97371, 0.3, 0.03, 0.05), (25, 8, 0.97371, 0.3, 0.0297721, 0.05),
        (50, 11.0378, 0.97371, 0.3, 0.0290954, 0.0346025),
        (100, 21.0122, 0.97371, 0.3, 0.0264907, 0.0165723),
        (200, 76.1462, 0.97371, 0.3, 0.0176047, 0.00380129),
        (212, 88.8688, 0.97371, 0.3, 0.0163595, 0.00318564),
        (350, 525.306, 0.97371, 0.3, 0.00350933, 0.000417595),
        (399 + 117 / 118, 999.891, 0.97371, 0.3, 0.000904914, 0.000200025),
        (400, math.inf, 0.97371, 0.3, 0.000904611, 0.0002),
        (450, math.inf, 0.97371, 0.3, 0.0, 0.0002)],
}
# Six significant digits, and float32: relative 5e-6 (rounding of the table) + 2e-6 (float32).
TABLE_REL = 7e-6


@pytest.mark.parametrize("name", sorted(TABLES))
def test_preview_matches_the_published_tables(name):
    rows = TABLES[name]
    b = STEPS_PER_EPOCH[OFFICIAL[name][2]["data"]]
    steps = [round(e * b) for e, *_ in rows]
    _, _, got = preset_preview(name, steps)
    for i, (epoch, p, eps_n, eps_px, lr, lam) in enumerate(rows):
        gp = math.inf if got["p"][i] == "inf" else got["p"][i]
        assert close(gp, p, TABLE_REL), (epoch, gp, p)
        assert close(got["eps_train_normalized"][i], eps_n, TABLE_REL), epoch
        assert close(got["eps_train"][i], eps_px, TABLE_REL), epoch
        assert close(got["lr"][i], lr, TABLE_REL), (epoch, got["lr"][i], lr)
        if lam is None:
            assert got["lam"][i] == 0.0
        else:
            assert close(got["lam"][i], lam, TABLE_REL), (epoch, got["lam"][i], lam)
            # v2: the scalar's lr is 0.2 × the lr at every step
            assert close(got["logit_scale_lr"][i], 0.2 * lr, TABLE_REL), epoch


def test_plus_plus_eps_ramp_is_a_duration_from_e0():
    """v1 ++ (e2 > 0): ε starts at 0 and ramps linearly, 0.175 px at epoch 25 of
    ell_inf_dist_net++_mnist.sh (0.567997 normalised), 0.35 px from epoch 50 on."""
    _, _, got = preset_preview("mnist_03_mlp.py", [0, 25 * 118, 50 * 118, 51 * 118])
    assert got["eps_train"][0] == 0.0
    assert close(got["eps_train"][1], 0.175, 1e-6)
    assert close(got["eps_train_normalized"][1], 0.567997, TABLE_REL)
    assert close(got["eps_train"][2], 0.35, 1e-6) and close(got["eps_train"][3], 0.35, 1e-6)


# ----------------------------------------------------------------------------------------------
# The preview's command line
# ----------------------------------------------------------------------------------------------


def _preview_cli(*args):
    cmd = [sys.executable, "-m", "linf_jax.cli.schedule", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_preview_cli_writes_the_table_json_and_plot(tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rows = TABLES["cifar10_8_v2.py"]
    proc = _preview_cli("--config", "configs/cifar10_8_v2.py", "--epochs",
                        "0,50,675,1249+97/98,1250,1300", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert "schedule v2" in proc.stdout and "98 steps per epoch" in proc.stdout
    got = json.loads(out.read_text())
    assert set(got) >= {"epochs", "p", "eps_train", "lr", "lam"}
    assert got["steps"] == [0, 4900, 66150, 122499, 122500, 127400]
    assert got["p"][-2:] == ["inf", "inf"] and got["p"][0] == 8.0
    want = [rows[i] for i in (0, 1, 6, 7, 8, 9)]
    for i, (_, p, _, eps_px, lr, lam) in enumerate(want):
        if not math.isinf(p):
            assert close(got["p"][i], p, TABLE_REL)
        assert close(got["eps_train"][i], eps_px, TABLE_REL)
        assert close(got["lr"][i], lr, TABLE_REL) and close(got["lam"][i], lam, TABLE_REL)
    assert got["schedule"] == "v2" and got["steps_per_epoch"] == 98
    assert png.stat().st_size > 1000


def test_preview_cli_shows_the_smooth_eps_ramp(tmp_path):
    """A SortNet + MLP preset on Tiny ImageNet (its data file need not exist: the training-set
    size is known): the header names r0, ε follows the smooth ramp (1/7 of ε_train at 40% of
    it, epoch 200 of 0 → 500) and the JSON carries eps_smooth."""
    out = tmp_path / "s.json"
    proc = _preview_cli("--config", "configs/sortnet_tinyimagenet_1_mlp.py", "--epochs",
                        "0,100,200,500,1000", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "196 steps per epoch" in proc.stdout and "smooth eps ramp r0 0.4" in proc.stdout
    got = json.loads(out.read_text())
    assert got["eps_smooth"] == 0.4 and got["loss"] == "ce_hinge"
    k = 1 / (2.8 * 0.4 ** 3)
    want = [0.0, k * 0.2 ** 4, 1 / 7, 1.0, 1.0]
    for g, w in zip(got["eps_train"], want, strict=True):
        assert close(g, 0.00431 * w, 1e-6), (g, w)
    assert close(got["lam"][0], 1.0, 1e-6) and close(got["lam"][-1], 0.01, 1e-5)


@pytest.mark.parametrize("args, words", [
    (["--config", "configs/mnist_01.py", "--epochs", "0,500"],
     ["--epochs", "500", "[0, 450]"]),
    (["--config", "configs/mnist_01.py", "--config.train.schedule=v3"],
     ["config.train.schedule", "v3", "v1", "v2"]),
    (["--config", "configs/mnist_01.py", "--config.train.lam_end=0.0"],
     ["config.train.lam_end", "0.0", "geometric"]),
])
def test_preview_cli_bad_input_is_one_line(args, words):
    proc = _preview_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
