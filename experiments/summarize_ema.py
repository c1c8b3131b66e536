"""Plots and a Markdown table of experiments/ema_over_training.sh: EMA against raw weights at
every kept checkpoint, mean ± std over seeds, and EMA − raw per checkpoint with how many seeds
agree on its sign.

    python experiments/summarize_ema.py runs/ema_over_training docs/img
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

from linf_jax.plots import plot_over_training

KINDS = {"long": "100 epochs", "short": "30 epochs", "ensemble": "30 epochs, joint K = 3"}


def load(root: str, kind: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(root, f"{kind}_seed*", "certify_checkpoints.json")))
    return [json.load(open(p)) for p in paths]


def series(report: dict, weights: str, eps: float | None):
    rows = sorted((r for r in report["rows"] if r["weights"] == weights), key=lambda r: r["step"])
    if eps is None:
        return np.array([r["epoch"] for r in rows]), np.array([r["clean_accuracy"] for r in rows])
    return (np.array([r["epoch"] for r in rows]),
            np.array([next(x["certified_accuracy"] for x in r["results"] if x["eps"] == eps)
                      for r in rows]))


def table(reports: list[dict], kind: str) -> list[str]:
    phases = reports[0]["p_phases"]
    lines = [f"**{kind}** ({KINDS[kind]}, {len(reports)} seeds; p ramps from epoch "
             f"{phases['ramp_epoch']:g}, p = ∞ from epoch {phases['inf_epoch']:g})", "",
             "| epoch | certified ε=0.3, EMA | raw | EMA − raw (seeds EMA ahead) | certified "
             "ε=0.1, EMA | raw | EMA − raw | clean, EMA | raw |",
             "|---|---|---|---|---|---|---|---|---|"]
    epochs = series(reports[0], "ema", None)[0]
    for i, epoch in enumerate(epochs):
        cells = [f"{epoch:g}"]
        for eps in (0.3, 0.1, None):
            ema = 100 * np.array([series(r, "ema", eps)[1][i] for r in reports])
            raw = 100 * np.array([series(r, "raw", eps)[1][i] for r in reports])
            d = ema - raw
            sd = (lambda a: a.std(ddof=1) if len(a) > 1 else 0.0)
            cells += [f"{ema.mean():.2f} ± {sd(ema):.2f}", f"{raw.mean():.2f} ± {sd(raw):.2f}"]
            if eps is not None:
                cells.append(f"{d.mean():+.2f} ({int((d > 0).sum())}/{len(d)})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(root: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    md = []
    for kind in KINDS:
        reports = load(root, kind)
        if not reports:
            continue
        for eps in (0.3, 0.1):
            path = os.path.join(out_dir, f"ema_over_training_{kind}_eps{eps:g}.png")
            plot_over_training({f"{KINDS[kind]}": reports}, path, eps=eps)
            print(f"wrote {path}")
        md += table(reports, kind) + [""]
    text = "\n".join(md)
    with open(os.path.join(out_dir, "ema_over_training.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:3])
