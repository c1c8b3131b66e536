"""An alias of :mod:`linf_jax.ops.pallas` (the Pallas backend of the distance kernels), kept
for code that imports this name."""

from linf_jax.ops.pallas import (  # noqa: F401
    DEFAULT_BLOCKS,
    Blocks,
    pallas_dist,
    pallas_linf_dist,
    pallas_lp_dist,
)
