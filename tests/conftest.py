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
