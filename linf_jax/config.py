"""The configuration: its schema, its validation, and the errors a user can meet.

``configs/*.py`` start from :func:`base_config` and change what their experiment needs, so
every experiment has the same fields and any of them can be overridden on the command line
(``--config.model.width=1024``). :func:`validate_config` checks every field but the model's
once per run, at the boundary (the train command, or ``trainer.train_and_evaluate`` when called
from Python), and raises :class:`ConfigError` with one line naming the field, the bad value and
what is allowed; the code behind it assumes valid fields. The model section is checked where
the model is built (:func:`linf_jax.experiment.build_model`: an unknown field is an error).
"""

from __future__ import annotations

import math
import os

from linf_jax.errors import (  # noqa: F401 - the errors a config check raises
    CheckpointError,
    ConfigError,
    TrainingError,
    first_line,
)

# This module imports neither JAX nor Flax: the train command validates a config before anything
# heavy is imported, so a mistake in a field is reported at once (the model section is checked
# by building the model, with Flax, afterwards).
# The allowed values of the fields that the modules behind them also check live here, with the
# schema, and those modules import them from here.

#: config.kernels (linf_jax.ops.use_kernels).
KERNEL_CHOICES = ("native", "xla", "pallas", "auto")
#: config.train.schedule: how train.epochs is read (linf_jax.schedules).
FAMILIES = ("v1", "v2")
#: The five numbers of train.epochs, named per family, and what they mean (linf_jax.schedules
#: reads them by these names; docs/METHOD.md §5 gives the formulas).
EPOCH_NAMES = {"v1": ("e0", "e1", "e2", "e3", "T"), "v2": ("es", "ee", "ps", "pe", "T")}
EPOCHS_MEANING = {
    "v1": "lr constant to e1 then cosine to 0 at T; p ramp e1 -> e3, inf from e3; eps ramp of "
          "length e2 from e0 (constant when e2 = 0)",
    "v2": "lr cosine over [0, T]; p ramp ps -> pe, inf from pe (if p_end >= 100); eps ramp "
          "es -> ee (constant when ee <= es); lambda with p",
}
#: config.train.crop_mode (linf_jax.data.crop_flip).
CROP_MODES = ("zeros", "edge")
#: config.ensemble.execution (linf_jax.ensemble.resolve_execution).
EXECUTIONS = ("auto", "batched", "sequential")
#: Which weights of a run are evaluated, certified or exported: the EMA or the raw parameters.
WEIGHTS = ("ema", "raw")


def epochs_named(family: str, epochs) -> dict[str, int]:
    """``{'e0': 0, 'e1': 40, ...}``: the train.epochs tuple of ``family`` by name."""
    return dict(zip(EPOCH_NAMES[family], (int(e) for e in epochs), strict=True))


def epochs_text(family: str) -> str:
    """``'(e0, e1, e2, e3, T)'``: how ``family`` reads train.epochs."""
    return f"({', '.join(EPOCH_NAMES[family])})"


def check_weights(weights) -> None:
    """Raises :class:`ConfigError` (one line) unless ``weights`` is one of :data:`WEIGHTS`."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} is not allowed: one of {WEIGHTS}")


def base_config():
    """The default experiment (configs/default.py): a small net on the 8×8 digits, as an
    ``ml_collections.ConfigDict`` (imported here: the library itself reads any config object
    with these fields and runs without ml-collections)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.seed = 0
    # Which kernels the distance layers run (linf_jax.ops.resolve): 'auto' (LINF_JAX_KERNELS when
    # set, else the native CPU kernels for the passes measured faster on this machine and the
    # XLA code elsewhere), 'native', 'xla' or 'pallas'. Resolved once at the start of a run and
    # recorded in its meta.json.
    c.kernels = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    c.model.name = "linf_dist_net"
    c.model.depth = 4
    c.model.width = 512
    c.model.head = "none"
    c.model.head_hidden = 256  # hidden width of the MLP head (head='mlp')

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    # The recipe family that reads train.epochs (docs/RECIPES.md, linf_jax/schedules.py):
    # 'v1' (e0, e1, e2, e3, T) of the ICML 2021 code and the EMA paper, 'v2' (es, ee, ps, pe, T)
    # of the ICLR 2022 code.
    c.train.schedule = "v1"
    c.train.epochs = (0, 40, 40, 160, 180)  # v1: (e0, e1, e2, e3, T)
    # False: an epoch is ceil(N / batch_size) steps, the last one a partial batch (PyTorch's
    # DataLoader default, which every official script uses); True: floor(N / batch_size).
    c.train.drop_last = False
    c.train.lr = 0.02
    # Base lr of the v2 loss's logit scale s on the same schedule (None: train.lr).
    c.train.logit_scale_lr = ml_collections.config_dict.placeholder(float)
    # Decoupled, scaled by the current lr, on every parameter but the logit scale: the l_p form
    # (current p) on l_inf-dist weights, plain on biases and head weights (linf_jax/optim.py).
    c.train.weight_decay = 5e-3
    # What the decay does to the distance layers: 'lp' (above: the l_p form on their weights,
    # plain on their biases) or 'none' (SortNet's AdamW: no decay on any parameter of a
    # distance layer; the head's weights and biases keep the plain decay).
    c.train.dist_decay = "lp"
    # True: the logit scale gets the plain decay too (SortNet's AdamW decays its scalar).
    c.train.decay_logit_scale = False
    c.train.adam_eps = 1e-10  # Adam(β = (0.9, 0.99), eps = 1e-10), as the official code
    c.train.eps_train = 0.15  # pixels; the certified target is 0.1
    # r0 of SortNet's smooth ε ramp (linf_jax/schedules.py): the ramp's ratio t becomes
    # t^4 / ((4 - 3 r0) r0^3) below r0 and a line to 1 above; 0: the linear ramp. Either
    # schedule family; no effect when ε is constant from step 0.
    c.train.eps_smooth = 0.0
    c.train.loss = "hinge"
    c.train.mix = 0.75
    # κ · loss(worst-case margins) + (1 − κ) · loss(clean margins), for hinge and kappa_ce;
    # 1: the worst-case margins only (every official hinge script).
    c.train.kappa = 1.0
    # v2 and ce_hinge losses: λ, geometric lam_start -> lam_end along the p ramp
    c.train.lam_start = 0.0
    c.train.lam_end = 0.0
    c.train.p_start = 8.0
    c.train.p_end = 1000.0
    c.train.ema_decay = 0.99
    c.train.augment = False  # 8×8 digits are too small to crop
    # Random crop after padding by crop_padding pixels (None: the data set's, 1 for MNIST-like,
    # 4 for CIFAR-like, 0 otherwise) with crop_mode 'zeros' (black, v1) or 'edge' (v2), then a
    # horizontal flip when flip (None: the data set's, CIFAR-like only).
    c.train.crop_padding = ml_collections.config_dict.placeholder(int)
    c.train.crop_mode = "zeros"
    c.train.flip = ml_collections.config_dict.placeholder(bool)
    c.train.log_every = 10
    c.train.checkpoint_every_epochs = 10
    c.train.keep_checkpoints = 2  # the newest checkpoints kept
    # Also keep, for good, the checkpoint of every k-th epoch (0: none), so that a run can be
    # studied afterwards (certify.py --all_checkpoints).
    c.train.keep_every_epochs = 0
    # GPU only: XLA's deterministic ops (scatter-adds in a fixed order), so that a resumed run is
    # bit-identical to an uninterrupted one there too, at some cost in speed. The CPU and TPU
    # backends are deterministic already. Needs XLA_FLAGS before JAX starts its backend:
    # train.py sets it; in a notebook, see linf_jax.config.request_determinism.
    c.train.deterministic = False

    c.eval = ml_collections.ConfigDict()
    c.eval.eps = (0.1,)  # pixels
    c.eval.pgd_steps = 100
    c.eval.pgd_restarts = 1
    c.eval.batch_size = 360

    c.ensemble = ml_collections.ConfigDict()
    c.ensemble.size = 1
    c.ensemble.mode = "joint"
    c.ensemble.shard = False
    # How one program runs the member axis: auto (one member after the other on the CPU, where
    # that is faster, batched by vmap on accelerators), batched, or sequential; see
    # linf_jax.ensemble.resolve_execution. Results agree up to float rounding.
    c.ensemble.execution = "auto"

    c.parallel = ml_collections.ConfigDict()
    c.parallel.num_devices = 0  # 0: every device (data parallel; members too with ensemble.shard)
    return c


def presets_dir() -> str | None:
    """The presets' folder: ``linf_jax/configs`` of an installed package, or ``configs/`` beside
    the package in a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))  # linf_jax/
    for d in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        if os.path.isfile(os.path.join(d, "default.py")):
            return d
    return None


def preset_names() -> list[str]:
    d = presets_dir()
    return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and f != "__init__.py") \
        if d else []


def preset_path(name: str) -> str:
    """The file of preset ``name`` (``'default'``, ``'mnist_03'``; ``.py`` optional)."""
    d = presets_dir() or ""
    return os.path.join(d, name if name.endswith(".py") else name + ".py")


# ----------------------------------------------------------------------------------------------
# Validation, once, at the boundary: train.py, certify.py and train_and_evaluate call these
# before anything is built; the code behind them assumes valid fields.
# ----------------------------------------------------------------------------------------------

LOSSES = ("hinge", "kappa_ce", "v2", "ce_hinge")
#: Losses with a λ (train.lam_start -> train.lam_end along the p ramp).
LAMBDA_LOSSES = ("v2", "ce_hinge")
#: config.train.dist_decay (linf_jax.optim.make_optimizer).
DIST_DECAYS = ("lp", "none")
ENSEMBLE_MODES = ("joint", "independent")


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def num_members(config) -> int | None:
    """The ensemble size K of a run, or None for a single model (no member axis)."""
    k = int(config.ensemble.size)
    return None if k == 1 else k


def flat(node, prefix: str = "") -> dict:
    """``{'model.width': 512, ...}``: the dotted fields of a config (or its JSON dict)."""
    if hasattr(node, "items"):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, (list, tuple)) else node}


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}")


def validate_config(config) -> None:
    """Checks every field a user can get wrong; raises :class:`ConfigError` (one line)."""
    t = config.train
    _require(isinstance(config.seed, int) and not isinstance(config.seed, bool), "seed",
             config.seed, "an integer")
    _require(config.get("kernels", "auto") in KERNEL_CHOICES, "kernels",
             config.get("kernels"), f"one of {', '.join(KERNEL_CHOICES)}")
    _require(isinstance(t.get("deterministic", False), bool), "train.deterministic",
             t.get("deterministic"), "True or False")
    for f in ("source", "train_split", "test_split"):
        v = config.data[f]
        _require(isinstance(v, str) and v.strip() != "", f"data.{f}", v, "a non-empty string")
    _require(isinstance(t.batch_size, int) and t.batch_size >= 1, "train.batch_size",
             t.batch_size, "a positive integer")
    family = t.get("schedule", "v1")
    _require(family in FAMILIES, "train.schedule", family,
             f"one of {FAMILIES} (how train.epochs is read; docs/RECIPES.md)")
    epochs = tuple(t.epochs)
    names = epochs_text(family)
    _require(len(epochs) == 5 and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                      for e in epochs),
             "train.epochs", epochs, f"five non-negative integers {names}")
    e = epochs_named(family, epochs)
    if family == "v1":
        _require(e["T"] >= 1 and e["e1"] <= e["e3"] <= e["T"] and e["e0"] <= e["T"],
                 "train.epochs", epochs, f"v1 {names} with e1 <= e3 <= T, e0 <= T and T >= 1")
    else:
        _require(e["T"] >= 1 and e["ps"] <= e["pe"] <= e["T"] and e["es"] <= e["T"]
                 and e["ee"] <= e["T"], "train.epochs", epochs,
                 f"v2 {names} with ps <= pe <= T, es <= T, ee <= T and T >= 1")
    _require(isinstance(t.get("drop_last", False), bool), "train.drop_last",
             t.get("drop_last"), "True or False")
    _require(is_number(t.adam_eps) and t.adam_eps > 0, "train.adam_eps", t.adam_eps,
             "a finite number > 0")
    for f in ("lr", "weight_decay", "ema_decay", "mix", "kappa", "lam_start", "lam_end"):
        v = t[f]
        _require(is_number(v) and v >= 0, f"train.{f}", v, "a finite number >= 0")
    scale_lr = t.get("logit_scale_lr")
    _require(scale_lr is None or (is_number(scale_lr) and scale_lr >= 0),
             "train.logit_scale_lr", scale_lr, "None (train.lr) or a finite number >= 0")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "a number in [0, 1)")
    _require(0 <= t.mix <= 1, "train.mix", t.mix, "a number in [0, 1]")
    _require(0 <= t.kappa <= 1, "train.kappa", t.kappa, "a number in [0, 1]")
    _require(is_number(t.eps_train) and 0 <= t.eps_train <= 1, "train.eps_train", t.eps_train,
             "a number of pixels in [0, 1]")
    _require(is_number(t.p_start) and t.p_start >= 1, "train.p_start", t.p_start,
             "a finite number >= 1")
    dist_decay = t.get("dist_decay", "lp")
    _require(dist_decay in DIST_DECAYS, "train.dist_decay", dist_decay,
             f"one of {DIST_DECAYS}")
    _require(isinstance(t.get("decay_logit_scale", False), bool), "train.decay_logit_scale",
             t.get("decay_logit_scale"), "True or False")
    _require(t.weight_decay == 0 or dist_decay != "lp" or t.p_start >= 2, "train.p_start",
             t.p_start, ">= 2 with the l_p weight decay (the gradient of ½||w||_p², p >= 2), "
             "or train.weight_decay=0, or train.dist_decay='none'")
    _require(is_number(t.p_end) and t.p_end >= t.p_start, "train.p_end", t.p_end,
             "a finite number >= train.p_start")
    smooth = t.get("eps_smooth", 0.0)
    _require(is_number(smooth) and 0 <= smooth < 1, "train.eps_smooth", smooth,
             "a number in [0, 1) (0: the linear ε ramp)")
    _require(t.loss in LOSSES, "train.loss", t.loss, f"one of {LOSSES}")
    if t.loss == "v2":
        _require(t.eps_train > 0 and _eps_ever_positive(family, epochs), "train.eps_train",
                 t.eps_train, "> 0 at some step with the v2 loss: with ε = 0 its margin term "
                 "(r / 2ε clipped to [0, 1]) is the 0-1 error, which has no gradient; check "
                 f"train.eps_train and the ε ramp of train.epochs={epochs}")
    if t.loss in LAMBDA_LOSSES:
        _require((t.lam_start > 0) == (t.lam_end > 0), "train.lam_end", t.lam_end,
                 f"> 0 with train.lam_start={t.lam_start} (λ moves geometrically, lam_start · "
                 "(lam_end/lam_start)^r, which is undefined when only one of them is 0), or "
                 "both 0 (no cross-entropy term)")
    _require(t.get("crop_mode", "zeros") in CROP_MODES, "train.crop_mode",
             t.get("crop_mode"), f"one of {CROP_MODES}")
    pad = t.get("crop_padding")
    _require(pad is None or (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0),
             "train.crop_padding", pad, "None (the data set's) or an integer >= 0")
    _require(t.get("flip") is None or isinstance(t.get("flip"), bool), "train.flip",
             t.get("flip"), "None (the data set's), True or False")
    _require(isinstance(t.checkpoint_every_epochs, int) and t.checkpoint_every_epochs >= 1,
             "train.checkpoint_every_epochs", t.checkpoint_every_epochs, "a positive integer")
    _require(isinstance(t.log_every, int) and t.log_every >= 1, "train.log_every", t.log_every,
             "a positive integer")
    _require(isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1,
             "train.keep_checkpoints", t.keep_checkpoints, "a positive integer")
    kee = t.get("keep_every_epochs", 0)
    _require(isinstance(kee, int) and not isinstance(kee, bool) and kee >= 0,
             "train.keep_every_epochs", kee, "an integer >= 0 (0: keep only the newest)")
    _require(isinstance(t.augment, bool), "train.augment", t.augment, "True or False")
    e = config.ensemble
    _require(isinstance(e.size, int) and e.size >= 1, "ensemble.size", e.size,
             "a positive integer")
    _require(e.mode in ENSEMBLE_MODES, "ensemble.mode", e.mode, f"one of {ENSEMBLE_MODES}")
    _require(e.get("execution", "auto") in EXECUTIONS, "ensemble.execution",
             e.get("execution"), f"one of {EXECUTIONS}")
    validate_eval_config(config.eval)


def _eps_ever_positive(family: str, epochs) -> bool:
    """Whether the training ε is > 0 at some step of the run (given eps_train > 0)."""
    e = epochs_named(family, epochs)
    if family == "v1":
        return e["e2"] == 0 or e["e0"] < e["T"]
    return e["ee"] <= e["es"] or e["es"] < e["T"]


def validate_eval_config(ev) -> None:
    eps = ev.eps if isinstance(ev.eps, (list, tuple)) else (ev.eps,)
    for v in eps:
        _require(is_number(v) and 0 <= v <= 1, "eval.eps", v, "numbers of pixels in [0, 1]")
    _require(isinstance(ev.pgd_steps, int) and ev.pgd_steps >= 0, "eval.pgd_steps",
             ev.pgd_steps, "an integer >= 0")
    _require(isinstance(ev.pgd_restarts, int) and ev.pgd_restarts >= 0, "eval.pgd_restarts",
             ev.pgd_restarts, "an integer >= 0")
    _require(isinstance(ev.batch_size, int) and ev.batch_size >= 1, "eval.batch_size",
             ev.batch_size, "a positive integer")


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def request_determinism(config) -> None:
    """With ``config.train.deterministic``, adds XLA's deterministic-ops flag to ``XLA_FLAGS``.
    Effective only before JAX starts its GPU backend (train.py calls it right after reading the
    config); :func:`train_and_evaluate` refuses a deterministic run on a GPU without it."""
    if config.train.get("deterministic", False):
        flags = os.environ.get("XLA_FLAGS", "")
        if DETERMINISTIC_FLAG not in flags:
            os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_FLAG).strip()


def check_determinism(config) -> None:
    import jax

    if (config.train.get("deterministic", False) and jax.default_backend() == "gpu"
            and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", "")):
        raise ConfigError(
            f"config.train.deterministic=True is not allowed here: the GPU backend started "
            f"without XLA_FLAGS={DETERMINISTIC_FLAG}; allowed: set it before JAX starts "
            "(train.py does; in Python call linf_jax.config.request_determinism(config) "
            "before the first JAX computation)")
