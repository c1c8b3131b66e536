"""``linf-plot curve|training|radii`` (``python -m linf_jax.cli.plot``): the command line of
:mod:`linf_jax.plots` (usage in that module's docstring): argument parsing, default legend labels,
the output-file check, and one ``error: ...`` line with exit code 2 for bad input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from linf_jax.plots import (
    METRICS_HELP,
    OUT_EXTENSIONS,
    RESULT_HELP,
    PlotInputError,
    load_result,
    plot_certified_accuracy,
    plot_radius_histogram,
    plot_training_curves,
    read_metrics,
)


def default_labels(paths: Sequence[str]) -> list[str]:
    """A label per file: its name without extension, with its folder when names repeat."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), s)
              for p, s in zip(paths, stems, strict=True)]
    return labels if len(set(labels)) == len(labels) else [os.fspath(p) for p in paths]


def _labels(text: str | None, paths: Sequence[str]) -> list[str]:
    if text is None:
        return default_labels(paths)
    labels = [s.strip() for s in text.split(",")]
    if len(labels) != len(paths) or not all(labels):
        raise PlotInputError(f"--labels={text!r}: {len(labels)} label(s) for {len(paths)} "
                             "RESULT.json file(s); allowed: one non-empty comma-separated label "
                             "per RESULT.json, in order")
    if len(set(labels)) != len(labels):
        raise PlotInputError(f"--labels={text!r}: labels repeat; allowed: distinct labels")
    return labels


def _check_out(path: str) -> None:
    from linf_jax.cli import check_writable_file

    ext = os.path.splitext(path)[1].lower()
    if ext not in OUT_EXTENSIONS:
        raise PlotInputError(f"OUT.png={path!r}: the extension {ext or '(none)'!r} is not "
                             f"allowed; allowed: a file name ending in {', '.join(OUT_EXTENSIONS)}")
    check_writable_file(path, "OUT.png")


def _positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer in 1..1000")
    return v


def _eps_max(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: pixels in (0, 1]")
    return v


def build_parser():
    import argparse

    from linf_jax.cli import fail

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit code 2 (argparse prints usage + a line)
            usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
            fail(f"{message}; usage: {usage}")

    parser = Parser(prog="linf-plot",
                    description="PNG plots of linf-jax runs (matplotlib Agg).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{curve,training,radii}")
    curve = sub.add_parser("curve", help="certified accuracy versus ε, several runs on one chart")
    curve.add_argument("out", metavar="OUT.png", help="output image (.png, .pdf or .svg)")
    curve.add_argument("results", metavar="RESULT.json", nargs="+", help=RESULT_HELP)
    curve.add_argument("--labels", help="comma-separated legend labels, one per RESULT.json")
    curve.add_argument("--eps-max", type=_eps_max, help="right end of the ε axis (pixels)")
    curve.add_argument("--title", default="Certified accuracy versus ε")
    training = sub.add_parser("training", help="loss, accuracy, p, ε and lr against steps")
    training.add_argument("out", metavar="OUT.png", help="output image (.png, .pdf or .svg)")
    training.add_argument("metrics", metavar="WORKDIR_or_metrics.jsonl", help=METRICS_HELP)
    radii = sub.add_parser("radii", help="histogram of per-example certified radii")
    radii.add_argument("out", metavar="OUT.png", help="output image (.png, .pdf or .svg)")
    radii.add_argument("results", metavar="RESULT.json", nargs="+", help=RESULT_HELP)
    radii.add_argument("--labels", help="comma-separated legend labels, one per RESULT.json")
    radii.add_argument("--bins", type=_positive_int, default=40, help="number of bins")
    return parser


def run(args) -> str:
    _check_out(args.out)
    if args.command == "training":
        return plot_training_curves(read_metrics(args.metrics, "WORKDIR_or_metrics.jsonl"),
                                    args.out)
    need = "radii" if args.command == "radii" else "any"
    results = [load_result(p, "RESULT.json", need) for p in args.results]
    runs = dict(zip(_labels(args.labels, args.results), results, strict=True))
    if args.command == "curve":
        return plot_certified_accuracy(runs, args.out, eps_max=args.eps_max, title=args.title)
    return plot_radius_histogram(runs, args.out, bins=args.bins)


def main(argv: Sequence[str] | None = None) -> int:
    from linf_jax.cli import fail

    args = build_parser().parse_args(argv)
    try:
        path = run(args)
    except PlotInputError as err:
        fail(str(err))
    print(f"wrote {path}")
    return 0


def command() -> None:
    """The ``linf-plot`` console command (also ``python -m linf_jax.cli.plot``)."""
    import sys

    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    command()
