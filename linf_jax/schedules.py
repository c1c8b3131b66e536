"""Per-iteration schedules of the two official recipe families (docs/METHOD.md §5, the recipes
that use them: docs/RECIPES.md), and a preview of them on the command line.

Both families read the same five-number ``train.epochs`` tuple, differently. With ``B`` the steps
per epoch and ``ef = step / B`` the position of a step in epochs (a schedule runs before the
forward pass of its step, as in the official ``main.py``\\ s), ``clip(x) = min(max(x, 0), 1)``:

``schedule = 'v1'`` (ICML 2021 code, ``zbh2047/L_inf-dist-net``, and the EMA paper's fork),
``(e0, e1, e2, e3, T)``:

* lr: ``lr0`` until e1, then ``½·lr0·(1 + cos(π·(ef − e1)/(T − e1)))``, 0 at T
  (constant when T ≤ e1);
* p: ``r = clip((ef − e1)/(e3 − e1))``; ``p_start·(p_end/p_start)^r`` before e3, ∞ from e3 on;
* ε: **e2 is a duration**: ``eps_train · clip((ef − e0)/e2)``, and ``eps_train`` from step 0
  when e2 = 0;
* λ (only the v2 loss has one): ``lam_start·(lam_end/lam_start)^r`` with the r of p.

``schedule = 'v2'`` (ICLR 2022 code, ``zbh2047/L_inf-dist-net-v2``), ``(es, ee, ps, pe, T)``,
with ``ratio(s, e) = 1 if e ≤ s else clip((ef − s)/(e − s))``:

* lr: a cosine over the whole run from step 0, ``½·lr0·(1 + cos(π·ef/T))`` (the logit scale
  has its own base lr on the same cosine, :func:`linf_jax.optim.make_optimizer`);
* p: ``r = ratio(ps, pe)``; ∞ where ``r = 1`` **and** ``p_end ≥ 100``, else
  ``p_start·(p_end/p_start)^r``;
* ε: ``eps_train · ratio(es, ee)``: constant from step 0 when ee ≤ es (every official script);
* λ: ``lam_start·(lam_end/lam_start)^r`` with the r of p.

Both: the EMA decay is ``min(1 − 1/(epoch + 1), ema_decay)`` with ``epoch = floor(ef)``.

Units: ``Schedule.eps_train`` and :meth:`Schedule.eps` are in **normalised** units (pixels / the
data set's scalar std), what the network sees; ``config.train.eps_train`` and the preview's
``eps_train`` are in **pixels**.

Every schedule is a pure function of the step (a Python int or a traced ``jnp`` scalar), so the
jitted train step reads p, ε, lr, λ and the EMA decay from ``state.step`` and never recompiles.
:meth:`Schedule.p_phase` is the host-side counterpart of the p schedule ('start': p = p_start,
'ramp': a traced p, 'inf'): the train step is compiled once per phase, so the start uses the
integer-power fast path and the ℓ∞ phase the exact ℓ∞ kernels. The cosine is evaluated as
``lr0·sin²(π/2·(T − ef)/(T − e1))`` (the same function), which keeps float32 accuracy down to the
last step, where ``1 + cos`` would cancel.

Preview (prints a table, writes JSON and a plot)::

    python -m linf_jax.schedules --config configs/cifar10_8_v2.py --epochs 0,100,675,1300 \\
        --json sched.json --plot sched.png

``--epochs`` takes comma-separated epochs (``349.5`` or ``349+117/118`` for a step inside an
epoch; each is rounded to the nearest step); without it, the boundaries of the tuple. The JSON
holds ``epochs``, ``steps``, ``p`` (a number, or the string ``"inf"`` from the ℓ∞ phase on),
``eps_train`` (pixels), ``eps_train_normalized`` (null when the data set's std is unknown),
``lr``, ``logit_scale_lr``, ``lam`` (0 for losses without λ), ``phase``, ``ema_decay`` and the
settings used (``schedule``, ``train_epochs``, ``steps_per_epoch``, ``std``, ``loss``).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

INF = float("inf")
FAMILIES = ("v1", "v2")
V2_INF_MIN_P_END = 100.0  # v2 switches to p = ∞ at pe only when p_end >= 100 (main.py)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """p, ε, lr, λ and the EMA decay of every step; ``family`` picks how ``epochs`` is read:
    'v1' ``(e0, e1, e2, e3, T)`` or 'v2' ``(es, ee, ps, pe, T)`` (module docstring)."""

    epochs: tuple[int, int, int, int, int]
    steps_per_epoch: int
    lr: float
    eps_train: float  # normalised units (pixels / std)
    p_start: float = 8.0
    p_end: float = 1000.0
    lam_start: float = 0.0
    lam_end: float = 0.0
    ema_decay: float = 0.99
    family: str = "v1"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"train.schedule={self.family!r} is not allowed: one of {FAMILIES}")

    def _steps(self, i: int) -> int:
        return int(self.epochs[i]) * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self._steps(4)

    # --- ratios in [0, 1] (float32), as functions of the step -----------------------------------

    def _ratio(self, step, start: int, end: int):
        """``clip((step − start)/(end − start))`` in float32; ``end ≤ start`` is handled by the
        callers (the families differ there)."""
        s = jnp.asarray(step, jnp.float32)
        return jnp.clip((s - start) / (end - start), 0.0, 1.0)

    def _inf_from(self) -> int | None:
        """The first step at which p = ∞ (``None``: never)."""
        if self.family == "v1":
            return self._steps(3)
        ps, pe = self._steps(2), self._steps(3)
        if self.p_end < V2_INF_MIN_P_END:
            return None
        return 0 if pe <= ps else pe

    def ramp(self, step):
        """The p ratio r ∈ [0, 1] that p and λ follow (float32). v1: 0 until e1, linear to 1 at
        e3 (a step from 0 to 1 at e1 when e3 ≤ e1); v2: ``ratio(ps, pe)``."""
        if self.family == "v1":
            e1, e3 = self._steps(1), self._steps(3)
            if e3 <= e1:
                s = jnp.asarray(step)
                return jnp.where(s < e1, 0.0, 1.0).astype(jnp.float32)
            return self._ratio(step, e1, e3)
        ps, pe = self._steps(2), self._steps(3)
        if pe <= ps:
            return jnp.ones_like(jnp.asarray(step, jnp.float32))
        return self._ratio(step, ps, pe)

    def eps_ratio(self, step):
        """ε / eps_train (float32). v1: ``clip((ef − e0)/e2)``, 1 when e2 = 0; v2:
        ``ratio(es, ee)``, 1 when ee ≤ es."""
        if self.family == "v1":
            e0, e2 = self._steps(0), self._steps(2)
            if e2 == 0:
                return jnp.ones_like(jnp.asarray(step, jnp.float32))
            return self._ratio(step, e0, e0 + e2)
        es, ee = self._steps(0), self._steps(1)
        if ee <= es:
            return jnp.ones_like(jnp.asarray(step, jnp.float32))
        return self._ratio(step, es, ee)

    # --- the schedules ------------------------------------------------------------------------

    def p(self, step):
        """The p of ``step`` (float32; ∞ in the ℓ∞ phase)."""
        r = self.ramp(step)
        finite = self.p_start * jnp.exp(r * math.log(self.p_end / self.p_start))
        start = self._inf_from()
        if start is None:
            return finite.astype(jnp.float32)
        return jnp.where(jnp.asarray(step) >= start, INF, finite).astype(jnp.float32)

    def p_phase(self, step: int) -> str:
        """Host-side phase of ``step``: 'start' (p = p_start exactly), 'ramp' (a traced p) or
        'inf'."""
        start = self._inf_from()
        if start is not None and step >= start:
            return "inf"
        first = self._steps(1) if self.family == "v1" else self._steps(2)
        last = self._steps(3)
        if self.family == "v2" and last <= first:  # ratio 1 from step 0: p = p_end
            return "ramp"
        return "start" if step < first else "ramp"

    def lr_factor(self, step):
        """lr / lr0 (float32): ``½(1 + cos(π·r))``, computed as ``sin²(π/2·(1 − r))``.
        v1: ``r = (ef − e1)/(T − e1)`` clipped (1 before e1; constant 1 when T ≤ e1); v2:
        ``r = ef/T``."""
        total = self.total_steps
        first = self._steps(1) if self.family == "v1" else 0
        s = jnp.asarray(step, jnp.float32)
        if total <= first:
            return jnp.ones_like(s)
        u = jnp.clip((total - s) / (total - first), 0.0, 1.0)
        return jnp.square(jnp.sin((0.5 * jnp.pi) * u)).astype(jnp.float32)

    def lr_at(self, step):
        """The learning rate of ``step`` (the main parameter group)."""
        return (self.lr * self.lr_factor(step)).astype(jnp.float32)

    def eps(self, step):
        """Training ε of ``step`` in normalised units."""
        return (self.eps_train * self.eps_ratio(step)).astype(jnp.float32)

    def lam(self, step):
        """λ of the v2 loss: geometric ``lam_start → lam_end`` along the p ratio (0 when
        lam_start = 0; constant lam_start when lam_end = 0)."""
        if self.lam_start == 0:
            return jnp.zeros_like(jnp.asarray(step, jnp.float32))
        end = self.lam_end if self.lam_end > 0 else self.lam_start
        r = self.ramp(step)
        return (self.lam_start * jnp.exp(r * math.log(end / self.lam_start))).astype(jnp.float32)

    def ema_decay_at(self, step):
        """The EMA decay α of ``step`` (float32): ``min(1 − 1/(epoch + 1), ema_decay)`` with
        ``epoch = step // steps_per_epoch``, so 0 for the whole first epoch (the average copies
        the weights) and the cap from the first epoch ≥ ``1/(1 − ema_decay) − 1`` on
        (docs/METHOD.md §7)."""
        epoch = jnp.asarray(step, jnp.int32) // self.steps_per_epoch
        warm = 1.0 - 1.0 / (epoch.astype(jnp.float32) + 1.0)
        return jnp.minimum(warm, self.ema_decay).astype(jnp.float32)

    # --- host-side description -----------------------------------------------------------------

    def boundaries(self) -> list[float]:
        """Epochs worth a look: 0, the tuple's boundaries, the middle of the p ramp, the last
        step before p = ∞, and T (sorted, in [0, T])."""
        e = [int(v) for v in self.epochs]
        total = e[4]
        b = self.steps_per_epoch
        if self.family == "v1":
            points = [0, e[0], e[0] + e[2], e[1], (e[1] + e[3]) / 2, e[3], total]
        else:
            points = [0, e[0], e[1], e[2], (e[2] + e[3]) / 2, e[3], total]
        inf = self._inf_from()
        if inf is not None and inf > 0:
            points.append((inf - 1) / b)
        return sorted({round(float(x) * b) / b for x in points if 0 <= x <= total})


def p_to_json(p: float):
    """p for JSON: a number, or the string ``"inf"`` in the ℓ∞ phase."""
    return "inf" if math.isinf(p) else float(p)


def preview(schedule: Schedule, steps, std: float | None = None,
            logit_scale_lr: float | None = None) -> dict:
    """The schedule at ``steps`` (host lists): ``epochs``, ``steps``, ``phase``, ``p`` (a number
    or "inf"), ``eps_train`` (pixels), ``eps_train_normalized``, ``lr``, ``logit_scale_lr``,
    ``lam`` and ``ema_decay``.

    ``std``: the data set's std, with ``schedule.eps_train`` in normalised units (as
    :func:`linf_jax.train_lib.make_schedule` builds it); ``None``: ``schedule.eps_train`` is in
    pixels and ``eps_train_normalized`` is None. ``logit_scale_lr``: the base lr of the logit
    scale (default ``schedule.lr``)."""
    steps = [int(s) for s in steps]
    arr = jnp.asarray(steps, jnp.int32)
    p = np.asarray(schedule.p(arr), np.float64)
    ratio = np.asarray(schedule.eps_ratio(arr), np.float64)
    factor = np.asarray(schedule.lr_factor(arr), np.float64)
    pixels = schedule.eps_train * (1.0 if std is None else std)
    scale_lr = schedule.lr if logit_scale_lr is None else logit_scale_lr
    return {
        "epochs": [s / schedule.steps_per_epoch for s in steps],
        "steps": steps,
        "phase": [schedule.p_phase(s) for s in steps],
        "p": [p_to_json(v) for v in p],
        "eps_train": [pixels * r for r in ratio],
        "eps_train_normalized": (None if std is None else
                                 [float(v) for v in np.asarray(schedule.eps(arr), np.float64)]),
        "lr": [float(v) for v in np.asarray(schedule.lr_at(arr), np.float64)],
        "logit_scale_lr": [float(np.float32(scale_lr * f)) for f in factor],
        "lam": [float(v) for v in np.asarray(schedule.lam(arr), np.float64)],
        "ema_decay": [float(v) for v in np.asarray(schedule.ema_decay_at(arr), np.float64)],
    }


# ----------------------------------------------------------------------------------------------
# Command line: python -m linf_jax.schedules --config configs/X.py [--epochs ...]
# ----------------------------------------------------------------------------------------------

# Training-set sizes of the stock TFDS data sets (their 'train' split), so that the preview of a
# paper preset needs no download.
TFDS_TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}


def parse_epochs(text: str, total: int) -> list[float]:
    """``"0,50,349+117/118,400"`` → epochs (floats in [0, T]); ValueError (one line) else."""
    import re

    out = []
    for token in text.split(","):
        tok = token.strip()
        m = re.fullmatch(r"(\d+)\s*\+\s*(\d+)\s*/\s*(\d+)", tok)
        try:
            if m:
                if int(m.group(3)) == 0:
                    raise ValueError
                value = int(m.group(1)) + int(m.group(2)) / int(m.group(3))
            else:
                value = float(tok)
        except ValueError:
            raise ValueError(f"--epochs={text!r} is not allowed: {tok!r} is not a number; "
                             "allowed: comma-separated epochs such as 0,50,349+117/118") from None
        if not (math.isfinite(value) and 0 <= value <= total):
            raise ValueError(f"--epochs={text!r} is not allowed: {tok!r} is outside the run; "
                             f"allowed: epochs in [0, {total}] (T of train.epochs)")
        out.append(value)
    if not out:
        raise ValueError(f"--epochs={text!r} is not allowed: allowed: at least one epoch")
    return out


def _train_size_and_std(config) -> tuple[int, float | None]:
    """Training-set size and std for the preview: the stock TFDS sets from a table, anything
    else by loading the training split (DataError, one line, when it cannot be loaded)."""
    from linf_jax import data as data_lib

    d = config.data
    source = str(d.source)
    if source.startswith("tfds:") and d.train_split == "train":
        name = source[len("tfds:"):].split(":")[0].split("/")[0]
        if name in TFDS_TRAIN_SIZES:
            return TFDS_TRAIN_SIZES[name], data_lib.KNOWN_TFDS[name][1]
    try:
        ds = data_lib.load(source, d.train_split, d.get("data_dir"))
    except data_lib.DataError as err:
        raise data_lib.DataError(f"{str(err).splitlines()[0]}; or pass --steps_per_epoch to "
                                 "preview without the data") from None
    return len(ds.labels), float(ds.std)


def format_table(result: dict, show_scale_lr: bool) -> str:
    head = ["epoch", "step", "phase", "p", "eps (px)", "eps (n)", "lr"]
    if show_scale_lr:
        head.append("scale lr")
    head += ["lambda", "EMA decay"]
    rows = [head]
    normalized = result["eps_train_normalized"]
    for i, step in enumerate(result["steps"]):
        p = result["p"][i]
        row = [f"{result['epochs'][i]:.6g}", str(step), result["phase"][i],
               "inf" if p == "inf" else f"{p:.6g}", f"{result['eps_train'][i]:.6g}",
               "?" if normalized is None else f"{normalized[i]:.6g}", f"{result['lr'][i]:.6g}"]
        if show_scale_lr:
            row.append(f"{result['logit_scale_lr'][i]:.6g}")
        row += [f"{result['lam'][i]:.6g}", f"{result['ema_decay'][i]:.4g}"]
        rows.append(row)
    widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)


def plot_schedule(schedule: Schedule, path: str, marks: dict | None = None,
                  std: float | None = None, title: str = "") -> str:
    """p, ε (pixels), lr and λ against epochs over the whole run (every step for short runs,
    2,000 evenly spaced steps otherwise), with ``marks`` (a :func:`preview`) as points."""
    from linf_jax.plots import _pyplot

    total = schedule.total_steps
    steps = np.unique(np.linspace(0, total, min(total + 1, 2001)).round().astype(np.int64))
    data = preview(schedule, steps, std)
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(6.4, 8.5), dpi=110, sharex=True)
    keys = (("p", "p (∞ drawn at the top)"), ("eps_train", "training ε (pixels)"),
            ("lr", "learning rate"), ("lam", "λ (v2 loss)"))
    for ax, (key, label) in zip(axes, keys, strict=True):
        def values(d, key=key):
            v = d[key]
            if key == "p":
                finite = [x for x in data["p"] if x != "inf"] or [1000.0]
                cap = 2 * max(finite)
                return np.array([cap if x == "inf" else x for x in v], np.float64)
            return np.asarray(v, np.float64)

        ax.plot(data["epochs"], values(data), lw=1.2)
        if marks is not None:
            ax.plot(marks["epochs"], values(marks), "o", ms=3.5)
        if key == "p":
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title(title, fontsize=9)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _main(argv) -> None:
    import json

    from absl import flags

    from linf_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: use --flag=value")
    cli.quiet_logging()
    fl = flags.FLAGS
    config = cli.load_config(_FLAG_HOLDERS["config"])

    from linf_jax import train_lib

    cli.run_guarded(train_lib.validate_config, config)
    total = int(config.train.epochs[4])
    spe = fl.steps_per_epoch
    if spe is not None and spe < 1:
        cli.fail(f"--steps_per_epoch={spe} is not allowed: a positive integer")
    if spe is None:
        n, std = cli.run_guarded(_train_size_and_std, config)
        spe = train_lib.steps_per_epoch(n, config.train.batch_size,
                                        bool(config.train.get("drop_last", False)))
    else:
        std = None
    json_path, plot_path = fl.json, fl.plot
    if json_path:
        cli.check_writable_file(json_path, "--json")
    if plot_path:
        from linf_jax.plots import OUT_EXTENSIONS

        cli.check_writable_file(plot_path, "--plot")
        if not plot_path.lower().endswith(OUT_EXTENSIONS):
            cli.fail(f"--plot={plot_path!r} is not allowed: allowed: a file ending in "
                     f"{', '.join(OUT_EXTENSIONS)}")
    schedule = train_lib.make_schedule(config, spe, 1.0 if std is None else std)
    if fl.epochs is None:
        epochs = schedule.boundaries()
    else:
        try:
            epochs = parse_epochs(fl.epochs, total)
        except ValueError as err:
            cli.fail(str(err))
    steps = [round(e * spe) for e in epochs]
    result = preview(schedule, steps, std, train_lib.logit_scale_lr(config))
    t = config.train
    family = t.get("schedule", "v1")
    meaning = ("(e0, e1, e2, e3, T): lr constant to e1 then cosine to 0 at T; p ramp e1 -> e3, "
               "inf from e3; eps ramp of length e2 from e0 (constant when e2 = 0)"
               if family == "v1" else
               "(es, ee, ps, pe, T): lr cosine over [0, T]; p ramp ps -> pe, inf from pe "
               "(if p_end >= 100); eps ramp es -> ee (constant when ee <= es); lambda with p")
    print(f"schedule {family}, epochs {tuple(int(e) for e in t.epochs)} {meaning}")
    eps_text = f"{t.eps_train:g} px"
    if std is not None:
        eps_text += f" = {t.eps_train / std:.6g} (n), std {std:g}"
    dropped = ", last partial batch dropped" if t.get("drop_last", False) else ""
    print(f"{spe} steps per epoch (batch {t.batch_size}{dropped}), eps_train {eps_text}, "
          f"loss {t.loss}, lr {t.lr:g}")
    scale_lr = train_lib.logit_scale_lr(config)
    print(format_table(result, show_scale_lr=scale_lr != t.lr))
    result.update(schedule=family, train_epochs=[int(e) for e in t.epochs],
                  steps_per_epoch=spe, std=std, loss=t.loss, base_lr=float(t.lr),
                  base_logit_scale_lr=float(scale_lr))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {json_path}")
    if plot_path:
        plot_schedule(schedule, plot_path, marks=result, std=std,
                      title=f"{fl['config'].config_filename}: schedule {family}, "
                            f"epochs {tuple(int(e) for e in t.epochs)}")
        print(f"wrote {plot_path}")


_FLAG_HOLDERS: dict = {}


def _define_flags() -> None:
    """The preview's flags (defined only when it runs as a program, never on import)."""
    import os
    import sys

    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "default.py")
    try:  # without --config, ml_collections applies the --config.* overrides right here
        _FLAG_HOLDERS["config"] = config_flags.DEFINE_config_file(
            "config", default, "Experiment config file (as train.py).", lock_config=True)
    except Exception as err:  # noqa: BLE001 - an override naming no config field
        from linf_jax.cli import config_override_message, fail

        fail(config_override_message(err, sys.argv))
    flags.DEFINE_string("epochs", None, "Comma-separated epochs to show (349+117/118: a step "
                        "inside an epoch); default: the boundaries of train.epochs.")
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: from the training "
                         "split's size, the batch size and train.drop_last).")
    flags.DEFINE_string("json", None, "Write the values to this JSON file.")
    flags.DEFINE_string("plot", None, "Plot the whole schedule to this image (.png/.pdf/.svg).")


if __name__ == "__main__":
    from linf_jax.cli import main_entry

    _define_flags()
    main_entry(_main)
