"""Memory of one train step, with and without donating the state: the compiled program's own
account (``memory_analysis``: arguments + outputs + temporaries − what the outputs alias), for
the default digits model and the 6 × 5120 CIFAR-10 preset, compiled for this machine from
abstract shapes (nothing is allocated, so the big model needs no big machine).

    PYTHONPATH=. python benchmarks/step_memory.py
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loop_count import abstract_inputs  # noqa: E402  (this folder: the script's own path)

from linf_jax import train_lib  # noqa: E402

MODELS = [("default (4 x 512, digits)", "configs/default.py", (8, 8, 1)),
          ("cifar10_8 (6 x 5120, CIFAR-10)", "configs/cifar10_8.py", (32, 32, 3))]
MIB = 2**20


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def step_footprint(cfg, shape, donate: bool) -> tuple[int, int, int]:
    """``(footprint, aliased, state)`` bytes of one compiled train step at p = ∞."""
    schedule, meta, args = abstract_inputs(cfg, shape, cfg.train.batch_size)
    step = train_lib.make_train_step(cfg, schedule, meta, donate=donate)
    m = step.lower(*args, p_phase="inf").compile().memory_analysis()
    footprint = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
    state_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args[0]))
    return footprint, m.alias_size_in_bytes, state_bytes


def main() -> None:
    print(f"jax {jax.__version__} ({jax.default_backend()})")
    print("| model | state | step without donation | step with donation | aliased |")
    print("|---|---|---|---|---|")
    for name, path, shape in MODELS:
        cfg = load_config(path)
        plain, _, state = step_footprint(cfg, shape, donate=False)
        donated, aliased, _ = step_footprint(cfg, shape, donate=True)
        print(f"| {name} | {state / MIB:.0f} MiB | {plain / MIB:.0f} MiB | "
              f"{donated / MIB:.0f} MiB | {aliased / MIB:.0f} MiB |")


if __name__ == "__main__":
    main()
