"""SortNet neuron benchmark: linf_jax.ops.sort_dist against naive JAX top_k and torch.topk.

For each shape (B, in, out), times the forward pass and the forward+backward pass (gradients of
``sum(sort_dist(x, w, q, k) * g)`` with respect to x and w) of

* ours: ``linf_jax.ops.sort_dist`` as dispatched by default (on the CPU the native custom calls
  of linf_jax/native/sort.cc where the ℓ∞ pass runs native), jitted;
* ours-xla: the same with ``LINF_JAX_KERNELS=xla`` (the XLA code: on the CPU a scan carrying the
  running top K; the code used where the native kernels cannot build);
* naive: ``|x − w|`` written out as ``[B, chunk, in]`` (output chunks of at most
  ``--chunk-elements`` elements), ``lax.top_k``, the weighted sum, plain ``jax.grad``, jitted;
* torch: the same with ``torch.topk`` and ``backward(g)`` (optional: skipped without torch).

All four compute the same function (the first table line checks it on the forward pass).
Prints a table of medians (ms) and G-elements/s (``B·in·out / time``), then one line of
speed-up ratios. Compilation is excluded (compiled ahead of time, plus one warm-up call); the
methods are timed in alternation, one call each per round, and a method slower than
``--slow-s`` on its warm-up call is timed once only.

    PYTHONPATH=. python benchmarks/sort_bench.py              # 512 x 1024 x 1024, k 10, q 0.75
    PYTHONPATH=. python benchmarks/sort_bench.py --quick      # smaller shapes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from layer_bench import parse_shape, speedup  # noqa: E402  (this folder: the script's own path)

from linf_jax import ops  # noqa: E402

SHAPES = [(512, 1024, 1024)]
QUICK_SHAPES = [(128, 256, 256), (256, 512, 512)]
METHODS = ["ours", "ours-xla", "naive", "torch"]
PASSES = ["fwd", "fwd+bwd"]


def out_chunk(b: int, n: int, out: int, elements: float) -> int:
    """Weight rows per chunk of the naive versions: ``B·chunk·in`` at most ``elements``."""
    return int(max(1, min(out, elements // max(b * n, 1))))


# --------------------------------------------------------------------------------------------
# The implementations; each builder returns a zero-argument callable that runs one step and
# blocks until it is done.
# --------------------------------------------------------------------------------------------


def naive_sort(x, w, q, k, chunk):
    """``[B, chunk, in]`` distances written out, ``lax.top_k``, the weighted sum."""
    om = jnp.asarray(ops.sort_weights(q, k, x.shape[1]), x.dtype)
    kk = om.shape[0]

    def part(wc):
        return lax.top_k(jnp.abs(x[:, None, :] - wc[None]), kk)[0] @ om

    out = w.shape[0]
    if out <= chunk:
        return part(w)
    pad = (-out) % chunk
    wc = jnp.pad(w, ((0, pad), (0, 0))).reshape(-1, chunk, w.shape[1])
    y = lax.map(part, wc)  # [chunks, B, chunk]
    return y.swapaxes(0, 1).reshape(x.shape[0], -1)[:, :out]


def build_jax(fn, x, w, g, backward, kernels=None):
    if backward:
        loss = lambda x, w: (fn(x, w) * g).sum()  # noqa: E731
        jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    else:
        jitted = jax.jit(lambda x, w: fn(x, w))
    # Traced here, under the kernel choice: a fresh function each time, as jax.jit caches traces
    # per function and would serve ours-xla the trace of ours.
    with ops.use_kernels(kernels):
        compiled = jitted.lower(x, w).compile()
    return lambda: jax.block_until_ready(compiled(x, w))


def build_torch(torch, x, w, g, q, k, backward, chunk):
    xt, wt, gt = (torch.from_numpy(np.array(a)) for a in (x, w, g))  # writable copies
    om = torch.from_numpy(ops.sort_weights(q, k, x.shape[1]).astype(np.float32))
    kk = om.shape[0]

    def forward():
        parts = [torch.topk((xt[:, None, :] - wt[None, o:o + chunk]).abs(), kk, dim=-1).values
                 @ om for o in range(0, wt.shape[0], chunk)]
        return torch.cat(parts, dim=1)

    if not backward:
        def run():
            with torch.no_grad():
                return forward()
        return run
    xt.requires_grad_(True)
    wt.requires_grad_(True)

    def run():
        xt.grad = wt.grad = None
        forward().backward(gt)
        return xt.grad, wt.grad
    return run


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_alternating(runs: dict, repeats: int, slow_s: float) -> dict:
    """``{method: (median seconds, runs timed)}``: one warm-up call each, then ``repeats``
    rounds that time one call of each method in turn (a method whose warm-up took longer than
    ``slow_s`` is timed in the first round only)."""
    once = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        run()
        once[name] = time.perf_counter() - t0 > slow_s
    times: dict = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            if once[name] and r:
                continue
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None,
                    help="comma-separated BxINxOUT shapes (default 512x1024x1024; --quick: "
                         + ",".join("x".join(map(str, s)) for s in QUICK_SHAPES) + ")")
    ap.add_argument("--quick", action="store_true", help="the smaller shapes")
    ap.add_argument("--k", type=int, default=10, help="top_k (default 10)")
    ap.add_argument("--q", type=float, default=0.75, help="keep probability q (default 0.75)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    ap.add_argument("--slow-s", type=float, default=10.0,
                    help="a method whose warm-up call takes longer is timed once only")
    ap.add_argument("--chunk-elements", type=float, default=2.0**28,
                    help="the naive versions write out |x - w| in output chunks of at most "
                         "this many B*chunk*in elements")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch column")
    ap.add_argument("--no-xla", action="store_true", help="skip the ours-xla column")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive column")
    args = ap.parse_args()

    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    q, k = args.q, args.k

    torch = None
    if not args.no_torch:
        # torch's OpenMP threads spin for a while after each call and would steal the CPU from
        # the JAX timing that follows; passive waiting lets them sleep.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch  # noqa: PLC0415 (optional dependency)
        except ImportError:
            print("torch is not installed: the torch column is skipped "
                  "(pip install -r requirements-bench.txt)")
    methods = [m for m in METHODS if (m != "torch" or torch is not None)
               and (m != "ours-xla" or not args.no_xla) and (m != "naive" or not args.no_naive)]

    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "")
          + f", python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, repeats {args.repeats}, k {k}, q {q:g}; ours: "
          f"{ops.active().line()}")

    rows = []  # (shape, pass, {method: (seconds, runs)})
    for shape in shapes:
        b, n, out = shape
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(out, n)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(b, out)), jnp.float32)
        chunk = out_chunk(b, n, out, args.chunk_elements)
        ours = lambda x, w: ops.sort_dist(x, w, q, k)  # noqa: E731
        naive = lambda x, w: naive_sort(x, w, q, k, chunk)  # noqa: E731
        agreement(ours, naive, torch, x, w, q, k, chunk, methods)
        for backward in (False, True):
            runs = {}
            for method in methods:
                if method == "ours":
                    runs[method] = build_jax(ours, x, w, g, backward)
                elif method == "ours-xla":
                    runs[method] = build_jax(ours, x, w, g, backward, kernels="xla")
                elif method == "naive":
                    runs[method] = build_jax(naive, x, w, g, backward)
                else:
                    runs[method] = build_torch(torch, x, w, g, q, k, backward, chunk)
            timed = time_alternating(runs, args.repeats, args.slow_s)
            del runs
            row = (shape, PASSES[backward], timed)
            rows.append(row)
            print_row(row, methods, args.repeats, header=len(rows) == 1)
    print()
    print_table(rows, methods, args.repeats)
    print()
    print(ratio_line(rows, methods))


def agreement(ours, naive, torch, x, w, q, k, chunk, methods) -> None:
    """One line: the largest difference of each method's forward pass from the naive JAX one
    (relative to the largest value)."""
    ref = np.asarray(jax.jit(naive)(x, w), np.float64)
    scale = max(np.abs(ref).max(), 1e-30)
    parts = []
    for method in methods:
        if method == "naive":
            continue
        if method == "torch":
            got = build_torch(torch, x, w, jnp.zeros((x.shape[0], w.shape[0])), q, k, False,
                              chunk)().numpy()
        else:
            with ops.use_kernels("xla" if method == "ours-xla" else None):
                got = jax.jit(lambda x, w: ours(x, w))(x, w)
        parts.append(f"{method} {np.abs(np.float64(got) - ref).max() / scale:.1e}")
    shape = "x".join(map(str, (x.shape[0], x.shape[1], w.shape[0])))
    print(f"agreement with naive at {shape} (max relative difference): " + ", ".join(parts))


def fmt_cell(cell, elems, repeats):
    sec, runs = cell
    ms = f"{sec * 1e3:.1f}" + ("" if runs == repeats else f" (x{runs})")
    return ms, f"{elems / sec / 1e9:.2f}"


def table_lines(rows, methods, repeats):
    head = ["shape (B, in, out)", "pass"]
    head += [f"{m} ms" for m in methods] + [f"{m} Gel/s" for m in methods]
    head += [f"ours vs {m}" for m in methods if m != "ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, pas, cells in rows:
        elems = int(np.prod(shape))
        f = {m: fmt_cell(cells[m], elems, repeats) for m in methods}
        cols = [f"{shape}", pas]
        cols += [f[m][0] for m in methods] + [f[m][1] for m in methods]
        cols += [speedup(cells["ours"], cells[m]) for m in methods if m != "ours"]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def print_row(row, methods, repeats, header):
    lines = table_lines([row], methods, repeats)
    for line in (lines if header else lines[2:]):
        print(line, flush=True)


def print_table(rows, methods, repeats):
    print("Medians (ms; '(x1)': timed once, slower than --slow-s) and G-elements/s:")
    for line in table_lines(rows, methods, repeats):
        print(line)


def ratio_line(rows, methods) -> str:
    parts = []
    for shape, pas, cells in rows:
        vs = [f"{speedup(cells['ours'], cells[m])} vs {m}" for m in methods if m != "ours"]
        parts.append(f"{'x'.join(map(str, shape))} {pas}: " + ", ".join(vs))
    return "RATIOS (ours faster by) " + "; ".join(parts)


if __name__ == "__main__":
    main()
