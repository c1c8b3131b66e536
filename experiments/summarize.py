"""Markdown table of an experiments/mnist_local.sh run: clean, PGD and certified accuracy at every
ε, EMA and raw weights side by side, for each run folder.

    python experiments/summarize.py [runs/mnist_local]
"""

from __future__ import annotations

import json
import os
import sys

ORDER = ["single", "joint_k3", "independent_k3", "joint_k5", "independent_k5"]


def main(root: str = "runs/mnist_local") -> None:
    names = [n for n in ORDER if os.path.isdir(os.path.join(root, n))]
    names += sorted(n for n in os.listdir(root)
                    if n not in names and os.path.isdir(os.path.join(root, n)))
    rows = []
    eps_all: list[float] = []
    for name in names:
        for weights in ("ema", "raw"):
            path = os.path.join(root, name, f"certify_{weights}.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                r = json.load(f)
            by_eps = {row["eps"]: row for row in r["results"]}
            eps_all = sorted(set(eps_all) | set(by_eps))
            rows.append((name, weights, r, by_eps))
    head = "| run | members | weights | clean | " + " | ".join(
        f"PGD ε={e:g} | certified ε={e:g} (Lipschitz)" for e in eps_all) + " |"
    print(head)
    print("|" + "---|" * (4 + 2 * len(eps_all)))
    for name, weights, r, by_eps in rows:
        cells = []
        for e in eps_all:
            row = by_eps.get(e)
            cells += (["—", "—"] if row is None else [
                f"{100 * row['pgd_accuracy']:.2f}%",
                f"**{100 * row['certified_accuracy']:.2f}%** " + (
                    "(n/a)" if row.get("lipschitz_certified_accuracy") is None
                    else f"({100 * row['lipschitz_certified_accuracy']:.2f}%)")])
        print(f"| {name} | {r.get('members', 1)} | {weights} | "
              f"{100 * r['clean_accuracy']:.2f}% | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
