"""Ensemble benchmark: K members in one program over the stacked pytree versus a Python loop.

Two workloads, side by side in one run, for each model size:

* certify: logits + interval margins of every test input for K members, averaged (the
  ensemble certificate). One program: one jitted call over the stacked pytree
  (:func:`linf_jax.ensemble.apply`). ``loop``: the official code's way, one jitted call per
  member, averaged on the host. Both give the same certified set (checked).
* train: one optimiser step of K independently trained members (own init, own data order).
  One program: the K-member train step of ``ensemble.mode=independent``. ``loop``: K
  single-model train steps, one after the other (K sequential runs).

The one program runs its member axis either batched (``jax.vmap``) or sequentially (``lax.map``
inside the program), ``ensemble.execution``; both are timed, and the final line reports the one
``ensemble.execution=auto`` picks on this backend (:func:`linf_jax.ensemble.resolve_execution`).

Sizes: ``digits`` (the default config: 4×512 on 8×8 inputs, batch 128, 360 test inputs) and
``mnist`` (5×1024 on 28×28 inputs, batch 128, 1,000 synthetic test inputs; the paper's 5×5120 is
too large for a CPU benchmark, ``--mnist-width 5120`` on a GPU).

    PYTHONPATH=. python benchmarks/ensemble_bench.py                 # both sizes, K = 5
    PYTHONPATH=. python benchmarks/ensemble_bench.py --sizes digits --members 5 --repeats 5

Prints a table of medians and one final line of loop / one-program ratios (> 1: the one program
is faster).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from linf_jax import certify as certify_lib
from linf_jax import data as data_lib
from linf_jax import ensemble, experiment, host, train_lib, trainer
from linf_jax.config import base_config
from linf_jax.models import build_model


def size_setup(name: str, mnist_width: int):
    cfg = base_config()
    if name == "digits":
        ds = data_lib.load("digits", "train")
        test = data_lib.load("digits", "test")
        images, labels = ds.images, ds.labels
        test_x, test_y = data_lib.as_pixels(test.images), test.labels
        meta = trainer.dataset_meta(ds)
    else:
        cfg.model.update(depth=5, width=mnist_width)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(2560, 28, 28, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2560).astype(np.int32)
        test_x = jnp.asarray(rng.random((1000, 28, 28, 1)), jnp.float32)
        test_y = rng.integers(0, 10, size=1000).astype(np.int32)
        meta = {"source": "synthetic-mnist", "input_shape": [28, 28, 1], "num_classes": 10,
                "mean": [0.1307], "std": 0.3081, "augment": "none"}
    return cfg, jnp.asarray(images), jnp.asarray(labels), test_x, jnp.asarray(test_y), meta


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_certify(cfg, meta, test_x, test_y, k: int, repeats: int, eps_pixels: float = 0.1):
    model = build_model(cfg.model, meta["num_classes"])
    x0 = jnp.zeros((1, *meta["input_shape"]), jnp.float32)
    members = []
    for s in range(k):
        v = model.init(jax.random.key(s), x0, p=float("inf"), train=False)
        members.append(v)
    stacked = ensemble.stack(members)
    mean = jnp.asarray(meta["mean"], jnp.float32)
    std = meta["std"]
    plo, phi = data_lib.pixel_bounds(meta["mean"], std)
    eps = eps_pixels / std

    def member_outputs(v, x, y):
        xn = data_lib.normalize(x, mean, std)
        lo, hi = certify_lib.input_box(xn, eps, plo, phi)
        return model.apply(v, xn), model.apply(v, lo, hi, y, method="certify_margins")

    one = jax.jit(member_outputs)
    programs = {ex: jax.jit(lambda s, x, y, ex=ex: ensemble.mean_over_members(
        member_outputs, s, x, y, execution=ex)) for ex in ("sequential", "batched")}

    def finish(logits, margins):
        return certify_lib.interval_certified(margins, test_y) & (logits.argmax(-1) == test_y)

    def run(ex):
        return lambda: finish(*programs[ex](stacked, test_x, test_y))

    def run_loop():
        outs = [one(v, test_x, test_y) for v in members]
        return finish(sum(o[0] for o in outs) / k, sum(o[1] for o in outs) / k)

    ref = np.asarray(run_loop())
    agree = min(float((np.asarray(run(ex)()) == ref).mean()) for ex in programs)
    return (timed(run_loop, repeats), timed(run("sequential"), repeats),
            timed(run("batched"), repeats), agree)


def at_step(state, step: int):
    """The state as if ``step`` steps had been taken: the train step's counter (which drives p,
    the ℓp decay and the learning rate) and Adam's count (its bias correction)."""
    opt_state = jax.tree.map(
        lambda a: jnp.full_like(a, step) if jnp.issubdtype(a.dtype, jnp.integer) else a,
        state.opt_state)
    return state.replace(step=jnp.asarray(step, jnp.int32), opt_state=opt_state)


def bench_train(cfg, meta, images, labels, k: int, repeats: int, p_mode: str):
    cfg = cfg.copy_and_resolve_references()
    cfg.train.epochs = (0, 1, 1, 2, 3)
    spe = len(labels) // cfg.train.batch_size
    schedule = experiment.make_schedule(cfg, spe, meta["std"])
    tx = experiment.make_optimizer(cfg, schedule)
    model = build_model(cfg.model, meta["num_classes"])
    shape = tuple(meta["input_shape"])
    bs = cfg.train.batch_size
    step_at = {"start": 0, "ramp": spe + 1, "inf": 2 * spe}[p_mode]

    single_cfg = cfg.copy_and_resolve_references()
    single_cfg.ensemble.size = 1
    single_step = train_lib.make_train_step(single_cfg, schedule, meta)
    singles = []
    for s in range(k):
        c = single_cfg.copy_and_resolve_references()
        c.seed = s
        st = train_lib.create_train_state(c, model, shape, tx)
        singles.append(at_step(st, step_at))
    idx = jnp.arange(bs)

    ens_steps = {}
    for ex in ("sequential", "batched"):
        ens_cfg = cfg.copy_and_resolve_references()
        ens_cfg.ensemble.update(size=k, mode="independent", execution=ex)
        ens_steps[ex] = train_lib.make_train_step(ens_cfg, schedule, meta)
    ens_state = train_lib.create_train_state(ens_cfg, model, shape, tx)
    ens_state = at_step(ens_state, step_at)
    ens_idx = jnp.tile(idx, (k, 1))

    def run_loop():
        return [single_step(s, images, labels, idx, p_mode)[1]["loss"] for s in singles]

    def run(ex):
        return lambda: ens_steps[ex](ens_state, images, labels, ens_idx, p_mode)[1]["loss"]

    return (timed(run_loop, repeats), timed(run("sequential"), repeats),
            timed(run("batched"), repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="digits,mnist")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mnist-width", type=int, default=1024)
    ap.add_argument("--phases", default="start,inf", help="train p phases: start (p=8), ramp, inf")
    args = ap.parse_args()
    tuned = host.tune_allocator()  # as train.py / certify.py do (linf_jax/host.py)
    k = args.members
    print(f"# ensemble_bench: K={k}, jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}, "
          f"malloc tuned: {'yes' if tuned else 'no'}")
    rows, ratios = [], []
    for name in args.sizes.split(","):
        cfg, images, labels, test_x, test_y, meta = size_setup(name, args.mnist_width)
        auto = ensemble.resolve_execution("auto")
        loop, seq, bat, agree = bench_certify(cfg, meta, test_x, test_y, k, args.repeats)
        rows.append((name, f"certify {len(test_y)} inputs", loop, seq, bat, auto,
                     f"{100 * agree:.1f}%"))
        ratios.append(f"{name}/certify {loop / (seq if auto == 'sequential' else bat):.2f}x")
        auto = ensemble.resolve_execution("auto", training=True)
        for phase in args.phases.split(","):
            loop, seq, bat = bench_train(cfg, meta, images, labels, k, args.repeats, phase)
            label = {"start": "p=8", "ramp": "p ramp", "inf": "p=inf"}[phase]
            rows.append((name, f"train step ({label})", loop, seq, bat, auto, ""))
            ratios.append(f"{name}/train {label} "
                          f"{loop / (seq if auto == 'sequential' else bat):.2f}x")
    print(f"| size | workload (K={k}) | Python loop ms | one program, sequential ms "
          "| one program, batched ms | loop/sequential | loop/batched | auto | same certified |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name, work, loop, seq, bat, auto, agree in rows:
        print(f"| {name} | {work} | {1e3 * loop:.1f} | {1e3 * seq:.1f} | {1e3 * bat:.1f} "
              f"| {loop / seq:.2f}x | {loop / bat:.2f}x | {auto} | {agree} |")
    print("ratios (loop / one program with ensemble.execution=auto): " + ", ".join(ratios))


if __name__ == "__main__":
    main()
