"""Adam with the ℓp-aware decoupled weight decay, and the parameter EMA.

The chain is ``scale_by_adam → add decoupled decay → scale by −lr(step)``. The decay terms are
computed from the parameters *before* the update, so the result is exactly the official v1
``AdamW`` (``zbh2047/L_inf-dist-net``, ``adamw.py``) order "decay the weights, then take the
Adam step", both scaled by the current learning rate. Two policies say which parameter is
decayed how (``dist_decay``):

``'lp'`` (the v1 code; the default):

* ℓ∞-dist weights (leaves named ``linf_weight``, one row per output neuron, any trailing shape):
  ``w ← w − lr·wd·(|w|/‖w‖_p)^(p−2)·w``, the gradient of ½‖w‖_p², with p the current p of the
  schedule; at p = ∞ only each row's largest |w| decays;
* every other parameter (head weights ``kernel``, the biases of the ℓ∞-dist layers and of the
  head): plain decoupled decay ``θ ← θ − lr·wd·θ`` (for the bias of an ℓ∞-dist layer this is
  the ℓp form on its rows of length 1, which is what the official code computes);

``'none'`` (SortNet, ``zbh2047/SortNet``, ``main.py``: torch ``AdamW`` with a parameter group of
weight decay 0 for every parameter of a distance layer): no decay on the ℓ∞-dist weights nor on
the distance layers' biases; plain decoupled decay on every other parameter (the head's kernels
and biases).

Either way the logit scale ``logit_scale`` (the v2 model's s) is not decayed, unless
``decay_logit_scale`` (SortNet's AdamW decays its scalar with the head); v1 models have no such
parameter, and the v2 code decays nothing. The mean-shift statistics are not parameters.

``weight_decay = 0`` (the v2 recipe: plain Adam) skips the decay altogether. The lr is the
schedule's for every parameter but the logit scale, whose base lr may differ (v2: 0.006 where
the rest has 0.03) on the same schedule (:func:`scale_by_learning_rate`).

Which rule a leaf gets is read from a label tree, :func:`param_labels`: ``'linf_weight'``,
``'dist_bias'`` (a leaf named ``bias`` in a module that also holds a ``linf_weight``: a distance
layer's bias), ``'logit_scale'`` or ``'other'`` per leaf, from the leaf's name and its module's
other leaves, as optax's ``mask`` and ``multi_transform`` select leaves; the transformations
only map labels to rules (:func:`decay_rules`, the lr per label). The labels are built from the
parameter tree when ``update`` is traced, so the optimiser state holds arrays only. The decay
and the lr keep no state: the train state's step is the one counter of a run, and the caller
passes the step and its p to ``update``.

The EMA is :func:`optax.incremental_update` applied to parameters and batch statistics alike.
"""

from __future__ import annotations

import jax
import optax

from linf_jax.config import DIST_DECAYS
from linf_jax.ops import lp_decay_direction
from linf_jax.schedules import Schedule

LINF_WEIGHT, DIST_BIAS, LOGIT_SCALE, OTHER = "linf_weight", "dist_bias", "logit_scale", "other"


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def param_labels(params):
    """A pytree of the structure of ``params`` with one label per leaf: ``'linf_weight'`` for the
    ℓ∞-dist weights, ``'dist_bias'`` for a ``bias`` beside a ``linf_weight`` (a distance layer's
    bias), ``'logit_scale'`` for the v2 logit scale, ``'other'`` for the rest (head kernels and
    biases). Any tree of that structure works (gradients and updates too): only the paths are
    read."""
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    dist_modules = {path[:-1] for path in paths if _leaf_name(path) == LINF_WEIGHT}

    def label(path, _):
        name = _leaf_name(path)
        if name in (LINF_WEIGHT, LOGIT_SCALE):
            return name
        return DIST_BIAS if name == "bias" and path[:-1] in dist_modules else OTHER

    return jax.tree_util.tree_map_with_path(label, params)


def _plain(w, p):
    return w


def decay_rules(dist_decay: str = "lp", decay_logit_scale: bool = False) -> dict:
    """label -> the term whose wd-multiple is added to a leaf's update (a label not in it is not
    decayed); module docstring. ``'lp'``: the ℓp form on ``linf_weight``, plain on distance
    biases and the rest; ``'none'``: plain on ``'other'`` only. ``decay_logit_scale``: plain on
    the logit scale as well."""
    if dist_decay not in DIST_DECAYS:
        raise ValueError(f"train.dist_decay={dist_decay!r} is not allowed: one of {DIST_DECAYS}")
    rules = {OTHER: _plain}
    if dist_decay == "lp":
        rules[LINF_WEIGHT] = lp_decay_direction  # ∇(½‖w‖_p²) per row
        rules[DIST_BIAS] = _plain
    if decay_logit_scale:
        rules[LOGIT_SCALE] = _plain
    return rules


def _labels_of(labels, tree):
    """``labels`` as given (a pytree of labels) or computed from ``tree`` (a callable, optax's
    habit for masks)."""
    return labels(tree) if callable(labels) else labels


# The v1 policy (dist_decay='lp', the logit scale not decayed).
DECAY = decay_rules()


def lp_weight_decay(weight_decay: float, labels=param_labels, rules: dict | None = None
                    ) -> optax.GradientTransformationExtraArgs:
    """Adds ``wd · rule(θ, p)`` to the update of each leaf whose label has a rule in ``rules``
    (:func:`decay_rules`; default ``DECAY``: ``wd · ∇(½‖w‖_p²)`` row-wise on ``'linf_weight'``,
    ``wd · θ`` on ``'dist_bias'`` and ``'other'``, the logit scale not decayed; module
    docstring); ``weight_decay = 0`` leaves the updates as they are. ``labels``: the label
    tree, or a function of the parameters giving it (default :func:`param_labels`).

    The p is the step's, given by the caller: ``tx.update(..., p=p)`` (an Optax extra argument,
    passed through ``optax.chain``). A Python number (the train step's 'start' and 'inf'
    phases) selects the specialised code of :func:`linf_jax.ops.lp_decay_direction` (no
    exp/log, no ``lax.cond``); a traced scalar (the ramp) the general one. Stateless: the train
    state's step is the one counter a run keeps."""

    rules = DECAY if rules is None else rules

    def update_fn(updates, state, params=None, *, p=None, **extra_args):
        del extra_args
        if weight_decay == 0 or not rules:
            return updates, state
        if params is None or p is None:
            raise ValueError("lp_weight_decay needs the parameters and the step's p: "
                             "tx.update(g, s, params, p=p, step=step)")

        def one(label, u, w):
            if label not in rules:
                return u
            return u + weight_decay * rules[label](w, p)

        return jax.tree.map(one, _labels_of(labels, params), updates, params), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def scale_by_learning_rate(schedule: Schedule, logit_scale_lr: float | None = None,
                           labels=param_labels) -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by ``−lr0 · schedule.lr_factor(step)``, ``step`` the train state's
    step given by the caller (``tx.update(..., step=step)``): ``lr0 = schedule.lr`` for every
    leaf but the one labelled ``'logit_scale'``, which has ``logit_scale_lr`` (None:
    ``schedule.lr``), on the same schedule (the v2 code's two parameter groups). ``labels``: the
    label tree, or a function of the updates giving it (default :func:`param_labels`).
    Stateless, like :func:`lp_weight_decay`."""

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        if step is None:
            raise ValueError("scale_by_learning_rate needs the step: "
                             "tx.update(g, s, params, p=p, step=step)")
        factor = schedule.lr_factor(step)
        lr = -schedule.lr * factor
        rates = {LOGIT_SCALE: lr if logit_scale_lr is None else -logit_scale_lr * factor}

        def one(label, u):
            return (rates.get(label, lr) * u).astype(u.dtype)

        return jax.tree.map(one, _labels_of(labels, updates), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(schedule: Schedule, weight_decay: float, adam_eps: float = 1e-10,
                   logit_scale_lr: float | None = None, dist_decay: str = "lp",
                   decay_logit_scale: bool = False) -> optax.GradientTransformationExtraArgs:
    """Adam(β = (0.9, 0.99), eps = 1e-10) with the decoupled decay of policy ``dist_decay`` /
    ``decay_logit_scale`` (:func:`decay_rules`) and the lr schedule;
    ``tx.update(grads, opt_state, params, p=p, step=step)`` with the step's p and the train
    state's step, the one counter of a run (Adam keeps its own count for its bias correction).
    ``dist_decay='none'`` with ``decay_logit_scale=True`` and one lr is SortNet's torch
    ``AdamW(betas=(0.9, 0.99), eps=1e-10)`` with weight decay 0 on the distance layers.

    With eps = 1e-10 Adam's first steps are nearly ``lr · sign(g)``, so rounding differences in
    tiny gradients (another device count, another summation order) become differences of order
    lr in the parameters; a larger ``adam_eps`` makes the update smooth in g.
    ``logit_scale_lr``: the base lr of the logit scale (None: ``schedule.lr``)."""
    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.99, eps=adam_eps),
        lp_weight_decay(weight_decay, rules=decay_rules(dist_decay, decay_logit_scale)),
        scale_by_learning_rate(schedule, logit_scale_lr),
    )


def ema_update(ema, new, decay):
    """``ema ← decay·ema + (1 − decay)·new`` over any pytree (parameters and batch stats)."""
    return optax.incremental_update(new, ema, step_size=1.0 - decay)
