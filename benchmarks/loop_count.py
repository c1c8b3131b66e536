"""Sequential loop iterations of the CIFAR-10 6 × 5120 train step and of one wide layer, lowered
for a GPU (``cuda``) and a TPU from this host (:func:`linf_jax.lowering.loop_iterations`).

Each iteration of a loop in an XLA program launches its body's kernels one after the other; on
a GPU or a TPU a step of many thousands of them is bound by launches, not arithmetic. The XLA
code is shaped per lowering platform (:mod:`linf_jax.ops.xla`); Pallas kernels are one launch
each, with their own loops inside (``kernel``: per kernel instance, plus the grid's steps on a
TPU, where a grid runs sequentially).

Nothing is computed or allocated: the programs are traced from abstract shapes, so this runs on
any machine in a few seconds.

    PYTHONPATH=. python benchmarks/loop_count.py
    PYTHONPATH=. python benchmarks/loop_count.py --kernels xla pallas --platforms cuda tpu cpu
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from linf_jax import experiment, lowering, ops, train_lib  # noqa: E402
from linf_jax.models import build_model  # noqa: E402

INF = float("inf")
PHASES = {"start": "p = 8", "ramp": "ramp p (traced)", "inf": "p = ∞"}
#: Targets of the GPU/TPU programs with the default kernels.
STEP_TARGET, LAYER_TARGET = 1000, 160


def abstract_inputs(cfg, shape, batch: int, members: int | None = None):
    """``(schedule, meta, args)`` of the train step of config ``cfg`` on 10-class inputs of
    ``shape`` (an independent ensemble of ``members``): ``args`` are ``(state, images, labels,
    batch_idx)`` as ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    if members:
        cfg.ensemble.update(size=members, mode="independent")
    meta = {"mean": [0.5] * shape[-1], "std": 0.25, "input_shape": list(shape),
            "num_classes": 10, "augment": "none"}
    schedule = experiment.make_schedule(cfg, 98, meta["std"])
    tx = experiment.make_optimizer(cfg, schedule)
    model = build_model(cfg.model, 10)
    state = jax.eval_shape(lambda: train_lib.create_train_state(cfg, model, shape, tx))
    idx = (batch,) if not members else (members, batch)
    args = (state, jax.ShapeDtypeStruct((1000, *shape), jnp.uint8),
            jax.ShapeDtypeStruct((1000,), jnp.int32), jax.ShapeDtypeStruct(idx, jnp.int32))
    return schedule, meta, args


def abstract_step(cfg, shape, batch: int, members: int | None = None):
    """``(step_fn(state, images, labels, batch_idx, p_phase), args)``: the train step of
    :func:`abstract_inputs`, unjitted, and its abstract arguments."""
    schedule, meta, args = abstract_inputs(cfg, shape, batch, members)
    return train_lib.bind_train_step(cfg, schedule, meta), args


def cifar_step():
    """The CIFAR-10 6 × 5120 preset's train step (batch 512) and abstract arguments."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "cifar10_8.py")
    spec = importlib.util.spec_from_file_location("cifar10_8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    return abstract_step(cfg, (32, 32, 3), cfg.train.batch_size)


def layer(p):
    """Forward+backward of one 512 × 5120 → 5120 layer; p = 'traced' as in the ramp."""

    def grads(x, w, q):
        return jax.grad(lambda x, w: ops.dist(x, w, q).sum(), argnums=(0, 1))(x, w)

    if p == "traced":
        return lambda x, w: grads(x, w, jnp.float32(37.5) + 0 * x[0, 0])
    return lambda x, w: grads(x, w, p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["auto", "pallas"],
                        choices=["auto", "xla", "pallas"])
    parser.add_argument("--platforms", nargs="+", default=["cuda", "tpu"],
                        choices=["cuda", "rocm", "tpu", "cpu"])
    args = parser.parse_args(argv)
    step, step_args = cifar_step()
    x = jax.ShapeDtypeStruct((512, 5120), jnp.float32)
    w = jax.ShapeDtypeStruct((5120, 5120), jnp.float32)
    print(f"jax {jax.__version__}; traced on {jax.default_backend()}, nothing computed")
    print("| program | kernels | platform | program loop iterations | in-kernel iterations |")
    print("|---|---|---|---|---|")
    worst = {}
    for kernels in args.kernels:
        with ops.use_kernels(kernels):
            for platform in args.platforms:
                rows = [(f"CIFAR-10 6×5120 step, {PHASES[ph]}",
                         functools.partial(lowering.loop_iterations,
                                           functools.partial(step, p_phase=ph), *step_args),
                         STEP_TARGET) for ph in PHASES]
                rows += [(f"512×5120→5120 layer fwd+bwd, p = {'∞' if p == INF else p}",
                          functools.partial(lowering.loop_iterations, layer(p), x, w),
                          LAYER_TARGET) for p in (INF, 8.0, "traced")]
                for name, count_fn, target in rows:
                    count = count_fn(platform=platform)
                    print(f"| {name} | {kernels} | {platform} | {count.program:,} | "
                          f"{count.kernel:,} |")
                    key = (kernels, platform, target)
                    worst[key] = max(worst.get(key, 0), count.program)
    summary = [f"{k} {pl}: {v:,} (target {t:,})" for (k, pl, t), v in worst.items()
               if pl != "cpu"]
    print("worst program loop iterations per step / per layer: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
