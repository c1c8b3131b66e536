"""Evaluation of a model or a stacked ensemble: the logits and certified-margin functions, and
clean / PGD / certified accuracy over a data set (:mod:`linf_jax.certify` does the work)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
from jax.tree_util import Partial

from linf_jax import certify as certify_lib
from linf_jax import data as data_lib
from linf_jax import ensemble as ensemble_lib
from linf_jax.models import is_1_lipschitz


@dataclasses.dataclass(frozen=True)
class ApplyFn:
    """``model.apply(variables, *args, method=method)``, averaged over the members for an
    ensemble (``num_members`` K, None for a single model; :func:`linf_jax.ensemble.apply`).
    Hashable and equal for equal
    models (Flax modules compare by their fields), so that a jitted program taking it is traced
    once per architecture."""

    model: nn.Module
    method: str | None = None
    num_members: int | None = None
    execution: str = "auto"

    def __call__(self, variables, *args):
        kwargs = {} if self.method is None else {"method": self.method}
        if self.num_members is None:
            return self.model.apply(variables, *args, **kwargs)
        return ensemble_lib.apply(self.model, variables, *args, execution=self.execution,
                                  **kwargs)


def make_eval_fns(model: nn.Module, variables, num_members: int | None,
                  execution: str = "auto"):
    """``(logits_fn, margins_fn)`` in normalised units: ``logits_fn(x)`` and
    ``margins_fn(lo, hi, y)``; for an ensemble (``num_members`` K; None for a single model)
    both average over the members in one call (:func:`linf_jax.ensemble.members_map`,
    ``execution``).

    Both are :class:`jax.tree_util.Partial` objects whose pytree leaves are the weights: the
    programs of :func:`linf_jax.certify.evaluate_dataset` and :class:`linf_jax.Classifier` take
    them as arguments, so the weights are inputs of the compiled program, not constants baked
    into it (a closure over the weights would be). One compilation then serves every checkpoint
    and both the raw and the EMA weights of an architecture, and XLA's persistent cache serves
    other processes."""
    return (Partial(ApplyFn(model, None, num_members, execution), variables),
            Partial(ApplyFn(model, "certify_margins", num_members, execution), variables))


def evaluate(model: nn.Module, variables, ds: data_lib.Dataset, meta: dict, eval_config,
             num_members: int | None = None, progress: bool = True, key=None) -> dict:
    """Clean, PGD and certified accuracy (interval, and the Lipschitz rule for 1-Lipschitz
    models only) for every ε in ``eval_config.eps`` (pixels), plus per-example certified radii
    (pixels). ``num_members``: K for a stacked ensemble, None for a single model."""
    logits_fn, margins_fn = make_eval_fns(model, variables, num_members)
    eps_pixels = [float(e) for e in (eval_config.eps if isinstance(eval_config.eps, (list, tuple))
                                     else (eval_config.eps,))]
    return certify_lib.evaluate_dataset(
        logits_fn, margins_fn, ds.images, ds.labels, mean=meta["mean"], std=meta["std"],
        eps_pixels=eps_pixels, batch_size=eval_config.batch_size,
        pgd_steps=eval_config.pgd_steps, pgd_restarts=eval_config.pgd_restarts,
        key=jax.random.PRNGKey(0) if key is None else key, progress=progress,
        lipschitz=is_1_lipschitz(model))
