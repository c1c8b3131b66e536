"""Pallas kernels for the ℓ∞ / ℓp distance (GPU via Triton; interpret mode anywhere); they live
in :mod:`linf_jax.ops.pallas`, re-exported here.

:mod:`linf_jax.ops` runs them when asked (``LINF_JAX_KERNELS=pallas``, or ``auto`` on a GPU;
see :func:`linf_jax.ops.kernel_backend`). They have the signatures of ``ops.linf_dist`` /
``ops.lp_dist`` / ``ops.dist``, plus ``interpret`` and ``blocks`` keywords.
"""

from linf_jax.ops.pallas import (
    DEFAULT_BLOCKS,
    Blocks,
    pallas_dist,
    pallas_linf_dist,
    pallas_lp_dist,
)

__all__ = ["DEFAULT_BLOCKS", "Blocks", "pallas_dist", "pallas_linf_dist", "pallas_lp_dist"]
