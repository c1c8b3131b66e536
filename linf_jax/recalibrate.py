"""Re-estimating a SortNet's MeanShift running means for the network that is certified.

A SortNet trains with random masks and the ℓp relaxation, so the running means its MeanShifts
keep during training (and their EMA) belong to that training network, not to the deterministic
sort network at p = ∞ that is evaluated, certified and exported (docs/METHOD.md §10). Before any
of those, the running means are re-estimated as the official ``update_bn`` does: the training
set is passed once through the deterministic network at p = ∞ in training mode (batch means),
and each running mean becomes the plain average of its batch means.

The trainer does this for the raw and the EMA weights (every member of an ensemble) before
every checkpoint is written, and stores the result in the train state's ``recalibrated`` field
(``{'raw': batch_stats, 'ema': batch_stats, 'step': step}``), so a checkpoint carries the
statistics of its own weights and :func:`linf_jax.checkpoint.load_variables` (``certify.py``,
``load_classifier``, ``linf_jax.export``) needs no training data. The certificate is sound for
whatever constants are used; re-estimation only makes the certified network the good one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from linf_jax import ensemble as ensemble_lib
from linf_jax.models import _SortModel

INF = float("inf")
NOT_YET = -1  # ``recalibrated['step']`` before the first re-estimation


def recalibration_key(rng):
    """The key of the re-estimation's augmentation, from the run's key (each re-estimation
    folds in its step)."""
    return jax.random.fold_in(rng, 5)


def needs_recalibration(model) -> bool:
    """Whether ``model`` is a SortNet, whose running means must be re-estimated before it is
    evaluated, certified or exported."""
    return isinstance(model, _SortModel)


def initial(batch_stats) -> dict:
    """The ``recalibrated`` field of a fresh SortNet state: the training statistics, marked as
    not re-estimated (``step = -1``). Copies: no buffer of the state may appear twice, as the
    train step donates the state."""
    return {"raw": jax.tree.map(jnp.copy, batch_stats), "ema": jax.tree.map(jnp.copy, batch_stats),
            "step": jnp.asarray(NOT_YET, jnp.int32)}


def _as_stats(intermediates) -> dict:
    """``{'norms_0': {'batch_mean': (m,)}}`` → ``{'norms_0': {'mean': m}}``."""
    out = {}
    for name, value in intermediates.items():
        if "batch_mean" in value:
            out[name] = {"mean": value["batch_mean"][0]}
        else:
            out[name] = _as_stats(value)
    return out


def batch_means(apply_fn: Callable, params, batch_stats, x):
    """Each MeanShift's batch mean of the deterministic network at p = ∞ on batch ``x``, as a
    tree shaped like ``batch_stats``."""
    _, state = apply_fn({"params": params, "batch_stats": batch_stats}, x, p=INF, train=True,
                        mutable=["batch_stats", "intermediates"])
    return _as_stats(state["intermediates"])


def make_means_fn(apply_fn: Callable, prepare: Callable, num_members: int | None,
                  execution: str = "auto") -> Callable:
    """``means(params, batch_stats, images, labels, idx, key)``, jitted: one batch prepared as
    in training (``prepare``) and its batch means, per member for a stacked ensemble."""
    one = functools.partial(batch_means, apply_fn)
    if num_members is not None:
        one = ensemble_lib.members_map(one, (0, 0, None), execution)

    @jax.jit
    def means(params, batch_stats, images, labels, idx, key):
        x, _ = prepare(images, labels, idx, key)
        return one(params, batch_stats, x)

    return means


def recalibrate(means_fn: Callable, params, batch_stats, images, labels,
                batches: Iterable[np.ndarray], key) -> dict:
    """The average over ``batches`` (index arrays into ``images``) of the batch means: the
    re-estimated running means of the weights ``params``."""
    total, count = None, 0
    for i, idx in enumerate(batches):
        m = means_fn(params, batch_stats, images, labels, jnp.asarray(idx),
                     jax.random.fold_in(key, i))
        total = m if total is None else jax.tree.map(jnp.add, total, m)
        count += 1
    if total is None:
        raise ValueError("recalibrate: no training batches")
    return jax.tree.map(lambda t: t / count, total)
