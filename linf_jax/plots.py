"""PNG plots: certified accuracy versus ε, training curves, certified-radius histograms."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def certified_curve(radii, eps_grid) -> np.ndarray:
    """Fraction of examples whose certified radius exceeds each ε (non-increasing in ε)."""
    r = np.asarray(radii, np.float64)
    return np.array([(r > e).mean() if r.size else 0.0 for e in eps_grid])


def plot_certified_accuracy(runs: Mapping[str, Mapping], path: str, eps_max: float | None = None,
                            title: str = "Certified accuracy versus ε") -> str:
    """One chart, one line per run. ``runs[label]`` is a certify.py/evaluate summary: its
    ``radii`` (pixels) give the Lipschitz curve, its ``results`` the interval-certified and
    PGD points at the evaluated ε."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    all_eps = [row["eps"] for r in runs.values() for row in r.get("results", [])]
    top = eps_max or max([*all_eps, 0.05]) * 1.5
    grid = np.linspace(0, top, 200)
    for i, (label, r) in enumerate(runs.items()):
        color = f"C{i}"
        if r.get("radii"):
            ax.plot(grid, 100 * certified_curve(r["radii"], grid), color=color,
                    label=f"{label} (Lipschitz radius)")
        rows = r.get("results", [])
        if rows:
            ax.plot([row["eps"] for row in rows], [100 * row["certified_accuracy"] for row in rows],
                    "o", color=color, label=f"{label} (interval certificate)")
            ax.plot([row["eps"] for row in rows], [100 * row["pgd_accuracy"] for row in rows],
                    "x", color=color, label=f"{label} (PGD accuracy)")
    ax.set_xlabel("ε (pixels, ℓ∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (a workdir or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(metrics: str | Sequence[dict], path: str) -> str:
    """Loss, clean batch accuracy, p, ε and learning rate against steps (from metrics.jsonl)."""
    plt = _pyplot()
    records = read_metrics(metrics) if isinstance(metrics, str) else list(metrics)
    steps = np.array([r["step"] for r in records])
    keys = [("loss", "loss", False), ("accuracy", "clean batch accuracy", False),
            ("p", "p (∞ drawn at the top)", True), ("eps", "training ε (pixels)", False),
            ("lr", "learning rate", False)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 9), dpi=110, sharex=True)
    for ax, (key, label, log) in zip(axes, keys, strict=True):
        v = np.array([r.get(key, np.nan) for r in records], np.float64)
        if key == "p":
            finite = v[np.isfinite(v)]
            cap = (finite.max() if finite.size else 1000) * 2
            v = np.where(np.isinf(v), cap, v)
        ax.plot(steps, v, lw=1.2)
        ax.set_ylabel(label, fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_radius_histogram(runs: Mapping[str, Sequence[float]], path: str, bins: int = 40) -> str:
    """Histogram of per-example certified radii (pixels), one series per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    top = max([max(r) if len(r) else 0 for r in runs.values()] + [1e-3])
    edges = np.linspace(0, top, bins + 1)
    for label, radii in runs.items():
        ax.hist(np.asarray(radii), bins=edges, alpha=0.5, label=label)
    ax.set_xlabel("certified radius (pixels, ℓ∞)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
