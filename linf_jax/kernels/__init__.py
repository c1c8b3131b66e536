"""Pallas kernels for the ℓ∞ / ℓp distance (GPU via Triton; interpret mode anywhere); they live
in :mod:`linf_jax.ops.pallas`, re-exported here.

:mod:`linf_jax.ops` picks them on GPU (see :func:`linf_jax.ops.kernel_backend`); the same
signatures as ``ops.linf_dist`` / ``ops.lp_dist`` / ``ops.dist``, plus ``interpret`` and
``blocks`` keywords.
"""

from linf_jax.ops.pallas import (
    DEFAULT_BLOCKS,
    Blocks,
    pallas_dist,
    pallas_linf_dist,
    pallas_lp_dist,
)

__all__ = ["DEFAULT_BLOCKS", "Blocks", "pallas_dist", "pallas_linf_dist", "pallas_lp_dist"]
