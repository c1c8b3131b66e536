"""linf-jax: certifiably robust ℓ∞-distance nets in JAX/Flax.

Public API (see README.md): the ops (:func:`dist`, :func:`linf_dist`, :func:`lp_dist`,
:func:`linf_dist_bounds`), the Flax layers and models, ensembles as stacked pytrees, and
:func:`load_classifier` for trained runs.
"""

from linf_jax.layers import BoundedLinear, Box, LinfDist, LinfDistConv, MeanShift
from linf_jax.models import LinfDistNet, LinfLeNet, build_model
from linf_jax.ops import (
    conv_bounds,
    conv_dist,
    dist,
    grouped_bounds,
    grouped_dist,
    linf_dist,
    linf_dist_bounds,
    lp_dist,
)

__version__ = "0.1.0"

_LAZY = {"load_classifier": "linf_jax.classifier", "Classifier": "linf_jax.classifier"}


def __getattr__(name):  # the classifier pulls in Orbax and the trainer: import it on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linf_jax' has no attribute {name!r}")


__all__ = [
    "BoundedLinear", "Box", "Classifier", "LinfDist", "LinfDistConv", "LinfDistNet", "LinfLeNet",
    "MeanShift", "build_model", "conv_bounds", "conv_dist", "dist", "grouped_bounds",
    "grouped_dist", "linf_dist", "linf_dist_bounds", "load_classifier", "lp_dist",
]
