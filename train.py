"""Train an ℓ∞-dist net (or an ensemble) from a config file.

    python train.py                                   # configs/default.py on the digits
    python train.py --config configs/mnist_03.py --workdir runs/mnist
    python train.py --config.model.width=1024 --config.ensemble.size=5

Every config field can be overridden on the command line. Rerunning with the same workdir
resumes from its latest checkpoint; SIGTERM/SIGINT save a checkpoint and exit.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "default.py"), "Experiment config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config name>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv) -> None:
    if len(argv) > 1:
        from linf_jax.cli import fail
        fail(f"unexpected arguments {argv[1:]}: use --flag=value")
    from absl import logging

    from linf_jax import cli, train_lib

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    result = cli.run_guarded(train_lib.train_and_evaluate, config, workdir,
                             progress=_PROGRESS.value)
    if result.preempted:
        print(f"interrupted at step {int(result.state.step)}; checkpoint saved in {workdir}. "
              "Rerun the same command to resume.")
        sys.exit(0)
    r = result.results
    print(f"workdir: {workdir}")
    print(f"EMA weights, {r['num_examples']} test examples of {config.data.source}:"
          f"{config.data.test_split}")
    print(f"  clean accuracy      {100 * r['clean_accuracy']:6.2f}%")
    for row in r["results"]:
        print(f"  eps={row['eps']:<6g} PGD-{r['pgd_steps']} {100 * row['pgd_accuracy']:6.2f}%   "
              f"certified {100 * row['certified_accuracy']:6.2f}%   "
              f"(Lipschitz rule {100 * row['lipschitz_certified_accuracy']:6.2f}%)")


if __name__ == "__main__":
    try:
        app.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
