"""Training losses of SPEC.md §4 on the worst-case margin vector ``r``.

``r`` is ``[B, C]`` with ``r_j`` an upper bound of ``z_j − z_y`` over the training ε-ball and
``r_y = 0``; the models produce it (``model.apply(..., eps=eps, labels=y)``), and
:func:`lipschitz_margins` builds it for a pure ℓ∞-dist net from its logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lipschitz_margins(logits, labels, eps):
    """``r_j = z_j − z_y + 2ε`` for j ≠ y, ``r_y = 0`` (the 1-Lipschitz worst case)."""
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    return jnp.where(onehot, 0.0, logits - z_y + 2.0 * eps)


def hinge_loss(margins, mix):
    """``mix · mean_batch (max_j r_j)₊ + (1 − mix) · mean(r₊)`` (the mean over batch and
    classes, as ``torch.nn.functional.multi_margin_loss``)."""
    worst = jax.nn.relu(margins.max(axis=-1)).mean()
    every = jax.nn.relu(margins).mean()
    return mix * worst + (1.0 - mix) * every


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kappa_ce_loss(logits, margins, labels, kappa):
    """``κ · CE(r) + (1 − κ) · CE(z)`` (the +MLP models)."""
    return kappa * cross_entropy(margins, labels) + (1.0 - kappa) * cross_entropy(logits, labels)


def v2_mixture_loss(logits, margins, labels, eps, lam, scale):
    """``mean_batch max_j clip(r_j / 2ε, 0, 1) + λ · CE(s · z)`` (ℓ∞-dist Net v2)."""
    clipped = jnp.clip(margins / (2.0 * eps), 0.0, 1.0).max(axis=-1).mean()
    return clipped + lam * cross_entropy(scale * logits, labels)

