"""One short GPU or TPU run: are the kernels right there, how fast, what does ``auto`` pick.

Prepared for the first run on a GPU (none is recorded yet: BENCHMARKS.md). In one process it

1. resolves ``auto`` on the device, which the first time compares Pallas with the XLA code per
   pass family there (values first, then time) and caches the decision per device kind, and
   records the choice (:meth:`linf_jax.ops.KernelChoice.record`);
2. checks the Pallas kernels and the XLA code against each other and a float64 NumPy reference
   on small ragged shapes: values and gradients for p = ∞, 8, 2.5 and 100, and the interval
   bounds of certification (both implementations) against float64;
3. times forward+backward of one layer at (512, 3072, 5120) with the XLA code and with Pallas
   under a small grid of :class:`linf_jax.ops.pallas.Blocks` (Triton tiles on a GPU, Mosaic
   tiles on a TPU), for p = ∞ and p = 8;
4. times the 6 × 5120 CIFAR-10 epoch of ``benchmarks/epoch_bench.py`` (p = 8, a ramp p and
   p = ∞) with the XLA code, Pallas and ``auto``;
5. times a K = 5 ensemble in one program against a Python loop over its members, training steps
   and certification (``benchmarks/ensemble_bench.py``);
6. prints the tables BENCHMARKS.md needs, writes them as JSON with ``--out``, and ends with one
   line ``GPU CHECK: PASS`` or ``FAIL``.

Each stage can be chosen (``--stages``); stages 4 and 5 run as subprocesses, each under
``--stage-timeout`` seconds, and a subprocess that fails or runs over is a failed check.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu.json          # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out r.json    # any machine

Run with ``--smoke`` on a CPU it checks itself (tests/test_benchmarks.py): the kernels run in
Pallas interpret mode, the shapes are tiny, and the epoch and ensemble stages run reduced
models.

On a GPU image with jax, flax, optax, orbax-checkpoint, absl-py, numpy, PyYAML and tqdm but no
network, two pure-Python wheels travel beside the checkout: ml-collections (the presets the
ensemble stage builds) and tensorboardX (the trainer's TensorBoard files). The library's
training and certification path imports neither at import time, nor tensorflow-datasets, which
only TFDS data sets and sliced splits (``'train[:80%]'``) need; the check's data is whole splits
of the embedded digits and synthetic arrays. Fetch the wheels where pip works:

    python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        ml-collections==1.1.0 tensorboardX==2.6.5

and on the GPU machine, before the check:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_check.py --out gpu.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from linf_jax import ops
from linf_jax.ops import pallas as distance

INF = float("inf")
SHAPES = [(5, 37, 131), (64, 300, 260), (3, 16, 7)]
PS = [INF, 8.0, 2.5, 100.0]


def np_dist(x, w, p):
    d = np.abs(np.float64(x)[:, None, :] - np.float64(w)[None, :, :])
    return d.max(-1) if p == INF else (d ** p).sum(-1) ** (1.0 / p)


def value_and_grads(fn, x, w, g):
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(g))


def check_correctness(interpret: bool, shapes) -> list[str]:
    """Failures (empty when every comparison holds)."""
    failures = []
    for (b, n, out), p in itertools.product(shapes, PS):
        rng = np.random.default_rng(b * 1000 + n + out)
        x = jnp.asarray(rng.standard_normal((b, n)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((out, n)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((b, out)), jnp.float32)
        pallas = jax.jit(lambda x, w, g, p=p: value_and_grads(
            lambda x, w: distance.pallas_dist(x, w, p, interpret=interpret), x, w, g))
        with ops.use_kernels("xla"):
            xla = jax.jit(lambda x, w, g, p=p: value_and_grads(
                lambda x, w: ops.dist(x, w, p), x, w, g))
            want = [np.asarray(a) for a in xla(x, w, g)]
        got = [np.asarray(a) for a in pallas(x, w, g)]
        name = f"(B, n, out) = {(b, n, out)}, p = {p:g}"
        rtol = 1e-6 if p == INF else 2e-4
        for label, a, c in zip(("value", "dx", "dw"), got, want, strict=True):
            if not np.allclose(a, c, rtol=rtol, atol=1e-4 if p != INF else 1e-6):
                failures.append(f"{name}: Pallas {label} differs from the XLA code by "
                                f"{np.abs(a - c).max():.3g}")
        ref = np_dist(x, w, p)
        for kernels, value in (("Pallas", got[0]), ("XLA code", want[0])):
            if not np.allclose(value, ref, rtol=1e-5 if p == INF else 1e-4, atol=1e-5):
                failures.append(f"{name}: {kernels} value differs from float64 by "
                                f"{np.abs(value - ref).max():.3g}")
    for b, n, out in shapes:  # the bounds of certification, both implementations
        rng = np.random.default_rng(7 + b)
        lo = rng.standard_normal((b, n)).astype(np.float32)
        hi = lo + rng.uniform(0, 0.5, (b, n)).astype(np.float32)
        w = rng.standard_normal((out, n)).astype(np.float32)
        l3, u3, w3 = np.float64(lo)[:, None], np.float64(hi)[:, None], np.float64(w)[None]
        ref_lo = np.maximum(np.maximum(l3 - w3, w3 - u3), 0).max(-1)
        ref_hi = np.maximum(u3 - w3, w3 - l3).max(-1)
        with ops.use_kernels("xla"):
            xla_bounds = [np.asarray(a) for a in jax.jit(ops.linf_dist_bounds)(lo, hi, w)]
        pallas_bounds = [np.asarray(a) for a in jax.jit(functools.partial(
            distance.pallas_linf_dist_bounds, interpret=interpret))(lo, hi, w)]
        for kernels, got in (("XLA code", xla_bounds), ("Pallas", pallas_bounds)):
            for label, a, c in (("lower", got[0], ref_lo), ("upper", got[1], ref_hi)):
                if not np.allclose(a, c, rtol=1e-6, atol=1e-6):
                    failures.append(f"bounds {(b, n, out)}: {kernels} {label} differs from "
                                    f"float64 by {np.abs(a - c).max():.3g}")
    return failures


def time_fn(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_grid(shape, interpret: bool, grid, repeats: int):
    """``[(p, label, ms)]``: fwd+bwd of the layer with the XLA code and with each Blocks."""
    b, n, out = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, n)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((out, n)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, out)), jnp.float32)
    rows = []
    for p in (INF, 8.0):
        loss = lambda f: jax.jit(jax.grad(lambda x, w: (f(x, w) * g).sum(), argnums=(0, 1)))
        with ops.use_kernels("xla"):
            fn = loss(lambda x, w, p=p: ops.dist(x, w, p))
            rows.append((p, "xla", 1e3 * time_fn(fn, (x, w), repeats)))
        for blocks in grid:
            fn = loss(lambda x, w, p=p, bl=blocks: distance.pallas_dist(
                x, w, p, interpret=interpret, blocks=bl))
            try:
                ms = 1e3 * time_fn(fn, (x, w), repeats)
            except Exception as err:  # a tile that does not compile on this GPU
                print(f"  {blocks}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue
            rows.append((p, blocks, ms))
    return rows


def blocks_label(bl) -> str:
    if isinstance(bl, str):
        return bl
    return f"b{bl.b} out{bl.out} n{bl.n} unroll{bl.unroll} warps{bl.num_warps}"


def run_script(name: str, args: list[str], timeout: float) -> tuple[bool, str]:
    """``(ok, the last lines of its output)`` of ``benchmarks/<name>`` run with ``args`` in a
    subprocess: ``ok`` is exit status 0 within ``timeout`` seconds (a failed or overlong run is
    a failed check, never a result)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (os.path.dirname(here), os.environ.get("PYTHONPATH"))
                           if p)  # the checkout first, the caller's path kept
    cmd = [sys.executable, os.path.join(here, name), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=path))
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        tail = "\n".join(out.strip().splitlines()[-8:])
        return False, f"FAILED (over its {timeout:g} s limit):\n{tail}"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    tail = "\n".join(lines[-8:])
    if proc.returncode != 0:
        return False, f"FAILED (exit {proc.returncode}):\n{tail}"
    return True, tail


def epoch_times(backend: str, extra: list[str], timeout: float = 600) -> tuple[bool, str]:
    """benchmarks/epoch_bench.py under ``backend`` (:func:`run_script`)."""
    return run_script("epoch_bench.py", ["--backend", backend, "--steps", "3", *extra], timeout)


STAGES = ("auto", "correctness", "tiles", "epochs", "ensemble")
# The smoke run's epoch and ensemble stages: reduced models on this machine's backend.
SMOKE_EPOCH = ["--batch", "8", "--width", "32", "--depth", "2", "--p", "8", "--rate-size", "64"]
SMOKE_ENSEMBLE = ["--sizes", "digits", "--members", "3", "--repeats", "1", "--phases", "start"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes and reduced models (a self-check on any machine)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated stages to run, of {', '.join(STAGES)}")
    ap.add_argument("--stage-timeout", type=float, default=100.0,
                    help="seconds each subprocess stage (one epoch backend, the ensemble) may "
                         "run; the default keeps the whole check within 8 minutes")
    ap.add_argument("--out", help="also write the results as one JSON file")
    args = ap.parse_args()
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in stages if x not in STAGES]
    if unknown:
        print(f"error: --stages={args.stages!r}: {unknown} not allowed; allowed: "
              f"{', '.join(STAGES)}", file=sys.stderr)
        return 2
    backend = jax.default_backend()
    interpret = backend == "cpu"
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, backend {backend} ({device}), "
          f"Pallas {'interpret mode' if interpret else 'compiled'}")
    if backend == "cpu" and not args.smoke:
        print("no GPU here: use --smoke for the self-check")
        return 2
    report = {"jax": jax.__version__, "backend": backend, "device": device,
              "smoke": args.smoke, "stages": {}}

    def stage(name, fn):
        if name not in stages:
            return
        t0 = time.perf_counter()
        ok, data = fn()
        report["stages"][name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 2),
                                  **data}

    def correctness():
        shapes = SHAPES[2:] if args.smoke else SHAPES
        failures = check_correctness(interpret, shapes)
        print(f"correctness: {len(shapes) * len(PS)} Pallas/XLA/float64 comparisons and "
              f"{2 * len(shapes)} bounds checks, {len(failures)} failures")
        for f in failures:
            print("  FAIL " + f)
        return not failures, {"failures": failures}

    def tiles():
        if args.smoke:
            shape, grid = (8, 32, 16), [distance.Blocks(b=8, out=8, n=16, unroll=2)]
        else:
            shape = (512, 3072, 5120)
            if backend == "tpu":  # Mosaic's tiling: b a multiple of 8, the rest of 128
                grid = [distance.Blocks(b=b, out=o, n=n, unroll=128)
                        for b, o, n in itertools.product((64, 128), (256, 512), (256, 512))]
            else:
                grid = [distance.Blocks(b=b, out=o, n=n, unroll=8, num_warps=wp)
                        for b, o, n, wp in itertools.product((64, 128), (64, 128), (32, 64),
                                                             (4, 8))]
        repeats = 1 if args.smoke else args.repeats
        rows = layer_grid(shape, interpret, grid, repeats)
        print(f"\nLayer forward+backward at (B, in, out) = {shape}, median of {repeats} (ms):\n")
        print("| p | kernels | ms | vs XLA |")
        print("|---|---|---|---|")
        best = {}
        for p, label, ms in rows:
            base = next(m for q, lab, m in rows if q == p and lab == "xla")
            print(f"| {p:g} | {blocks_label(label)} | {ms:.2f} | {base / ms:.2f}x |")
            if label != "xla" and (p not in best or ms < best[p][1]):
                best[p] = (label, ms)
        for p, (label, ms) in best.items():
            print(f"best Pallas tiles at p = {p:g}: {blocks_label(label)} ({ms:.2f} ms)")
        return bool(best), {
            "shape": list(shape),
            "rows": [{"p": str(p), "kernels": blocks_label(label), "ms": ms}
                     for p, label, ms in rows],
            "best": {str(p): {"kernels": blocks_label(label), "ms": ms}
                     for p, (label, ms) in best.items()}}

    def epochs():
        what = "a reduced model" if args.smoke else "the 6 x 5120 CIFAR-10 model"
        print(f"\nEpoch of {what} (benchmarks/epoch_bench.py; p = 8, a ramp p, inf):")
        runs = {}
        for name in ("xla", "auto") if args.smoke else ("xla", "pallas", "auto"):
            ran, text = epoch_times(name, SMOKE_EPOCH if args.smoke else [],
                                    args.stage_timeout)
            runs[name] = {"ok": ran, "output": text}
            print(f"--- {name}\n{text}")
        return all(r["ok"] for r in runs.values()), {"runs": runs}

    def ensemble():
        print("\nK-member ensemble in one program against a loop over members "
              "(benchmarks/ensemble_bench.py; training steps and certification):")
        ran, text = run_script("ensemble_bench.py", SMOKE_ENSEMBLE if args.smoke else [],
                               args.stage_timeout)
        print(text)
        return ran, {"output": text}

    def auto():
        # what 'auto' chooses on this device: measured here the first time (values compared
        # with the XLA code, then timed), cached per device kind afterwards
        choice = ops.resolve("auto")
        print(choice.line())
        return True, {"kernels": choice.record()}

    stage("auto", auto)
    stage("correctness", correctness)
    stage("tiles", tiles)
    stage("epochs", epochs)
    stage("ensemble", ensemble)
    ok = bool(report["stages"]) and all(st["ok"] for st in report["stages"].values())
    report["pass"] = ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")
    print("GPU CHECK: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
