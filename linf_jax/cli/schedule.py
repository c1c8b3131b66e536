"""Preview of a config's schedule on the command line: a table of p, ε, lr, λ and the EMA decay
at chosen epochs, optionally written to JSON and plotted over the whole run. The formulas are
:class:`linf_jax.schedules.Schedule`'s; the config is checked and turned into a schedule as
train.py does.

Usage (``python -m linf_jax.cli.schedule`` is the same program)::

    linf-schedule --config cifar10_8_v2 --epochs 0,100,675,1300 --json sched.json --plot sched.png

``--epochs`` takes comma-separated epochs (``349.5`` or ``349+117/118`` for a step inside an
epoch; each is rounded to the nearest step); without it, the boundaries of the tuple. The JSON
holds ``epochs``, ``steps``, ``p`` (a number, or the string ``"inf"`` from the ℓ∞ phase on),
``eps_train`` (pixels), ``eps_train_normalized`` (null when the data set's std is unknown),
``lr``, ``logit_scale_lr``, ``lam`` (0 for losses without λ), ``phase``, ``ema_decay`` and the
settings used (``schedule``, ``train_epochs``, ``steps_per_epoch``, ``std``, ``loss``,
``eps_smooth``: the r0 of the smooth ε ramp, 0 for the linear one).
"""

from __future__ import annotations

import functools
import math
import types


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
    """Training-set size and std for the preview: the stock TFDS sets and the named npz sources
    (``tinyimagenet:FILE``) from a table, anything else by loading the training split
    (DataError, one line, when it cannot be loaded)."""
    from linf_jax import data as data_lib
    from linf_jax.dataset import NAMED_SOURCES, TFDS_TRAIN_SIZES, known_tfds
    from linf_jax.errors import first_line

    d = config.data
    source = str(d.source)
    kind, _, arg = source.partition(":")
    if d.train_split == "train":
        if kind == "tfds":
            versionless = arg.split(":")[0]
            for name in (versionless, versionless.split("/")[0]):
                if name in TFDS_TRAIN_SIZES:
                    return TFDS_TRAIN_SIZES[name], known_tfds(versionless)[1]
        if kind in NAMED_SOURCES:
            return NAMED_SOURCES[kind].train_size, NAMED_SOURCES[kind].std
    try:
        ds = data_lib.load(source, d.train_split, d.get("data_dir"))
    except data_lib.DataError as err:
        raise data_lib.DataError(f"{first_line(err)}; or pass --steps_per_epoch to preview "
                                 "without the data") from None
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


def main(argv, fl: types.SimpleNamespace) -> None:
    import json

    from absl import flags

    from linf_jax import cli
    from linf_jax.schedules import preview

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: use --flag=value")
    cli.quiet_logging()
    config = cli.load_config(fl.config)

    from linf_jax import config as config_lib
    from linf_jax import experiment

    cli.run_guarded(config_lib.validate_config, config)
    family = config.train.get("schedule", "v1")
    total = config_lib.epochs_named(family, config.train.epochs)["T"]
    spe = fl.steps_per_epoch.value
    if spe is not None and spe < 1:
        cli.fail(f"--steps_per_epoch={spe} is not allowed: a positive integer")
    if spe is None:
        n, std = cli.run_guarded(_train_size_and_std, config)
        spe = experiment.steps_per_epoch(n, config.train.batch_size,
                                        bool(config.train.get("drop_last", False)))
    else:
        std = None
    json_path, plot_path = fl.json.value, fl.plot.value
    if json_path:
        cli.check_writable_file(json_path, "--json")
    if plot_path:
        from linf_jax.plots import OUT_EXTENSIONS

        cli.check_writable_file(plot_path, "--plot")
        if not plot_path.lower().endswith(OUT_EXTENSIONS):
            cli.fail(f"--plot={plot_path!r} is not allowed: allowed: a file ending in "
                     f"{', '.join(OUT_EXTENSIONS)}")
    schedule = experiment.make_schedule(config, spe, 1.0 if std is None else std)
    if fl.epochs.value is None:
        epochs = schedule.boundaries()
    else:
        try:
            epochs = parse_epochs(fl.epochs.value, total)
        except ValueError as err:
            cli.fail(str(err))
    steps = [round(e * spe) for e in epochs]
    result = preview(schedule, steps, std, experiment.logit_scale_lr(config))
    t = config.train
    family = t.get("schedule", "v1")
    meaning = f"{config_lib.epochs_text(family)}: {config_lib.EPOCHS_MEANING[family]}"
    print(f"schedule {family}, epochs {tuple(int(e) for e in t.epochs)} {meaning}")
    eps_text = f"{t.eps_train:g} px"
    if std is not None:
        eps_text += f" = {t.eps_train / std:.6g} (n), std {std:g}"
    smooth = float(t.get("eps_smooth", 0.0))
    if smooth > 0:
        eps_text += f", smooth eps ramp r0 {smooth:g}"
    dropped = ", last partial batch dropped" if t.get("drop_last", False) else ""
    print(f"{spe} steps per epoch (batch {t.batch_size}{dropped}), eps_train {eps_text}, "
          f"loss {t.loss}, lr {t.lr:g}")
    scale_lr = experiment.logit_scale_lr(config)
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
        from linf_jax.plots import plot_schedule

        plot_schedule(schedule, plot_path, marks=result, std=std,
                      title=f"{flags.FLAGS['config'].config_filename}: schedule {family}, "
                            f"epochs {tuple(int(e) for e in t.epochs)}")
        print(f"wrote {plot_path}")


def define_flags() -> types.SimpleNamespace:
    """The preview's flags, defined when it runs (never on import)."""
    from absl import flags

    from linf_jax.cli import define_config_flag

    fl = types.SimpleNamespace()
    fl.config = define_config_flag(
        "Experiment config: a preset name or a Python file with get_config(), as for linf-train.")
    fl.epochs = flags.DEFINE_string(
        "epochs", None, "Comma-separated epochs to show (349+117/118: a step inside an epoch); "
        "default: the boundaries of train.epochs.")
    fl.steps_per_epoch = flags.DEFINE_integer(
        "steps_per_epoch", None, "Steps per epoch (default: from the training split's size, the "
        "batch size and train.drop_last).")
    fl.json = flags.DEFINE_string("json", None, "Write the values to this JSON file.")
    fl.plot = flags.DEFINE_string("plot", None,
                                  "Plot the whole schedule to this image (.png/.pdf/.svg).")
    return fl


def command() -> None:
    """The ``linf-schedule`` console command."""
    from linf_jax.cli import main_entry

    main_entry(functools.partial(main, fl=define_flags()), flags_module=__name__)


if __name__ == "__main__":
    command()
