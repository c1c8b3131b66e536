"""Evaluation of a model or a stacked ensemble: the logits and certified-margin functions, and
clean / PGD / certified accuracy over a data set (:mod:`linf_jax.certify` does the work)."""

from __future__ import annotations

import flax.linen as nn
import jax

from linf_jax import certify as certify_lib
from linf_jax import data as data_lib
from linf_jax import ensemble as ensemble_lib
from linf_jax.models import is_1_lipschitz


def make_eval_fns(model: nn.Module, variables, members: int | None, execution: str = "auto"):
    """``(logits_fn, margins_fn)`` in normalised units; for an ensemble both average over the
    members in one call (:func:`linf_jax.ensemble.members_map`, ``execution``)."""
    if members is None:
        logits_fn = lambda x: model.apply(variables, x)
        margins_fn = lambda lo, hi, y: model.apply(variables, lo, hi, y, method="certify_margins")
    else:
        logits_fn = lambda x: ensemble_lib.apply(model, variables, x, execution=execution)
        margins_fn = lambda lo, hi, y: ensemble_lib.apply(
            model, variables, lo, hi, y, method="certify_margins", execution=execution)
    return logits_fn, margins_fn


def evaluate(model: nn.Module, variables, ds: data_lib.Dataset, meta: dict, eval_config,
             members: int | None = None, progress: bool = True, key=None) -> dict:
    """Clean, PGD and certified accuracy (interval, and the Lipschitz rule for 1-Lipschitz
    models only) for every ε in ``eval_config.eps`` (pixels), plus per-example certified radii
    (pixels)."""
    logits_fn, margins_fn = make_eval_fns(model, variables, members)
    eps_pixels = [float(e) for e in (eval_config.eps if isinstance(eval_config.eps, (list, tuple))
                                     else (eval_config.eps,))]
    return certify_lib.evaluate_dataset(
        logits_fn, margins_fn, ds.images, ds.labels, mean=meta["mean"], std=meta["std"],
        eps_pixels=eps_pixels, batch_size=eval_config.batch_size,
        pgd_steps=eval_config.pgd_steps, pgd_restarts=eval_config.pgd_restarts,
        key=jax.random.PRNGKey(0) if key is None else key, progress=progress,
        lipschitz=is_1_lipschitz(model))
