"""PNG plots: certified accuracy versus ε, training curves, certified-radius histograms.

Command line (matplotlib's Agg backend, no display needed)::

    linf-plot curve OUT.png RESULT.json [RESULT.json ...] [--labels a,b,c]
    linf-plot training OUT.png WORKDIR_or_metrics.jsonl
    linf-plot radii OUT.png RESULT.json [RESULT.json ...] [--labels a,b,c]

``RESULT.json`` is what certify.py writes (also a run's results.json, or the dict returned by
``Classifier.evaluate``): ``results`` (one ``{eps, certified_accuracy,
lipschitz_certified_accuracy, pgd_accuracy}`` per evaluated ε, pixels;
``lipschitz_certified_accuracy`` is null for a model that is not 1-Lipschitz) and ``radii``
(the per-example certified radius, pixels, 0 for misclassified examples: from the Lipschitz
rule or, where ``radius_certificate`` is ``"interval"``, from the interval certificate). Bad
input ends with one line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from linf_jax.errors import PlotInputError

OUT_EXTENSIONS = (".png", ".pdf", ".svg")
RESULT_HELP = ("a JSON file written by certify.py (or a run's results.json) with 'results' "
               "(eps, certified_accuracy, pgd_accuracy per ε) and per-example 'radii'")
METRICS_HELP = "a run folder (train.py --workdir) or its metrics.jsonl"
TRAINING_KEYS = (("loss", "loss", False), ("accuracy", "clean batch accuracy", False),
                 ("p", "p (∞ drawn at the top)", True), ("eps", "training ε (pixels)", False),
                 ("lr", "learning rate", False))


def figure(**kwargs):
    """A matplotlib Figure outside pyplot: no global backend switch (a notebook's inline backend
    stays as it is), no figure registry to close; ``savefig`` writes through Agg."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# Validation and loading
# ----------------------------------------------------------------------------------------------


def check_result(result, field: str, need: str = "any") -> Mapping:
    """Checks a certify summary. ``need``: 'any' (``results`` or ``radii``), 'radii'.

    Every key that is present must be well formed (``results``: a list of rows with a number
    ``eps`` >= 0 and accuracies in [0, 1]; ``radii``: finite numbers >= 0). Raises
    :class:`PlotInputError` naming ``field``."""
    if not isinstance(result, Mapping):
        raise PlotInputError(f"{field}: a JSON {type(result).__name__}, not an object; allowed: "
                             f"{RESULT_HELP}")
    keys = sorted(result)
    if "results" in result:
        rows = result["results"]
        if not isinstance(rows, list):
            raise PlotInputError(f"{field}: 'results' is a {type(rows).__name__}; allowed: a "
                                 "list of {eps, certified_accuracy, pgd_accuracy} rows")
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or not _is_number(row.get("eps")) or row["eps"] < 0:
                raise PlotInputError(f"{field}: results[{i}]={_short(row)} has no number 'eps' "
                                     ">= 0; allowed: rows {eps, certified_accuracy, "
                                     "pgd_accuracy} (pixels, fractions in [0, 1])")
            if "certified_accuracy" not in row:
                raise PlotInputError(f"{field}: results[{i}]={_short(row)} has no "
                                     "'certified_accuracy'; allowed: rows {eps, "
                                     "certified_accuracy, pgd_accuracy}")
            for key in ("certified_accuracy", "lipschitz_certified_accuracy", "pgd_accuracy"):
                if key == "lipschitz_certified_accuracy" and row.get(key, 0) is None:
                    continue  # null: the model is not 1-Lipschitz, the rule does not apply
                if key in row and not (_is_number(row[key]) and 0 <= row[key] <= 1):
                    raise PlotInputError(f"{field}: results[{i}].{key}={row[key]!r} is not "
                                         "allowed: a fraction in [0, 1]")
    if "radii" in result:
        radii = result["radii"]
        if not isinstance(radii, list) or not all(_is_number(r) and r >= 0 for r in radii):
            raise PlotInputError(f"{field}: 'radii'={_short(radii)} is not allowed: a list of "
                                 "finite per-example radii >= 0 (pixels)")
    if need == "radii":
        if not result.get("radii"):
            what = "an empty 'radii' list" if "radii" in result else f"no key 'radii' (keys: " \
                f"{', '.join(keys) or 'none'})"
            raise PlotInputError(f"{field}: {what}; allowed: {RESULT_HELP}")
    elif not result.get("radii") and not result.get("results"):
        raise PlotInputError(f"{field}: neither 'results' nor 'radii' (keys: "
                             f"{', '.join(keys) or 'none'}); allowed: {RESULT_HELP}")
    return result


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_result(path: str, field: str = "RESULT.json", need: str = "any") -> dict:
    """Reads and checks one certify JSON (see :func:`check_result`)."""
    where = f"{field}={path!r}"
    if os.path.isdir(path):
        raise PlotInputError(f"{where} is a folder; allowed: {RESULT_HELP}")
    try:
        with open(path) as f:
            result = json.load(f)
    except FileNotFoundError:
        raise PlotInputError(f"{where}: no such file; allowed: {RESULT_HELP}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlotInputError(f"{where} cannot be read ({type(err).__name__}); allowed: "
                             f"{RESULT_HELP}") from None
    except json.JSONDecodeError as err:
        raise PlotInputError(f"{where} is not JSON (line {err.lineno}: {err.msg}); allowed: "
                             f"{RESULT_HELP}") from None
    return check_result(result, where, need)


def read_metrics(path: str, field: str = "METRICS") -> list[dict]:
    """The records of a metrics.jsonl file (a workdir or the file itself), checked: every line a
    JSON object with a number ``step``, and at least one record with a plotted key."""
    where = f"{field}={path!r}"
    if os.path.isdir(path):
        file = os.path.join(path, "metrics.jsonl")
        if not os.path.isfile(file):
            raise PlotInputError(f"{where}: the folder has no metrics.jsonl; allowed: "
                                 f"{METRICS_HELP}")
        path = file
    records = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PlotInputError(f"{where}: line {lineno} is not JSON ({err.msg}); "
                                         f"allowed: {METRICS_HELP}") from None
                if not isinstance(record, dict) or not _is_number(record.get("step")):
                    raise PlotInputError(f"{where}: line {lineno} has no number 'step'; allowed: "
                                         f"{METRICS_HELP} (one JSON record per logged step)")
                records.append(record)
    except FileNotFoundError:
        raise PlotInputError(f"{where}: no such file or folder; allowed: {METRICS_HELP}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlotInputError(f"{where} cannot be read ({type(err).__name__}); allowed: "
                             f"{METRICS_HELP}") from None
    _check_records(records, where)
    return records


def _check_records(records: Sequence, where: str) -> None:
    if not records:
        raise PlotInputError(f"{where}: no records; allowed: {METRICS_HELP} with at least one "
                             "logged step")
    if not any(key in r for r in records for key, _, _ in TRAINING_KEYS):
        names = ", ".join(key for key, _, _ in TRAINING_KEYS)
        raise PlotInputError(f"{where}: no record has any of {names}; allowed: {METRICS_HELP}")


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def certified_curve(radii, eps_grid) -> np.ndarray:
    """Fraction of examples whose certified radius exceeds each ε (non-increasing in ε).

    ``radii`` are per-example radii (pixels) or a certify summary with a ``radii`` key. A radius
    ``r`` is counted for the ε < r (exactly what the Lipschitz rule ``margin > 2ε + tol``
    certifies; an interval radius also holds at ε = r, so the curve errs on the safe side)."""
    if isinstance(radii, Mapping):
        radii = radii.get("radii", [])
    r = np.sort(np.asarray(radii, np.float64).ravel())
    eps = np.asarray(eps_grid, np.float64)
    if not r.size:
        return np.zeros(eps.shape)
    return 1.0 - np.searchsorted(r, eps, side="right") / r.size


def _eps_top(runs: Mapping[str, Mapping], eps_max: float | None) -> float:
    if eps_max:
        return float(eps_max)
    all_eps = [row["eps"] for r in runs.values() for row in r.get("results", [])]
    top = max([*all_eps, 0.05]) * 1.5
    for r in runs.values():  # show the radius curve until (nearly) every radius is passed
        if r.get("radii"):
            top = max(top, float(np.quantile(r["radii"], 0.995)) * 1.05)
    return min(top, 1.0)


def plot_certified_accuracy(runs: Mapping[str, Mapping], path: str, eps_max: float | None = None,
                            title: str = "Certified accuracy versus ε") -> str:
    """One chart, one colour per run. ``runs[label]`` is a certify.py/evaluate summary: its
    ``radii`` (pixels) give the certified-radius curve (Lipschitz or interval radii, as its
    ``radius_certificate`` says), its ``results`` the interval-certified and PGD points at the
    evaluated ε."""
    for label, r in runs.items():
        check_result(r, f"runs[{label!r}]")
    fig = figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    top = _eps_top(runs, eps_max)
    grid = np.linspace(0, top, 400)
    for i, (label, r) in enumerate(runs.items()):
        color = f"C{i}"
        if r.get("radii"):
            kind = "interval" if r.get("radius_certificate") == "interval" else "Lipschitz"
            ax.plot(grid, 100 * certified_curve(r["radii"], grid), color=color,
                    label=f"{label} ({kind} radius)")
        rows = sorted(r.get("results", []), key=lambda row: row["eps"])
        if rows:
            eps = [row["eps"] for row in rows]
            ax.plot(eps, [100 * row["certified_accuracy"] for row in rows], "o", color=color,
                    label=f"{label} (interval certificate)")
            pgd = [(row["eps"], row["pgd_accuracy"]) for row in rows if "pgd_accuracy" in row]
            if pgd:
                ax.plot([e for e, _ in pgd], [100 * a for _, a in pgd], "x", color=color,
                        label=f"{label} (PGD accuracy)")
    ax.set_xlabel("ε (pixels, ℓ∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if runs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_training_curves(metrics: str | Sequence[dict], path: str) -> str:
    """Loss, clean batch accuracy, p, ε and learning rate against steps (from metrics.jsonl:
    a run folder, the file, or its records)."""
    if isinstance(metrics, (str, os.PathLike)):
        records = read_metrics(os.fspath(metrics))
    else:
        records = list(metrics)
        _check_records(records, "metrics")
    steps = np.array([r.get("step", np.nan) for r in records], np.float64)
    fig = figure(figsize=(6.4, 9), dpi=110)
    axes = fig.subplots(len(TRAINING_KEYS), 1, sharex=True)
    for ax, (key, label, log) in zip(axes, TRAINING_KEYS, strict=True):
        v = np.array([r.get(key, np.nan) for r in records], np.float64)
        if key == "p":
            finite = v[np.isfinite(v)]
            cap = (finite.max() if finite.size else 1000) * 2
            v = np.where(np.isinf(v), cap, v)
        ax.plot(steps, v, lw=1.2)
        ax.set_ylabel(label, fontsize=8)
        if log and np.any(v > 0):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_radius_histogram(runs: Mapping[str, Sequence[float] | Mapping], path: str,
                          bins: int = 40, eps: Sequence[float] = ()) -> str:
    """Histogram of per-example certified radii (pixels), one series per run. ``runs[label]``
    is a list of radii or a certify summary (its ``radii``); ``eps`` draws dashed lines at
    those radii (by default the ε evaluated in the summaries)."""
    series, marks = {}, set(eps)
    for label, r in runs.items():
        if isinstance(r, Mapping):
            check_result(r, f"runs[{label!r}]", need="radii")
            marks.update(row["eps"] for row in r.get("results", []) if not eps)
            r = r["radii"]
        series[label] = np.asarray(r, np.float64).ravel()
    fig = figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    top = max([r.max() if r.size else 0 for r in series.values()] + [1e-3])
    edges = np.linspace(0, top, bins + 1)
    for i, (label, radii) in enumerate(series.items()):  # light fill, full-colour outline
        ax.hist(radii, bins=edges, histtype="stepfilled", alpha=0.2, color=f"C{i}")
        ax.hist(radii, bins=edges, histtype="step", lw=1.4, color=f"C{i}", label=label)
    for e in sorted(marks):
        ax.axvline(e, color="0.3", ls="--", lw=0.8)
    ax.set_xlabel("certified radius (pixels, ℓ∞)" + (" — dashed: evaluated ε" if marks else ""))
    ax.set_ylabel("examples")
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_over_training(reports: Mapping[str, Sequence[Mapping]], path: str,
                       eps: float | None = None) -> str:
    """Certified and clean accuracy against epoch for every kept checkpoint, EMA and raw weights
    side by side (reports of :func:`linf_jax.classifier.certify_checkpoints`, ``certify.py
    --all_checkpoints``). ``reports`` maps a label to one report or several (seeds): several
    are drawn as their mean with a band from their minimum to their maximum. The epochs where p
    starts to ramp and where it becomes ∞ are shaded. ``eps``: the radius to show (default: the
    largest certified)."""
    groups = {label: list(rs) if isinstance(rs, (list, tuple)) else [rs]
              for label, rs in reports.items()}
    first = next(iter(groups.values()))[0]
    eps = max(first["eps"]) if eps is None else float(eps)
    fig = figure(figsize=(7.2, 8.4), dpi=110)
    ax_cert, ax_diff, ax_clean = fig.subplots(3, 1, sharex=True,
                                              gridspec_kw={"height_ratios": [3, 2, 3]})
    styles = {"ema": "-", "raw": "--"}
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    for label, runs in groups.items():
        color = next(colors)
        per_weights = {}
        for weights in runs[0]["weights"]:
            curves = []
            for run in runs:
                rows = sorted((r for r in run["rows"] if r["weights"] == weights),
                              key=lambda r: r["step"])
                epochs = np.array([r["epoch"] for r in rows], np.float64)
                cert = np.array([next(x["certified_accuracy"] for x in r["results"]
                                      if abs(x["eps"] - eps) < 1e-12) for r in rows])
                clean = np.array([r["clean_accuracy"] for r in rows])
                curves.append((epochs, cert, clean))
            epochs = curves[0][0]
            per_weights[weights] = (epochs, 100 * np.stack([c[1] for c in curves]))
            for ax, k in ((ax_cert, 1), (ax_clean, 2)):
                values = 100 * np.stack([c[k] for c in curves])
                ax.plot(epochs, values.mean(0), styles.get(weights, ":"), color=color, lw=1.4,
                        label=f"{label}, {weights}" + (f" (mean of {len(runs)})"
                                                       if len(runs) > 1 else ""))
                if len(runs) > 1:
                    ax.fill_between(epochs, values.min(0), values.max(0), color=color,
                                    alpha=0.12 if weights == "ema" else 0.06, lw=0)
        if {"ema", "raw"} <= set(per_weights):
            (epochs, ema), (_, raw) = per_weights["ema"], per_weights["raw"]
            diff = ema - raw
            ax_diff.plot(epochs, diff.mean(0), "-o", ms=2.5, color=color, lw=1.2, label=label)
            if len(diff) > 1:
                ax_diff.fill_between(epochs, diff.min(0), diff.max(0), color=color, alpha=0.15,
                                     lw=0)
    ax_diff.axhline(0.0, color="0.3", lw=0.8)
    ax_diff.set_ylabel("EMA − raw (points)")
    phases = first.get("p_phases") or {}
    end = first.get("epochs")
    for ax in (ax_cert, ax_diff, ax_clean):
        ramp, inf = phases.get("ramp_epoch"), phases.get("inf_epoch")
        if ramp is not None:
            ax.axvspan(ramp, inf if inf is not None else end, color="#f3e6bd", alpha=0.5, lw=0)
        if inf is not None:
            ax.axvspan(inf, end, color="#bcd0ea", alpha=0.5, lw=0)
        ax.grid(alpha=0.3)
    ax_cert.set_ylabel(f"certified accuracy at ε={eps:g} (%)")
    ax_clean.set_ylabel("clean accuracy (%)")
    ax_clean.set_xlabel("epoch (yellow: p ramps from p_start; blue: p = ∞)")
    ax_cert.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_schedule(schedule, path: str, marks: dict | None = None,
                  std: float | None = None, title: str = "") -> str:
    """p, ε (pixels), lr and λ against epochs over the whole run (every step for short runs,
    2,000 evenly spaced steps otherwise), with ``marks`` (a :func:`preview`) as points."""
    from linf_jax.schedules import preview

    total = schedule.total_steps
    steps = np.unique(np.linspace(0, total, min(total + 1, 2001)).round().astype(np.int64))
    data = preview(schedule, steps, std)
    fig = figure(figsize=(6.4, 8.5), dpi=110)
    axes = fig.subplots(4, 1, sharex=True)
    keys = (("p", "p (∞ drawn at the top)"), ("eps_train", "training ε (pixels)"),
            ("lr", "learning rate"), ("lam", "λ (v2, ce_hinge)"))
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
    return path
