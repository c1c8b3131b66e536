"""Adam with the ℓp-aware decoupled weight decay, and the parameter EMA.

The chain is ``scale_by_adam → add decoupled decay → scale by −lr(step)``. The decay terms are
computed from the parameters *before* the update, so the result is exactly the official v1
``AdamW`` (``zbh2047/L_inf-dist-net``, ``adamw.py``) order "decay the weights, then take the
Adam step", both scaled by the current learning rate. Every parameter is decayed as there:

* ℓ∞-dist weights (leaves named ``linf_weight``, one row per output neuron, any trailing shape):
  ``w ← w − lr·wd·(|w|/‖w‖_p)^(p−2)·w``, the gradient of ½‖w‖_p², with p the current p of the
  schedule; at p = ∞ only each row's largest |w| decays;
* every other parameter (head weights ``kernel``, the biases of the ℓ∞-dist layers and of the
  head): plain decoupled decay ``θ ← θ − lr·wd·θ`` (for the bias of an ℓ∞-dist layer this is
  the ℓp form on its rows of length 1, which is what the official code computes);
* except the logit scale ``logit_scale`` (the v2 model's s; v1 models have no such parameter,
  and the v2 code decays nothing). The mean-shift statistics are not parameters.

``weight_decay = 0`` (the v2 recipe: plain Adam) skips the decay altogether. The lr is the
schedule's for every parameter but the logit scale, whose base lr may differ (v2: 0.006 where
the rest has 0.03) on the same schedule (:func:`scale_by_learning_rate`).

Which rule a leaf gets is read from a label tree, :func:`param_labels` (``'linf_weight'``,
``'logit_scale'`` or ``'other'`` per leaf, from the leaf's name), as optax's ``mask`` and
``multi_transform`` select leaves; the transformations only map labels to rules (``DECAY``, the
lr per label). The labels are built from the parameter paths when ``update`` is traced, so the
optimiser state holds arrays only and keeps the structure of the plain chain (checkpoints of
earlier runs resume).

The EMA is :func:`optax.incremental_update` applied to parameters and batch statistics alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from linf_jax.ops import lp_decay_direction
from linf_jax.schedules import Schedule

LINF_WEIGHT, LOGIT_SCALE, OTHER = "linf_weight", "logit_scale", "other"


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def param_labels(params):
    """A pytree of the structure of ``params`` with one label per leaf: ``'linf_weight'`` for the
    ℓ∞-dist weights, ``'logit_scale'`` for the v2 logit scale, ``'other'`` for the rest (head
    weights, biases). Any tree of that structure works (gradients and updates too): only the
    paths are read."""

    def label(path, _):
        name = _leaf_name(path)
        return name if name in (LINF_WEIGHT, LOGIT_SCALE) else OTHER

    return jax.tree_util.tree_map_with_path(label, params)


def _labels_of(labels, tree):
    """``labels`` as given (a pytree of labels) or computed from ``tree`` (a callable, optax's
    habit for masks)."""
    return labels(tree) if callable(labels) else labels


class DecayState(NamedTuple):
    count: jax.Array


# label -> the term whose wd-multiple is added to a leaf's update; a label not here (the logit
# scale) is not decayed.
DECAY = {
    LINF_WEIGHT: lp_decay_direction,  # ∇(½‖w‖_p²) per row
    OTHER: lambda w, p: w,  # plain decoupled decay
}


def lp_weight_decay(weight_decay: float, p_of_count, labels=param_labels
                    ) -> optax.GradientTransformationExtraArgs:
    """Adds ``wd · ∇(½‖w‖_p²)`` (row-wise, ``p = p_of_count(count)``) to the updates of the leaves
    labelled ``'linf_weight'`` and ``wd · θ`` to those labelled ``'other'``; the logit scale is
    not decayed (``DECAY``, module docstring); ``weight_decay = 0`` leaves the updates as they
    are. ``labels``: the label tree, or a function of the parameters giving it (default
    :func:`param_labels`).

    ``tx.update(..., phase_p=p)`` (an Optax extra argument, passed through ``optax.chain``) may
    give that p as a Python number when the caller knows it statically: the train step does in
    its 'start' and 'inf' phases, where ``p_of_count(count)`` is the constant p_start or ∞. It
    selects the specialised code of :func:`lp_decay_direction` (no exp/log, no ``lax.cond``); it
    must equal ``p_of_count(count)``, which is used when ``phase_p`` is None or traced."""

    def init_fn(params):
        del params
        return DecayState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, phase_p=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("lp_weight_decay needs the parameters: tx.update(g, s, params)")
        new_state = DecayState(count=optax.safe_increment(state.count))
        if weight_decay == 0:
            return updates, new_state
        p = phase_p if isinstance(phase_p, (int, float)) else p_of_count(state.count)

        def one(label, u, w):
            if label not in DECAY:
                return u
            return u + weight_decay * DECAY[label](w, p)

        return jax.tree.map(one, _labels_of(labels, params), updates, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_learning_rate(schedule: Schedule, logit_scale_lr: float | None = None,
                           labels=param_labels) -> optax.GradientTransformation:
    """Multiplies the updates by ``−lr0 · schedule.lr_factor(count)``: ``lr0 = schedule.lr``
    for every leaf but the one labelled ``'logit_scale'``, which has ``logit_scale_lr`` (None:
    ``schedule.lr``), on the same schedule (the v2 code's two parameter groups). ``labels``: the
    label tree, or a function of the updates giving it (default :func:`param_labels`). The
    state is optax's ``ScaleByScheduleState``, as ``optax.scale_by_schedule``'s."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        factor = schedule.lr_factor(state.count)
        lr = -schedule.lr * factor
        rates = {LOGIT_SCALE: lr if logit_scale_lr is None else -logit_scale_lr * factor}

        def one(label, u):
            return (rates.get(label, lr) * u).astype(u.dtype)

        new = jax.tree.map(one, _labels_of(labels, updates), updates)
        return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(schedule: Schedule, weight_decay: float, adam_eps: float = 1e-10,
                   p_of_count=None, logit_scale_lr: float | None = None
                   ) -> optax.GradientTransformation:
    """Adam(β = (0.9, 0.99), eps = 1e-10) with the ℓp-aware decoupled decay and the lr schedule.

    With eps = 1e-10 Adam's first steps are nearly ``lr · sign(g)``, so rounding differences in
    tiny gradients (another device count, another summation order) become differences of order
    lr in the parameters; a larger ``adam_eps`` makes the update smooth in g. ``p_of_count(count)``
    is the p of the ℓp decay (default ``schedule.p``: the p of the step being taken).
    ``logit_scale_lr``: the base lr of the logit scale (None: ``schedule.lr``)."""
    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.99, eps=adam_eps),
        lp_weight_decay(weight_decay, schedule.p if p_of_count is None else p_of_count),
        scale_by_learning_rate(schedule, logit_scale_lr),
    )


def ema_update(ema, new, decay):
    """``ema ← decay·ema + (1 − decay)·new`` over any pytree (parameters and batch stats)."""
    return optax.incremental_update(new, ema, step_size=1.0 - decay)
