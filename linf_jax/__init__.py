"""linf-jax: certifiably robust ℓ∞-distance nets in JAX/Flax.

Public API (see README.md): the ops (:func:`dist`, :func:`linf_dist`, :func:`lp_dist`,
:func:`linf_dist_bounds`, SortNet's :func:`sort_dist` and :func:`sort_dist_bounds`), the Flax
layers and models, ensembles as stacked pytrees, and
:func:`load_classifier` for trained runs.

Every name is imported from its module on first use (PEP 562), so that ``import linf_jax`` and
the command lines' flag and config checks import neither JAX nor Flax: ``train.py`` reports a
bad config field without first paying for those imports (BENCHMARKS.md).
"""

import importlib

__version__ = "0.1.0"

_WHERE = {
    "linf_jax.layers": ("BoundedLinear", "Box", "LinfDist", "LinfDistConv", "MeanShift",
                        "SortDist"),
    "linf_jax.models": ("LinfDistNet", "LinfLeNet", "SortNet", "SortNetConvMLP", "SortNetMLP",
                        "build_model"),
    "linf_jax.ops": ("conv_bounds", "conv_dist", "dist", "grouped_bounds", "grouped_dist",
                     "linf_dist", "linf_dist_bounds", "lp_dist", "sort_dist",
                     "sort_dist_bounds"),
    "linf_jax.classifier": ("Classifier", "load_classifier"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'linf_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
