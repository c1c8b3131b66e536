"""Default experiment: a small ℓ∞-dist Net on scikit-learn's 8×8 digits (embedded, no download).

Quick on a 2-core CPU (the measured time per CPU kind is in BENCHMARKS.md). Target: ≥ 95% clean
and ≥ 85% certified accuracy at ε = 0.1 pixels on the held-out digits (measured figures in
RESULTS.md).
"""

from linf_jax.config import base_config


def get_config():
    return base_config()
