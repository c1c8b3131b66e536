"""SortNet's training pass against the ℓ∞-dist layer it replaces.

A hidden SortNet layer in training (linf_jax.layers.SortDist with per-block index arrays: each
block of ``--block`` examples keeps ``round(q·in)`` inputs and computes ``round(q·out)``
outputs, the ℓp / ℓ∞ distance over the kept inputs) against the unmasked layer of the same size
(``linf_jax.ops.dist``, what an ℓ∞-dist net trains), forward and forward+backward (gradients
with respect to x and w), at p = 8 and p = ∞, kernels as dispatched by default. The masked
layer does about q² of the distance work plus the gathers of each block's weights and the
scatter-add of their gradients.

Prints a table of medians (ms) and a final line of ratios (unmasked / masked: above 1 means
the SortNet layer is faster).

    PYTHONPATH=. python benchmarks/sortnet_train_bench.py                 # 512 x 1024 x 1024
    PYTHONPATH=. python benchmarks/sortnet_train_bench.py --shape 64x256x256 --repeats 3
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from layer_bench import parse_shape  # noqa: E402  (this folder: the script's own path)

from linf_jax import ops  # noqa: E402
from linf_jax.layers import SortDist  # noqa: E402


def masked_layer(b, n, out, q, block, seed=0):
    """``(fn(x_blocks, w), x_blocks, in_index, out_index)`` of one masked hidden layer."""
    s = -(-b // block)
    m_in, m_out = max(1, round(q * n)), max(1, round(q * out))
    rng = np.random.default_rng(seed)
    in_idx = np.stack([np.sort(rng.choice(n, m_in, replace=False)) for _ in range(s)])
    out_idx = np.stack([np.sort(rng.choice(out, m_out, replace=False)) for _ in range(s)])
    layer = SortDist(out, n, q=q)
    x = jnp.asarray(rng.normal(size=(s, block, m_in)), jnp.float32)
    ii, oi = jnp.asarray(in_idx, jnp.int32), jnp.asarray(out_idx, jnp.int32)

    def fn(x, w, p):
        return layer.apply({"params": {"linf_weight": w}}, x, p, in_index=ii, out_index=oi)

    return fn, x


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def build(fn, x, w, p, backward):
    if backward:
        f = jax.jit(jax.value_and_grad(lambda x, w: (fn(x, w, p) ** 2).sum() * 0.5, (0, 1)))
    else:
        f = jax.jit(lambda x, w: fn(x, w, p))
    compiled = f.lower(x, w).compile()
    return lambda: jax.block_until_ready(compiled(x, w))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="512x1024x1024", help="B x in x out")
    ap.add_argument("--q", type=float, default=0.75, help="keep probability")
    ap.add_argument("--block", type=int, default=32, help="examples per mask block")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    b, n, out = parse_shape(args.shape)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(out, n)), jnp.float32)
    x_full = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
    masked, x_masked = masked_layer(b, n, out, args.q, args.block)
    print(f"SortNet training layer vs the unmasked layer, {b} x {n} -> {out}, q = {args.q}, "
          f"blocks of {args.block}; {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}, kernels {ops.resolve('auto').record().get('passes')}")
    print("| p | pass | unmasked (ms) | masked q (ms) | unmasked / masked |")
    print("|---|---|---|---|---|")
    ratios = []
    for p in (8.0, float("inf")):
        for backward in (False, True):
            t_full = timed(build(ops.dist, x_full, w, p, backward), args.repeats)
            t_mask = timed(build(masked, x_masked, w, p, backward), args.repeats)
            name = "fwd+bwd" if backward else "fwd"
            pn = "inf" if p == float("inf") else f"{p:g}"
            print(f"| {pn} | {name} | {t_full:.1f} | {t_mask:.1f} | {t_full / t_mask:.2f}x |")
            ratios.append(f"p={pn} {name} {t_full / t_mask:.2f}x")
    print("RATIOS (unmasked / masked): " + ", ".join(ratios))


if __name__ == "__main__":
    main()
