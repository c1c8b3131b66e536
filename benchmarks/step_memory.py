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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from linf_jax import experiment, train_lib  # noqa: E402
from linf_jax.models import build_model  # noqa: E402

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
    meta = {"mean": [0.5] * shape[-1], "std": 0.25, "input_shape": list(shape),
            "num_classes": 10, "augment": "none"}
    schedule = experiment.make_schedule(cfg, 10, meta["std"])
    tx = experiment.make_optimizer(cfg, schedule)
    model = build_model(cfg.model, 10)
    state = jax.eval_shape(lambda: train_lib.create_train_state(cfg, model, shape, tx))
    images = jax.ShapeDtypeStruct((1000, *shape), jnp.uint8)
    labels = jax.ShapeDtypeStruct((1000,), jnp.int32)
    idx = jax.ShapeDtypeStruct((cfg.train.batch_size,), jnp.int32)
    step = train_lib.make_train_step(cfg, schedule, meta, donate=donate)
    m = step.lower(state, images, labels, idx, p_phase="inf").compile().memory_analysis()
    footprint = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
    state_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
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
