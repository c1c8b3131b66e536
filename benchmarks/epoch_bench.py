"""Epoch-time benchmark: one CIFAR-10-sized epoch of the 6×5120 ℓ∞-dist Net.

Times the training step — forward + backward of the pure ℓ∞-dist Net (``build_model`` with
``name='linf_dist_net', depth=6, width=5120, head='none'``, 32×32×3 inputs, 10 classes), the
hinge loss on the worst-case margins, and the optimiser step (``optim.make_optimizer``: Adam +
ℓp-aware decoupled decay, scheduled lr) — at p = 8 (integer-power path, static p as in the first
training phase), p = 100 (exp/log path, traced p as in the ramp phase) and p = ∞ (static), on
synthetic device-resident inputs (no data loading, augmentation or parameter EMA). A few steps
are timed and extrapolated to one epoch of 50,000 inputs (98 steps at batch 512).

Beside each time it prints a floor: the element operations of the distance layers
(``B·in·out`` per layer, times the elementwise ops one element needs in forward + backward; see
``OPS_PER_ELEMENT``) divided by this device's measured rate for a simple fused elementwise chain.
exp and log count as one op each, so the floor is optimistic for general p.

    PYTHONPATH=. python benchmarks/epoch_bench.py                         # the full model (GPU)
    PYTHONPATH=. python benchmarks/epoch_bench.py --width 512 --steps 2   # small, on a CPU
    PYTHONPATH=. python benchmarks/epoch_bench.py --backend pallas        # Pallas kernels, GPU

``--backend`` sets ``LINF_JAX_KERNELS`` (default ``auto``, the library's choice: on the CPU the
native custom calls where measured faster, on a GPU or TPU Pallas or the XLA code per pass
family as measured on the device). Pallas on a CPU runs in interpret mode and is only a
correctness check, not a timing.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

INF = float("inf")
EPOCH_INPUTS = 50_000
INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
EPS_TRAIN = 0.1568 / 0.2009  # CIFAR-10 8/255 training ε, normalised units

# Elementwise ops per (b, o, i) element, forward + backward, the cheapest form of each pass:
OPS_PER_ELEMENT = {
    # forward: sub, abs, compare, select max, select arg-max; backward: a B×out scatter (0)
    "inf": 5,
    # forward max pass: sub, abs, max (3); sum pass: sub, abs, ·1/m, 3 squarings, add (7);
    # backward: sub, abs, ·1/y, max TINY, t^7 (4 muls), sign, 2 muls, 2 accumulating adds (13)
    "int": 23,
    # forward 3 + (sub, abs, ·1/m, log, ·p, exp, add) = 10; backward: sub, abs, ·1/y, max TINY,
    # log, ·(p-1), exp, sign, 2 muls, 2 adds = 12 (exp, log: one op each)
    "general": 22,
}


def p_name(p: float) -> str:
    return "inf" if p == INF else f"{p:g}"


def p_kind(p: float) -> str:
    if p == INF:
        return "inf"
    return "int" if float(p).is_integer() and p <= 8 else "general"


def layer_shapes(width: int, depth: int) -> list[tuple[int, int]]:
    """(in, out) of each ℓ∞-dist layer of the pure net."""
    n_in = math.prod(INPUT_SHAPE)
    dims = [n_in] + [width] * (depth - 1) + [NUM_CLASSES]
    return list(zip(dims[:-1], dims[1:], strict=True))


def elementwise_rate(n: int, reps: int = 64, trials: int = 10) -> float:
    """Measured elementwise ops/s of one fused loop ``m_r = max(m_r, |x − c_k|)`` (3 ops per k,
    ``reps`` values of k over 4 independent accumulators, so latency does not bound it)."""

    @jax.jit
    def chain(x, c):
        acc = [jnp.zeros_like(x)] * 4
        for k in range(reps):
            acc[k % 4] = jnp.maximum(acc[k % 4], jnp.abs(x - c[k]))
        return jnp.maximum(jnp.maximum(acc[0], acc[1]), jnp.maximum(acc[2], acc[3]))

    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    c = jax.random.normal(jax.random.PRNGKey(1), (reps,), jnp.float32)
    jax.block_until_ready(chain(x, c))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(x, c))
        times.append(time.perf_counter() - t0)
    return (3 * reps + 3) * n / min(times)


def build_step(model, schedule, p, traced_p: bool):
    from linf_jax import losses
    from linf_jax.optim import make_optimizer

    def loss_fn(params, batch_stats, x, y, p):
        (logits, margins), new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, p=p, train=True,
            eps=EPS_TRAIN, labels=y, mutable=["batch_stats"])
        return losses.hinge_loss(margins, 0.75), new["batch_stats"]

    def step(params, batch_stats, opt_state, x, y, p):
        (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y, p)
        # The ℓp decay at the p of this step, as the train step passes it (at p = ∞ its exp/log
        # branch is skipped); the lr of step 0.
        tx = make_optimizer(schedule, weight_decay=5e-3)
        updates, opt_state = tx.update(grads, opt_state, params, p=p, step=0)
        return optax.apply_updates(params, updates), bs, opt_state, loss

    if traced_p:
        return jax.jit(step)
    return jax.jit(lambda params, bs, opt, x, y, _p: step(params, bs, opt, x, y, p))


def run(args) -> list[dict]:
    from linf_jax.models import build_model
    from linf_jax.optim import make_optimizer
    from linf_jax.schedules import Schedule

    steps_per_epoch = math.ceil(EPOCH_INPUTS / args.batch)
    model = build_model(dict(name="linf_dist_net", depth=args.depth, width=args.width,
                             head="none"), NUM_CLASSES)
    schedule = Schedule(epochs=(0, 100, 100, 750, 800), steps_per_epoch=steps_per_epoch,
                        lr=0.02, eps_train=EPS_TRAIN)
    tx = make_optimizer(schedule, weight_decay=5e-3)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (args.batch, *INPUT_SHAPE), jnp.float32)
    y = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, NUM_CLASSES)
    variables = jax.jit(lambda k: model.init(k, x[:1], p=INF, train=False))(
        jax.random.fold_in(key, 2))
    params, bs = variables["params"], variables["batch_stats"]
    opt_state = jax.jit(tx.init)(params)

    elements = args.batch * sum(i * o for i, o in layer_shapes(args.width, args.depth))
    rate = elementwise_rate(args.rate_size)
    rows = []
    for p in args.p:
        traced = p_kind(p) == "general"  # the ramp phase of training traces p
        fn = build_step(model, schedule, p, traced)
        pa = jnp.float32(p)
        t0 = time.perf_counter()
        compiled = fn.lower(params, bs, opt_state, x, y, pa).compile()
        compile_s = time.perf_counter() - t0
        state = (params, bs, opt_state)
        out = compiled(*state, x, y, pa)  # warm-up
        jax.block_until_ready(out)
        state = out[:3]
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = compiled(*state, x, y, pa)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            state = out[:3]
        loss = float(out[3])
        step_s = statistics.median(times)
        floor_step = elements * OPS_PER_ELEMENT[p_kind(p)] / rate
        rows.append(dict(p=p, step_s=step_s, epoch_s=step_s * steps_per_epoch,
                         floor_s=floor_step * steps_per_epoch, compile_s=compile_s,
                         loss=loss, finite=bool(np.isfinite(loss))))
    return rows, dict(rate=rate, elements=elements, steps_per_epoch=steps_per_epoch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per p (after a warm-up)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--width", type=int, default=5120)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--backend", choices=["native", "xla", "pallas", "auto"], default=None,
                    help="force LINF_JAX_KERNELS (default: the library's choice: native "
                         "kernels where measured faster on a CPU, the XLA code on GPU/TPU)")
    ap.add_argument("--p", type=float, nargs="+", default=[8.0, 100.0, INF])
    ap.add_argument("--rate-size", type=int, default=None,
                    help="elements of the elementwise-rate probe (default 2^20 CPU, 2^26 GPU)")
    args = ap.parse_args(argv)
    if args.backend:
        os.environ["LINF_JAX_KERNELS"] = args.backend
    if args.rate_size is None:
        args.rate_size = 2**20 if jax.default_backend() == "cpu" else 2**26

    from linf_jax import host, ops

    tuned = host.tune_allocator()  # as train.py / certify.py do (linf_jax/host.py)
    backend = ops.kernel_backend()
    dev = jax.devices()[0]
    full = (args.width, args.depth, args.batch) == (5120, 6, 512)
    print(f"# {datetime.date.today()}  jax {jax.__version__}  device: {dev.device_kind} "
          f"({jax.default_backend()}), host {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, malloc tuned: {'yes' if tuned else 'no'}")
    print(f"# model: {args.depth}×{args.width} ℓ∞-dist Net, batch {args.batch}, kernels: "
          f"{backend}{' (interpret mode)' if backend == 'pallas' and dev.platform == 'cpu' else ''}"
          f"{'' if full else '  [REDUCED SIZE: not the 6×5120 / batch-512 figure]'}")
    rows, info = run(args)
    print(f"# distance-layer elements per step: {info['elements'] / 1e9:.2f} G; measured "
          f"elementwise rate: {info['rate'] / 1e9:.1f} G ops/s; {info['steps_per_epoch']} "
          f"steps/epoch; median of {args.steps} steps")
    print(f"{'p':>6} {'ops/elem':>8} {'step ms':>9} {'epoch s':>9} {'floor s':>9} "
          f"{'x floor':>8} {'compile s':>9}  loss")
    for r in rows:
        print(f"{p_name(r['p']):>6} {OPS_PER_ELEMENT[p_kind(r['p'])]:>8} "
              f"{r['step_s'] * 1e3:>9.1f} {r['epoch_s']:>9.2f} {r['floor_s']:>9.2f} "
              f"{r['epoch_s'] / r['floor_s']:>8.1f} {r['compile_s']:>9.1f}  "
              f"{r['loss']:.4f}{'' if r['finite'] else ' NON-FINITE'}")
    summary = ", ".join(
        f"p={p_name(r['p'])} {r['epoch_s']:.2f} s ({r['epoch_s'] / r['floor_s']:.1f}× floor)"
        for r in rows)
    print(f"epoch time ({backend}, {args.depth}×{args.width}, batch {args.batch}): {summary}")


if __name__ == "__main__":
    main()
