"""Layer-kernel benchmark: linf_jax.ops.dist against naive JAX autodiff and torch.cdist.

For each shape (B, in, out) and p in {inf, 8, 100, 1000}, times the forward pass and the
forward+backward pass (gradients of ``sum(dist(x, w, p) * g)`` with respect to x and w) of

* ours:  ``linf_jax.ops.dist`` as dispatched by default (``linf_jax.ops.kernel_backend``: on
  the CPU the native custom-call kernels of linf_jax/native for ℓ∞ and the ℓp max pass), jitted;
* ours-xla: the same with ``LINF_JAX_KERNELS=xla`` (blocked scans, custom VJPs; the kernels used
  where the native ones cannot build, and on accelerators);
* naive: broadcast-and-reduce over a ``[B, out, in]`` tensor under plain ``jax.grad``, jitted;
* torch: ``torch.cdist`` with the same p, ``backward(g)`` (optional: skipped without torch);
* native-ISA (``--variants avx512,avx2,generic`` or ``all``): the native kernels built for that
  instruction set (``LINF_JAX_NATIVE_ISA``), each timed in its own subprocess on this machine,
  so one AVX-512 machine shows the AVX-512, AVX2 and baseline builds side by side.

Prints a table of medians (ms) and G-elements/s (``B·in·out / time``), then one line of
speed-up ratios and one of each p's forward+backward time over ℓ∞'s (what the p ramp costs).
Compilation is excluded (compiled ahead of time, plus one warm-up call). A method slower than
``--slow-s`` on its warm-up call is timed once more only; the naive version is skipped above
``--naive-max-elements`` (it materialises several ``B·out·in`` float32 tensors).

    PYTHONPATH=. python benchmarks/layer_bench.py            # every shape
    PYTHONPATH=. python benchmarks/layer_bench.py --quick    # (512, 1024, 1024) only
    PYTHONPATH=. python benchmarks/layer_bench.py --quick --variants all
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from linf_jax import native, ops

SHAPES = [(512, 1024, 1024), (128, 784, 5120), (512, 3072, 5120)]
PS = [float("inf"), 8.0, 100.0, 1000.0]
METHODS = ["ours", "ours-xla", "naive", "torch"]
PASSES = ["fwd", "fwd+bwd"]


def parse_shape(s: str) -> tuple[int, int, int]:
    b, n, out = (int(v) for v in s.lower().split("x"))
    return b, n, out


def p_name(p: float) -> str:
    return "inf" if p == float("inf") else f"{p:g}"


# --------------------------------------------------------------------------------------------
# The three implementations; each builder returns a zero-argument callable that runs one step
# and blocks until it is done.
# --------------------------------------------------------------------------------------------


def naive_dist(x, w, p):
    a = jnp.abs(x[:, None, :] - w[None, :, :])
    if p == float("inf"):
        return a.max(-1)
    return (a**p).sum(-1) ** (1.0 / p)


def build_jax(dist_fn, x, w, g, p, backward, kernels=None):
    if backward:
        loss = lambda x, w: (dist_fn(x, w, p) * g).sum()
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    else:
        fn = jax.jit(lambda x, w: dist_fn(x, w, p))
    with ops.use_kernels(kernels):  # traced here; a fresh function, so no cached trace is reused
        compiled = fn.lower(x, w).compile()
    return lambda: jax.block_until_ready(compiled(x, w))


def build_torch(torch, x, w, g, p, backward):
    xt, wt, gt = (torch.from_numpy(np.array(a)) for a in (x, w, g))  # writable copies
    if not backward:
        def run():
            with torch.no_grad():
                return torch.cdist(xt, wt, p=p)
        return run
    xt.requires_grad_(True)
    wt.requires_grad_(True)

    def run():
        xt.grad = wt.grad = None
        y = torch.cdist(xt, wt, p=p)
        y.backward(gt)
        return xt.grad, wt.grad
    return run


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_it(run, repeats: int, slow_s: float) -> tuple[float, int]:
    """Median seconds over ``repeats`` runs after one warm-up; a single timed run when the warm-up
    took longer than ``slow_s``. Returns ``(seconds, runs timed)``."""
    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    n = 1 if warm > slow_s else repeats
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def runnable_variants(spec: str) -> list[str]:
    """The native build variants named by ``--variants`` that this CPU can run."""
    if not spec:
        return []
    names = list(native.ISA_CHOICES[1:]) if spec == "all" else spec.split(",")
    out = []
    for name in names:
        try:
            native.NativeBuild.from_environment(requested_isa=name).isa()
            out.append(name)
        except ValueError as err:
            print(f"variant {name}: skipped ({err})")
    return out


def time_variant(variant: str, args) -> dict:
    """``{(shape, p, pass): (seconds, note)}`` of the native kernels built for ``variant``,
    timed in a subprocess (one process holds one build of the kernels)."""
    cmd = [sys.executable, __file__, "--emit-json", "--no-torch", "--no-xla", "--no-naive",
           "--shapes", args.shapes, "--ps", args.ps, "--repeats", str(args.repeats),
           "--slow-s", str(args.slow_s)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, **{native.ISA_ENV: variant, ops.KERNELS_ENV: "native"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"variant {variant}: failed ({proc.stderr.strip().splitlines()[-1:]})")
        return {}
    cells = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(tuple(c[0]), c[1], c[2]): (c[3], c[4]) for c in cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                    help="comma-separated BxINxOUT shapes (default: all three)")
    ap.add_argument("--quick", action="store_true", help="only the first shape")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    ap.add_argument("--slow-s", type=float, default=5.0,
                    help="a method whose warm-up call takes longer is timed once only")
    ap.add_argument("--naive-max-elements", type=float, default=2.0**30,
                    help="skip the naive version above this many B*in*out elements (memory)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.cdist columns")
    ap.add_argument("--no-xla", action="store_true",
                    help="skip the ours-xla column (ours with LINF_JAX_KERNELS=xla)")
    ap.add_argument("--ps", default=",".join(p_name(p) for p in PS),
                    help="comma-separated p values (default inf,8,100,1000)")
    ap.add_argument("--variants", default="",
                    help="native builds to time too, each in a subprocess: comma-separated "
                         f"from {', '.join(native.ISA_CHOICES[1:])}, or 'all'")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive column")
    ap.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    if args.quick:
        shapes = shapes[:1]
    ps = [float(p) for p in args.ps.split(",")]

    torch = None
    if not args.no_torch:
        # torch's OpenMP threads spin for a while after each call and would steal the CPU from
        # the JAX timing that follows; passive waiting lets them sleep.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch  # noqa: PLC0415 (optional dependency)
        except ImportError:
            print("torch is not installed: the torch.cdist columns are skipped "
                  "(pip install -r requirements-bench.txt)")
    methods = [m for m in METHODS if (m != "torch" or torch is not None)
               and (m != "ours-xla" or not args.no_xla) and (m != "naive" or not args.no_naive)]
    variants = {v: time_variant(v, args) for v in runnable_variants(args.variants)}
    methods += [f"native-{v}" for v in variants]

    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "")
          + f", python {platform.python_version()}, repeats {args.repeats}, "
          f"ours = {ops.kernel_backend()} kernels")

    rows = []  # (shape, p, pass, {method: (seconds or None, note)})
    for shape in shapes:
        b, n, out = shape
        elems = b * n * out
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(out, n)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(b, out)), jnp.float32)
        for p in ps:
            for backward in (False, True):
                cells = {}
                for method in methods:
                    if method.startswith("native-"):
                        cells[method] = variants[method[7:]].get(
                            (shape, p, PASSES[backward]), (None, "failed"))
                        continue
                    if method == "naive" and elems > args.naive_max_elements:
                        cells[method] = (None, "skipped (memory)")
                        continue
                    if method == "ours":
                        run = build_jax(ops.dist, x, w, g, p, backward)
                    elif method == "ours-xla":
                        run = build_jax(ops.dist, x, w, g, p, backward, kernels="xla")
                    elif method == "naive":
                        run = build_jax(naive_dist, x, w, g, p, backward)
                    else:
                        run = build_torch(torch, x, w, g, p, backward)
                    sec, nrun = time_it(run, args.repeats, args.slow_s)
                    cells[method] = (sec, "" if nrun == args.repeats else f"x{nrun}")
                    del run
                row = (shape, p, PASSES[backward], cells)
                rows.append(row)
                if not args.emit_json:
                    print_row(row, methods, header=len(rows) == 1)

    if args.emit_json:  # for time_variant
        print(json.dumps([[list(r[0]), r[1], r[2], *r[3]["ours"]] for r in rows]))
        return
    print()
    print_table(rows, methods)
    print()
    print(ratio_line(rows, methods))
    print(p_ratio_line(rows, methods))


def fmt_cell(cell, elems):
    sec, note = cell
    if sec is None:
        return note, "-"
    ms = f"{sec * 1e3:.1f}" + (f" ({note})" if note else "")
    return ms, f"{elems / sec / 1e9:.2f}"


def table_lines(rows, methods):
    head = ["shape (B, in, out)", "p", "pass"]
    head += [f"{m} ms" for m in methods] + [f"{m} Gel/s" for m in methods]
    head += [f"ours vs {m}" for m in methods if m != "ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, p, pas, cells in rows:
        elems = int(np.prod(shape))
        f = {m: fmt_cell(cells[m], elems) for m in methods}
        cols = [f"{shape}", p_name(p), pas]
        cols += [f[m][0] for m in methods] + [f[m][1] for m in methods]
        cols += [speedup(cells["ours"], cells[m]) for m in methods if m != "ours"]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def print_row(row, methods, header):
    lines = table_lines([row], methods)
    for line in (lines if header else lines[2:]):
        print(line, flush=True)


def print_table(rows, methods):
    print("Medians (ms; '(x1)' = timed once, slower than --slow-s) and G-elements/s:")
    for line in table_lines(rows, methods):
        print(line)


def speedup(ours, other) -> str:
    if ours[0] is None or other[0] is None:
        return "-"
    return f"{other[0] / ours[0]:.1f}x"


def ratio_line(rows, methods) -> str:
    parts = []
    for shape, p, pas, cells in rows:
        vs = [f"{speedup(cells['ours'], cells[m])} vs {m}" for m in methods if m != "ours"]
        parts.append(f"{'x'.join(map(str, shape))} p={p_name(p)} {pas}: " + ", ".join(vs))
    return "RATIOS (ours faster by) " + "; ".join(parts)


def p_ratio_line(rows, methods) -> str:
    """Each p's forward+backward time over ℓ∞'s, per shape and method: what the p ramp costs
    against the final phase."""
    parts = []
    for shape in dict.fromkeys(r[0] for r in rows):
        full = {p: cells for s_, p, pas, cells in rows if s_ == shape and pas == "fwd+bwd"}
        base = full.get(float("inf"))
        if base is None:
            continue
        for m in methods:
            if base[m][0] is None:
                continue
            ratios = [f"p={p_name(p)} {cells[m][0] / base[m][0]:.1f}x" for p, cells in full.items()
                      if p != float("inf") and cells[m][0] is not None]
            if ratios:
                parts.append(f"{'x'.join(map(str, shape))} {m}: " + ", ".join(ratios))
    return "RATIOS TO p=inf (fwd+bwd) " + "; ".join(parts)


if __name__ == "__main__":
    main()
