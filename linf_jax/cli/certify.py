"""Evaluate and certify trained runs: clean, PGD and certified accuracy at several ε.

    linf-certify --workdir runs/x --eps 0.1,0.3 --split test --output results.json --plot c.png
    linf-certify --workdir runs/a --workdir runs/b --workdir runs/c   # stacked ensemble
    linf-certify --workdir runs/x --weights raw
    linf-certify --workdir runs/x --all_checkpoints --pgd_steps 0 --plot course.png

``python -m linf_jax.cli.certify`` and ``python certify.py`` in a checkout are the same program.

ε is in pixel units. Several --workdir flags stack separately trained members into one ensemble
(averaged logits and margins, certified in one vmapped call).
"""

from __future__ import annotations

import functools
import math
import os
import types

from absl import flags

from linf_jax.config import WEIGHTS


def define_flags() -> types.SimpleNamespace:
    """The command's flags, defined when it runs (never on import)."""
    fl = types.SimpleNamespace()
    fl.workdir = flags.DEFINE_multi_string("workdir", None,
                                           "Run folder(s); several = one ensemble.")
    fl.eps = flags.DEFINE_string("eps", "0.1",
                                 "Comma-separated ε values in pixels, e.g. 0.1,0.3.")
    fl.split = flags.DEFINE_string("split", None, "Split to certify (TFDS slicing syntax; "
                                   "default: the run's test split).")
    fl.data = flags.DEFINE_string("data", None, "Data source (default: the run's).")
    fl.data_dir = flags.DEFINE_string("data_dir", None, "Data folder for tfds/idx sources.")
    fl.output = flags.DEFINE_string("output", None, "JSON output (default <workdir>/certify.json).")
    fl.plot = flags.DEFINE_string("plot", None, "PNG of certified accuracy versus ε.")
    fl.weights = flags.DEFINE_enum("weights", "ema", list(WEIGHTS), "EMA or raw weights.")
    fl.pgd_steps = flags.DEFINE_integer("pgd_steps", 100, "PGD steps (0 disables the attack).")
    fl.pgd_restarts = flags.DEFINE_integer("pgd_restarts", 1, "PGD random restarts.")
    fl.batch_size = flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
    fl.limit = flags.DEFINE_integer("limit", None, "Certify only the first N examples.")
    fl.progress = flags.DEFINE_bool("progress", True, "Show a progress bar.")
    fl.step = flags.DEFINE_integer("step", None, "Certify this checkpoint step of the run "
                                   "(default: the latest; one --workdir only).")
    fl.export = flags.DEFINE_string(
        "export", None, "Write the model (or the stacked ensemble) as one self-contained "
        "jax.export file to this path and exit: jax.export.deserialize(open(PATH, 'rb').read())"
        ".call(x) on float32 pixels (N, H, W, C) returns (logits, certified radii in pixels), for "
        "CPU, CUDA and TPU, with no linf-jax import.")
    fl.all_checkpoints = flags.DEFINE_bool(
        "all_checkpoints", False, "Certify every checkpoint the run keeps (see "
        "config.train.keep_every_epochs), EMA and raw weights: one JSON row per (step, weights); "
        "--plot then draws certified and clean accuracy against epoch. One --workdir only.")
    return fl


def parse_eps(text: str) -> list[float]:
    from linf_jax.cli import fail

    values = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            fail(f"--eps={text!r}: {part.strip()!r} is not a number; allowed: pixels in [0, 1], "
                 "comma-separated")
        if not math.isfinite(v) or not 0 <= v <= 1:
            fail(f"--eps={text!r}: {v} is not allowed; allowed: pixels in [0, 1] (ε is in pixel "
                 "units)")
        values.append(v)
    return values


def _require_workdir(fl) -> None:
    from linf_jax import cli

    if not fl.workdir.value:
        cli.fail("--workdir is required (a run folder; repeat the flag to stack an ensemble)")


def check_flags(fl) -> tuple[list[float], str]:
    """Validates every flag before anything is loaded: ``(eps, output path)``."""
    from linf_jax import cli

    _require_workdir(fl)
    for name, flag in (("pgd_steps", fl.pgd_steps), ("pgd_restarts", fl.pgd_restarts)):
        if flag.value < 0:
            cli.fail(f"--{name}={flag.value} is not allowed: an integer >= 0")
    if fl.batch_size.value < 1:
        cli.fail(f"--batch_size={fl.batch_size.value} is not allowed: a positive integer")
    if fl.limit.value is not None and fl.limit.value < 1:
        cli.fail(f"--limit={fl.limit.value} is not allowed: a positive integer")
    if fl.all_checkpoints.value and (len(fl.workdir.value) > 1 or fl.step.value is not None):
        cli.fail("--all_checkpoints is not allowed with several --workdir or with --step: it "
                 "certifies every kept step of one run")
    eps = parse_eps(fl.eps.value)
    default_name = "certify_checkpoints.json" if fl.all_checkpoints.value else "certify.json"
    output = fl.output.value or os.path.join(fl.workdir.value[0], default_name)
    if os.path.isdir(fl.workdir.value[0]) or fl.output.value:
        cli.check_writable_file(output, "--output")
    if fl.plot.value:
        cli.check_writable_file(fl.plot.value, "--plot")
    return eps, output


def check_data(meta: dict, ds, source: str) -> None:
    """The data must fit the model: image shape and label range (one line naming --data)."""
    from linf_jax.cli import fail

    shape, num_classes = tuple(meta["input_shape"]), int(meta["num_classes"])
    if tuple(ds.input_shape) != shape:
        fail(f"--data={source!r}: images of shape {tuple(ds.input_shape)} do not fit the model; "
             f"allowed: images of shape {shape} (H, W, C), as in training")
    if len(ds.labels) and (ds.labels.min() < 0 or ds.labels.max() >= num_classes):
        bad = int(ds.labels.min()) if ds.labels.min() < 0 else int(ds.labels.max())
        fail(f"--data={source!r}: label {bad} is out of range; allowed: 0..{num_classes - 1}"
             f" (the model has {num_classes} classes)")


def export_line(info: dict, path: str) -> str:
    """The one line ``--export`` prints: what was written where (:func:`linf_jax.export.read_info`
    says it)."""
    k = info["members"]
    what = "model" if k == 1 else f"ensemble of {k}"
    dims = ", ".join(map(str, info["input_shape"]))
    return (f"exported {what} ({info['weights']} weights) of {', '.join(info['workdirs'])} to "
            f"{path} (platforms {', '.join(info['platforms'])}, input (N, {dims}) float32 "
            "pixels in [0, 1]; returns (logits, radii in pixels))")


def run(fl) -> dict:
    if fl.export.value:
        from linf_jax import cli, export

        _require_workdir(fl)
        cli.check_writable_file(fl.export.value, "--export")
        export.export(fl.workdir.value, fl.export.value, weights=fl.weights.value)
        print(export_line(export.read_info(fl.export.value), fl.export.value), flush=True)
        return {}
    eps, output = check_flags(fl)

    from linf_jax import checkpoint as ckpt
    from linf_jax import data as data_lib
    from linf_jax import ops, plots
    from linf_jax.classifier import load_classifier
    from linf_jax.cli import percent, resolve_kernels

    # The run's files and the data first (cheap), the checkpoint(s) last.
    config, meta = ckpt.read_run_files(fl.workdir.value[0])
    source = fl.data.value or meta["source"]
    split = fl.split.value or config.data.test_split
    ds = data_lib.load(source, split, fl.data_dir.value or config.data.get("data_dir"))
    check_data(meta, ds, source)
    images, labels = ds.images, ds.labels
    if fl.limit.value is not None:
        images, labels = images[:fl.limit.value], labels[:fl.limit.value]
    x = data_lib.as_pixels(images)
    if fl.all_checkpoints.value:
        return run_all_checkpoints(fl, x, labels, eps, output, source, split)
    clf = load_classifier(fl.workdir.value, weights=fl.weights.value, step=fl.step.value)
    kernels = resolve_kernels()
    with ops.use_kernels(kernels):
        result = clf.evaluate(x, labels, eps=eps, pgd_steps=fl.pgd_steps.value,
                              pgd_restarts=fl.pgd_restarts.value, batch_size=fl.batch_size.value,
                              progress=fl.progress.value)
    result.update(weights=fl.weights.value, workdirs=list(fl.workdir.value), data=source,
                  split=split, members=clf.num_members or 1, kernels=kernels.record())
    ckpt.write_json(output, result)
    if fl.plot.value:
        label = "ensemble" if clf.num_members else "model"
        plots.plot_certified_accuracy({f"{label} ({fl.weights.value})": result}, fl.plot.value)
    print(f"{len(labels)} examples of {source}:{split}, {fl.weights.value} weights, "
          f"{clf.num_members or 1} member(s): clean {100 * result['clean_accuracy']:.2f}%")
    for row in result["results"]:
        print(f"  eps={row['eps']:<6g} certified {100 * row['certified_accuracy']:6.2f}%  "
              f"(Lipschitz {percent(row['lipschitz_certified_accuracy'])})  "
              f"PGD {100 * row['pgd_accuracy']:6.2f}%")
    print(f"wrote {output}" + (f" and {fl.plot.value}" if fl.plot.value else ""))
    return result


def run_all_checkpoints(fl, x, labels, eps, output, source, split) -> dict:
    from linf_jax import checkpoint as ckpt
    from linf_jax import ops, plots
    from linf_jax.classifier import certify_checkpoints
    from linf_jax.cli import resolve_kernels

    kernels = resolve_kernels()
    with ops.use_kernels(kernels):
        report = certify_checkpoints(
            fl.workdir.value[0], x, labels, eps=eps, pgd_steps=fl.pgd_steps.value,
            pgd_restarts=fl.pgd_restarts.value, batch_size=fl.batch_size.value,
            progress=fl.progress.value)
    report.update(data=source, split=split, kernels=kernels.record())
    ckpt.write_json(output, report)
    if fl.plot.value:
        plots.plot_over_training({os.path.basename(os.path.normpath(fl.workdir.value[0])): report},
                                 fl.plot.value)
    print(f"{len(labels)} examples of {source}:{split}, {len(report['steps'])} checkpoints "
          f"(steps {report['steps'][0]}..{report['steps'][-1]}), EMA and raw weights")
    for row in report["rows"]:
        epoch = "" if row["epoch"] is None else f"epoch {row['epoch']:7.2f} "
        figures = "  ".join(f"eps={r['eps']:g} {100 * r['certified_accuracy']:6.2f}%"
                            for r in row["results"])
        print(f"  step {row['step']:>7} {epoch}{row['weights']:>3}: clean "
              f"{100 * row['clean_accuracy']:6.2f}%  certified {figures}")
    print(f"wrote {output}" + (f" and {fl.plot.value}" if fl.plot.value else ""))
    return report


def main(argv, fl) -> None:
    from linf_jax.cli import fail, quiet_logging, run_guarded

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: use --flag=value")
    quiet_logging()  # Orbax logs every restore at INFO
    run_guarded(run, fl)


def command() -> None:
    """The ``linf-certify`` console command."""
    from linf_jax.cli import main_entry

    main_entry(functools.partial(main, fl=define_flags()), flags_module=__name__)


if __name__ == "__main__":
    command()
