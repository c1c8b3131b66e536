"""Moved to :mod:`linf_jax.ops.pallas` (the Pallas backend of the distance kernels); this name
stays for code that imports it."""

from linf_jax.ops.pallas import (  # noqa: F401
    DEFAULT_BLOCKS,
    Blocks,
    pallas_dist,
    pallas_linf_dist,
    pallas_lp_dist,
)
