"""Table and figure of an experiments/sortnet_vs_linf.sh run: SortNet against the ℓ∞-dist net,
clean / PGD / certified accuracy at each ε, mean ± standard deviation over the seeds, for the
single model (raw and EMA weights) and the joint K = 3 ensemble (EMA weights), then per seed.

    python experiments/summarize_sortnet.py [runs/sortnet_vs_linf] [docs/img]
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np

NETS = {"sort": "SortNet (q = 0.75)", "linf": "ℓ∞-dist net"}
SETTINGS = [("single", "raw", "single, raw"), ("single", "ema", "single, EMA"),
            ("joint_k3", "ema", "joint K = 3, EMA")]


def load(root: str) -> dict:
    """``{(net, setting, weights): {seed: certify.json}}``."""
    out: dict = {}
    for path in glob.glob(os.path.join(root, "*_seed*", "certify_*.json")):
        run = os.path.basename(os.path.dirname(path))
        m = re.fullmatch(r"(sort|linf)_(single|joint_k3)_seed(\d+)", run)
        w = re.fullmatch(r"certify_(ema|raw)\.json", os.path.basename(path))
        if not m or not w:
            continue
        with open(path) as f:
            out.setdefault((m[1], m[2], w[1]), {})[int(m[3])] = json.load(f)
    return out


def metrics(r: dict) -> dict:
    row = {"clean": 100 * r["clean_accuracy"]}
    for res in r["results"]:
        row[f"pgd {res['eps']:g}"] = 100 * res["pgd_accuracy"]
        row[f"cert {res['eps']:g}"] = 100 * res["certified_accuracy"]
    return row


def main(root: str = "runs/sortnet_vs_linf", img: str | None = None) -> None:
    runs = load(root)
    cols = ["clean", "cert 0.1", "cert 0.3", "pgd 0.3"]
    print("| net | model, weights | seeds | clean | certified ε=0.1 | certified ε=0.3 | "
          "PGD-20 ε=0.3 |")
    print("|---|---|---|---|---|---|---|")
    means = {}
    for setting, weights, label in SETTINGS:
        for net, name in NETS.items():
            seeds = runs.get((net, setting, weights), {})
            if not seeds:
                continue
            vals = np.array([[metrics(seeds[s])[c] for c in cols] for s in sorted(seeds)])
            mean, std = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else 0 * vals[0]
            means[(net, label)] = (mean, std)
            cells = " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(mean, std, strict=True))
            print(f"| {name} | {label} | {len(seeds)} | {cells} |")
    print()
    print("Per seed, certified at ε = 0.1 / 0.3:")
    for (net, setting, weights), seeds in sorted(runs.items()):
        per = ", ".join(f"seed {s}: {metrics(r)['cert 0.1']:.2f} / {metrics(r)['cert 0.3']:.2f}"
                        for s, r in sorted(seeds.items()))
        print(f"- {NETS[net]}, {setting}, {weights}: {per}")
    if img:
        plot(means, os.path.join(img, "sortnet_vs_linf.png"))


def plot(means: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    labels = [label for _, _, label in SETTINGS]
    for ax, col, eps in zip(axes, (1, 2), ("0.1", "0.3"), strict=True):
        for k, (net, name) in enumerate(NETS.items()):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(labels))]
            ys = [means.get((net, lb), (np.full(4, np.nan), np.zeros(4)))[0][col] for lb in labels]
            es = [means.get((net, lb), (np.zeros(4), np.zeros(4)))[1][col] for lb in labels]
            ax.bar(xs, ys, width=0.36, yerr=es, capsize=3, label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"certified accuracy, ε = {eps} (mean ± sd over seeds)", fontsize=9)
        ax.set_ylim(60 if eps == "0.3" else 70, 95)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Offline MNIST (5,000 training images, 4 x 256 nets, 50 epochs)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
