"""Training losses on the worst-case margin vector ``r`` (docs/METHOD.md §4; which official script
uses which: docs/RECIPES.md, "Losses").

``r`` is ``[B, C]`` with ``r_j`` the worst case of ``z_j − z_y`` over the training ε-ball and
``r_y = 0``; the models produce it (``model.apply(..., eps=eps, labels=y)``), and
:func:`worst_case_margins` builds it for a pure ℓ∞-dist net from its logits (with ε = 0: the
clean margins ``z − z_y``). ε is in normalised units throughout. ``r`` is a true upper bound at
p = ∞ in evaluation mode; during training (p < ∞, batch statistics) it is the surrogate the
losses push down (docs/METHOD.md §3.3).

* ``hinge`` (v1): :func:`hinge_loss`, and with κ < 1 :func:`kappa_mix` of the worst-case and the
  clean margins, as the official ``Loss`` of ``zbh2047/L_inf-dist-net`` (``main.py``);
* ``kappa_ce`` (v1 +MLP models): :func:`kappa_ce_loss`;
* ``v2``: :func:`v2_mixture_loss` (``mixture`` of ``zbh2047/L_inf-dist-net-v2``), finite for
  every ε ≥ 0; SortNet's pure-net scripts use the same ``mixture``;
* ``ce_hinge`` (SortNet's +MLP models, ``zbh2047/SortNet``): :func:`ce_hinge_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def worst_case_margins(logits, labels, eps):
    """``r_j = z_j − z_y + 2ε`` for j ≠ y, ``r_y = 0`` (the 1-Lipschitz worst case: over an ε-ball
    every logit of a 1-Lipschitz net moves by at most ε, docs/METHOD.md §3.1)."""
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    return jnp.where(onehot, 0.0, logits - z_y + 2.0 * eps)


def hinge_loss(margins, mix):
    """``mix · mean_batch (max_j r_j)₊ + (1 − mix) · mean(r₊)`` (the mean over batch and
    classes, the zero entry j = y included, as ``torch.nn.functional.multi_margin_loss``). On
    the pure net's margins it is 0 exactly when ``z_y − z_j ≥ 2ε`` for every j ≠ y."""
    worst = jax.nn.relu(margins.max(axis=-1)).mean()
    every = jax.nn.relu(margins).mean()
    return mix * worst + (1.0 - mix) * every


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kappa_mix(loss_fn, logits, margins, labels, kappa):
    """``κ · ℓ(r) + (1 − κ) · ℓ(z − z_y)``: the official v1 ``Loss`` for any ``ℓ`` taking
    margins and labels (``κ = 1``: ``ℓ(r)`` alone, the clean term is not computed)."""
    worst = loss_fn(margins, labels)
    if isinstance(kappa, (int, float)) and kappa == 1:
        return worst
    clean = worst_case_margins(logits, labels, 0.0)
    return kappa * worst + (1.0 - kappa) * loss_fn(clean, labels)


def kappa_ce_loss(logits, margins, labels, kappa):
    """``κ · CE(r) + (1 − κ) · CE(z)`` (the +MLP models; ``CE(z − z_y) = CE(z)``; with
    ``r_y = 0``, ``CE(r) = log Σ_j exp(r_j)``, a smooth maximum of the worst-case margins)."""
    return kappa * cross_entropy(margins, labels) + (1.0 - kappa) * cross_entropy(logits, labels)


def v2_mixture_loss(logits, margins, labels, eps, lam, scale):
    """``mean_batch max_j clip(r_j / 2ε, 0, 1) + λ · CE(s · z)`` (ℓ∞-dist Net v2, docs/METHOD.md
    §4): per example 0 when certified at ε, 1 when misclassified; the logit scale ``s`` enters
    the cross-entropy only.

    At ε = 0 the first term is its limit ε → 0⁺: for j ≠ y, ``r_j / 2ε = (z_j − z_y)/2ε + 1``
    tends to +∞ where ``z_j ≥ z_y`` and to −∞ where ``z_j < z_y``, so the clipped term is
    ``1[r_j ≥ 0]`` (the 0-1 error, no gradient), and 0 for the label (``r_y = 0``). Finite for
    every ε ≥ 0, value and gradient (ε may be a traced scalar)."""
    eps = jnp.asarray(eps, margins.dtype)
    positive = eps > 0
    ratio = margins / jnp.where(positive, 2.0 * eps, 1.0)
    onehot = jax.nn.one_hot(labels, margins.shape[-1], dtype=bool)
    limit = jnp.where(onehot | (margins < 0), 0.0, 1.0).astype(margins.dtype)
    clipped = jnp.where(positive, jnp.clip(ratio, 0.0, 1.0), limit).max(axis=-1).mean()
    return clipped + lam * cross_entropy(scale * logits, labels)



def ce_hinge_loss(logits, margins, labels, lam, scale):
    """``mean_batch [1(argmax s·z = y) · max(0, max_{j≠y} (r_j − r_y) + 1)] + λ · CE(s · z)``:
    SortNet's ``ce_hinge`` (``zbh2047/SortNet``, ``main.py``). A hinge at margin 1 on the raw
    worst-case margins (not scaled by ``s``, not divided by ε), counted only for the examples the
    clean logits classify correctly (the 0/1 factor carries no gradient; a misclassified example
    is left to the cross-entropy). The term ``r_y`` is 0 for the models' margins; it is
    subtracted as the official code does, and the label's own entry is replaced by 0 before the
    maximum, which is where the ``max(0, ·)`` comes from."""
    onehot = jax.nn.one_hot(labels, margins.shape[-1], dtype=bool)
    r_y = jnp.take_along_axis(margins, labels[:, None], axis=-1)
    hinge = jnp.where(onehot, 0.0, margins - r_y + 1.0).max(axis=-1)
    scaled = scale * logits
    correct = jax.lax.stop_gradient((jnp.argmax(scaled, axis=-1) == labels).astype(hinge.dtype))
    return (correct * hinge).mean() + lam * cross_entropy(scaled, labels)
