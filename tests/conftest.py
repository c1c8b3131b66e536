"""Shared fixtures: a tiny, fast training configuration on the embedded digits."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def tiny_config(**overrides):
    """Depth-3, width-32 ℓ∞-dist net on the digits: every p phase in ~130 steps."""
    from linf_jax.config import base_config

    c = base_config()
    c.data.train_split = "train[:640]"
    c.model.update(depth=3, width=32)
    c.train.update(batch_size=64, epochs=(0, 2, 2, 4, 6), log_every=5,
                   checkpoint_every_epochs=2, eps_train=0.15)
    c.eval.update(eps=(0.02, 0.1), pgd_steps=10, pgd_restarts=1, batch_size=120)
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


@pytest.fixture
def tiny():
    return tiny_config


def init_with_running_means(cfg, shape, seed=0, num_classes=10):
    """``(model, variables)``: a random init plus one training-mode pass on N(0, 1) inputs, so
    the MeanShift running means are non-zero (evaluation mode then uses them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from linf_jax.models import build_model

    model = build_model(cfg, num_classes)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    v = model.init(jax.random.key(seed), x, p=8.0, train=True)
    _, upd = model.apply(v, x, p=8.0, train=True, mutable=["batch_stats"])
    return model, {**v, **upd}
