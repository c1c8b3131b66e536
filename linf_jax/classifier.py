"""The Python entry point for notebooks and other tools.

>>> clf = linf_jax.load_classifier("runs/default")            # EMA weights by default
>>> logits = clf(x)                    # x: float32 pixels in [0, 1], shape (N, H, W, C)
>>> mask = clf.certify(x, y, eps=0.1)  # certified at pixel radius 0.1 (interval certificate)
>>> ens = linf_jax.load_classifier(["runs/a", "runs/b", "runs/c"])  # stacked, one vmapped call
>>> [m(x) for m in ens.members]        # the single members, for comparison
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from linf_jax import certify as certify_lib
from linf_jax import checkpoint as ckpt
from linf_jax import config as config_lib
from linf_jax import data as data_lib
from linf_jax import ensemble as ensemble_lib
from linf_jax import evaluation, ops
from linf_jax.errors import InputError
from linf_jax.models import is_1_lipschitz


class Classifier:
    """A trained model (or a stacked ensemble) with its data normalisation.

    The methods take pixels in [0, 1], ``(N, H, W, C)``, and ε in pixels, and check them.
    :meth:`normalize`, ``logits_fn``, ``margins_fn`` and ``pixel_box`` are the model in network
    units, unchecked, for a user's own programs (an attack, an export;
    :func:`linf_jax.certify.model_radius` takes them): ``logits_fn(normalize(x))`` is ``clf(x)``
    without the checks, and a radius in network units times ``std`` is one in pixels.

    Attributes:
      num_members: None for a single model, else the number of members K (the variables then
        carry a leading member axis).
      std: the data's standard deviation (pixels = network units × std).
      lipschitz: whether the logits are 1-Lipschitz in ℓ∞ (a pure ℓ∞-dist net or an ensemble
        of them, :func:`linf_jax.models.is_1_lipschitz`): whether the Lipschitz rule is sound.
      logits_fn: ``xn -> logits [N, C]`` of a normalised input (the member average for an
        ensemble); a :class:`jax.tree_util.Partial` whose leaves are the weights
        (:func:`linf_jax.evaluation.make_eval_fns`).
      margins_fn: ``(lo, hi, labels) -> [N, C]``, upper bounds of ``z_j − z_y`` over the box
        ``[lo, hi]`` of normalised inputs (the interval certificate's margins).
      pixel_box: ``(lo, hi)``, the pixel range [0, 1] in network units, per channel
        (:func:`linf_jax.data.pixel_bounds`): the box every certificate clips the ε-ball to.
    """

    def __init__(self, model, variables, meta: dict, weights: str = "ema",
                 num_members: int | None = None):
        self.model = model
        self.variables = variables
        self.meta = meta
        self.weights = weights
        self.num_members = num_members
        self.input_shape = tuple(meta["input_shape"])
        self.num_classes = int(meta["num_classes"])
        self.std = float(meta["std"])
        self._mean = jnp.asarray(meta["mean"], jnp.float32)
        self.pixel_box = tuple(data_lib.pixel_bounds(meta["mean"], self.std))
        self.logits_fn, self.margins_fn = evaluation.make_eval_fns(model, variables, num_members)
        self.lipschitz = is_1_lipschitz(model)
        # The programs are module-level and take the weights as arguments (inside the Partials
        # of make_eval_fns): classifiers of one architecture share their compilations.
        self._fns = (self.logits_fn, self.margins_fn, self._mean, *self.pixel_box)

    def normalize(self, x) -> jax.Array:
        """Pixels -> the network's input, ``(x − mean) / std`` (:func:`linf_jax.data.normalize`;
        unchecked, a JAX function of ``x``)."""
        return data_lib.normalize(x, self._mean, self.std)

    def _logits(self, x):
        return _logits_program(self.logits_fn, self._mean, x, std=self.std,
                               kernels=ops.kernel_request())

    def _certify(self, x, y, eps_norm):
        return _certify_program(*self._fns, x, y, eps_norm, std=self.std,
                                kernels=ops.kernel_request())

    def _radius(self, x, y):
        return _radius_program(*self._fns, x, y, std=self.std, lipschitz=self.lipschitz,
                               kernels=ops.kernel_request())

    def _check(self, x, y=None):
        """Validates pixels ``x`` (and labels ``y``); raises :class:`InputError` (one line).

        Traced inputs (under ``jax.jit``, ``jax.grad``, ``jax.vmap``) pass through with their
        shape checked only: their values are not known, and a user's own attack or fine-tuning
        must be able to differentiate through the classifier."""
        if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
            if x.ndim == 3 and len(self.input_shape) == 3 and x.shape[1:] == self.input_shape[:2]:
                x = x[..., None]
            if x.shape[1:] != self.input_shape:
                raise InputError(f"x.shape={x.shape} does not match the model; allowed: "
                                 f"(N, {', '.join(map(str, self.input_shape))})")
            return x, y
        try:
            x = np.asarray(x, np.float32)
        except (TypeError, ValueError) as err:
            raise InputError(f"x: not an array of numbers ({err}); allowed: float32 pixels in "
                             "[0, 1]") from None
        if x.ndim == 3 and len(self.input_shape) == 3 and x.shape[1:] == self.input_shape[:2]:
            x = x[..., None]
        if x.ndim < 1 or x.shape[1:] != self.input_shape:
            raise InputError(f"x.shape={x.shape} does not match the model; allowed: "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        bad = int(x.size - np.isfinite(x).sum())
        if bad:
            raise InputError(f"x: {bad} NaN or inf values; allowed: finite pixels in [0, 1]")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise InputError(f"x: pixels range over [{x.min():.3g}, {x.max():.3g}]; allowed: "
                             "[0, 1]")
        if y is not None:
            y = np.asarray(y)
            if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
                raise InputError(f"y.shape={y.shape} dtype={y.dtype} is not allowed: "
                                 f"({x.shape[0]},) integer labels")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                bad_label = int(y.min()) if y.min() < 0 else int(y.max())
                raise InputError(f"y: label {bad_label} is out of range; allowed: 0.."
                                 f"{self.num_classes - 1}")
        return x, y

    def __call__(self, x) -> jax.Array:
        """Logits ``[N, C]`` (the member average for an ensemble). A JAX function of ``x``:
        ``jax.grad(lambda x: loss(clf(x)))(x)``, ``jax.jit`` and ``jax.vmap`` work."""
        x, _ = self._check(x)
        return self._logits(jnp.asarray(x))

    def certify(self, x, y, eps: float) -> jax.Array:
        """Boolean mask of the examples certified at pixel radius ``eps`` (interval certificate,
        with the rounding margin of :data:`linf_jax.certify.DEFAULT_TOL`)."""
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                and np.isfinite(eps) and 0 <= eps <= 1):
            raise InputError(f"eps={eps!r} is not allowed: a number of pixels in [0, 1]")
        x, y = self._check(x, y)
        eps_norm = jnp.float32(data_lib.eps_to_normalized(eps, self.std))
        return self._certify(jnp.asarray(x), jnp.asarray(y, jnp.int32), eps_norm)

    def certified_radius(self, x, y) -> jax.Array:
        """Per-example ℓ∞ radius in pixels that a sound certificate proves: the Lipschitz
        radius for a 1-Lipschitz model (a pure net or an ensemble of them), else the interval
        certificate's by bisection (:func:`linf_jax.certify.interval_radius`, on the safe side);
        0 for a misclassified example (:func:`linf_jax.certify.model_radius`, times ``std``)."""
        x, y = self._check(x, y)
        return self._radius(jnp.asarray(x), jnp.asarray(y, jnp.int32)) * self.std

    def evaluate(self, x, y, eps=(0.1,), pgd_steps: int = 100, pgd_restarts: int = 1,
                 batch_size: int = 500, progress: bool = False,
                 per_example: bool = False) -> dict:
        """Clean / PGD / certified accuracy at every pixel ε (the JSON of certify.py; the
        Lipschitz-rule figures are ``None`` unless the model is 1-Lipschitz).
        ``per_example=True`` adds the masks behind the figures
        (:func:`linf_jax.certify.evaluate_dataset`)."""
        x, y = self._check(x, y)
        return certify_lib.evaluate_dataset(
            self.logits_fn, self.margins_fn, x, y, mean=self.meta["mean"], std=self.std,
            eps_pixels=list(eps), batch_size=min(batch_size, len(y)), pgd_steps=pgd_steps,
            pgd_restarts=pgd_restarts, progress=progress, lipschitz=self.lipschitz,
            per_example=per_example)

    @cached_property
    def members(self) -> list[Classifier]:
        """The single-member classifiers (``[self]`` for a single model)."""
        if self.num_members is None:
            return [self]
        return [Classifier(self.model, v, self.meta, self.weights)
                for v in ensemble_lib.unstack(self.variables)]

    def __repr__(self) -> str:
        kind = "single model" if self.num_members is None else f"ensemble of {self.num_members}"
        return (f"Classifier({type(self.model).__name__}, {kind}, weights={self.weights!r}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


@functools.partial(jax.jit, static_argnames=("std", "kernels"))
def _logits_program(logits_fn, mean, x, *, std, kernels):
    with ops.use_kernels(kernels or None):  # the choice in force where it is called
        return logits_fn(data_lib.normalize(x, mean, std))


@functools.partial(jax.jit, static_argnames=("std", "kernels"))
def _certify_program(logits_fn, margins_fn, mean, lo, hi, x, y, eps_norm, *, std, kernels):
    with ops.use_kernels(kernels or None):
        xn = data_lib.normalize(x, mean, std)
        correct = logits_fn(xn).argmax(-1) == y
        return certify_lib.interval_certified_at(margins_fn, xn, y, eps_norm, lo, hi) & correct


@functools.partial(jax.jit, static_argnames=("std", "lipschitz", "kernels"))
def _radius_program(logits_fn, margins_fn, mean, lo, hi, x, y, *, std, lipschitz, kernels):
    with ops.use_kernels(kernels or None):
        xn = data_lib.normalize(x, mean, std)
        return certify_lib.model_radius(logits_fn, margins_fn, xn, y, lo, hi,
                                        lipschitz=lipschitz)


def load_classifier(workdir: str | os.PathLike | Sequence[str | os.PathLike],
                    weights: str = "ema", step: int | None = None) -> Classifier:
    """Loads a run (a single model or an ensemble trained in one program), or several runs
    stacked into one ensemble, from their latest checkpoint (or ``step``, of a single run; a
    damaged latest checkpoint is refused in one line naming the newest step that restores).
    Members trained separately must share one architecture
    and one data normalisation)."""
    config_lib.check_weights(weights)
    dirs = [workdir] if isinstance(workdir, (str, os.PathLike)) else list(workdir)
    if not dirs:
        raise InputError("workdir: at least one run directory is needed")
    if step is not None and len(dirs) > 1:
        raise InputError(f"step={step} is not allowed with {len(dirs)} workdirs: one run only")
    loaded = [ckpt.load_variables(os.fspath(d), weights, step) for d in dirs]
    cfg0, meta, model, _, _ = loaded[0]
    arch0 = config_lib.flat(cfg0.model)
    variables = []
    for d, (cfg, m, _, v, _) in zip(dirs, loaded, strict=True):
        if (m["input_shape"], m["num_classes"], m["mean"], m["std"]) != (
                meta["input_shape"], meta["num_classes"], meta["mean"], meta["std"]):
            raise ensemble_lib.EnsembleError(
                f"ensemble member {os.fspath(d)!r}: data {m['source']} (shape {m['input_shape']},"
                f" {m['num_classes']} classes) differs from member 0's {meta['source']}; "
                "allowed: members trained on one data set")
        arch = config_lib.flat(cfg.model)
        for key in sorted(set(arch) | set(arch0)):
            if arch.get(key) != arch0.get(key):
                raise ensemble_lib.EnsembleError(
                    f"ensemble member {os.fspath(d)!r}: config.model.{key}={arch.get(key)!r} "
                    f"differs from member 0 ({os.fspath(dirs[0])!r}: {arch0.get(key)!r}); "
                    "allowed: members of one architecture")
        if config_lib.num_members(cfg) is None:
            variables.append(v)
        else:
            variables.extend(ensemble_lib.unstack(v))
    if len(variables) == 1:
        return Classifier(model, variables[0], meta, weights)
    stacked = ensemble_lib.stack(variables)
    return Classifier(model, stacked, meta, weights, num_members=len(variables))


def certify_checkpoints(workdir: str | os.PathLike, x, y, eps=(0.1,), weights=config_lib.WEIGHTS,
                        pgd_steps: int = 0, pgd_restarts: int = 1, batch_size: int = 500,
                        progress: bool = False) -> dict:
    """Certifies every checkpoint a run keeps, with each of ``weights`` (EMA and raw): one row
    per (step, weights) with the epoch, the p the step trained at, and the figures of
    :meth:`Classifier.evaluate` on pixels ``x`` / labels ``y``. The report also gives the epochs
    where p starts to ramp and where it becomes ∞ (``p_phases``), for plots of a run's course
    (:func:`linf_jax.plots.plot_over_training`)."""
    from linf_jax import experiment

    workdir = os.fspath(workdir)
    config, meta = ckpt.read_run_files(workdir)
    steps = ckpt.checkpoint_steps(workdir)
    spe = int(meta.get("steps_per_epoch") or ckpt.steps_per_epoch_from_metrics(workdir) or 0)
    schedule = experiment.make_schedule(config, spe, meta["std"]) if spe else None
    rows = []
    for step in steps:
        for w in weights:
            clf = load_classifier(workdir, weights=w, step=step)
            r = clf.evaluate(x, y, eps=eps, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
                             batch_size=batch_size, progress=progress)
            p = float(schedule.p(max(step - 1, 0))) if schedule is not None else None
            rows.append({"step": step, "epoch": step / spe if spe else None, "weights": w,
                         "p": p, "clean_accuracy": r["clean_accuracy"],
                         "results": r["results"], "num_examples": r["num_examples"]})
    phases = None
    if schedule is not None:
        kinds = [schedule.p_phase(s) for s in range(schedule.total_steps)]
        first = {k: next((s for s, v in enumerate(kinds) if v == k), None)
                 for k in ("ramp", "inf")}
        phases = {f"{k}_epoch": (None if s is None else s / spe) for k, s in first.items()}
    return {"workdir": workdir, "steps": steps, "steps_per_epoch": spe or None,
            "epochs": schedule.total_steps / spe if schedule is not None else None,
            "p_phases": phases, "weights": list(weights), "eps": [float(e) for e in eps],
            "pgd_steps": pgd_steps, "rows": rows}
