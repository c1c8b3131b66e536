"""The real-data protocol runnable offline: train on the first 5,000 images of the MNIST test
split, certify on the last 5,000 (RESULTS.md).

The MNIST test split as IDX files (``t10k-images-idx3-ubyte[.gz]``,
``t10k-labels-idx1-ubyte[.gz]``; README, "Data", gives their source and checksums) is read from
the folder in ``$LINF_JAX_MNIST_DIR`` (default: ``data/mnist`` under the working folder), or
from any folder with ``--config.data.source=idx:/path/to/mnist``.

linf-jax's own scaled-down version of the v1 pure-net recipe for ε = 0.3
(``zbh2047/L_inf-dist-net``, ``command/ell_inf_dist_net_mnist.sh``; docs/RECIPES.md), not a
paper preset: a 4 × 256 ℓ∞-dist Net instead of 5 × 5120, 50 epochs instead of 400, batch 250,
and ε_train ramped from 0 over the first 8 epochs (the official script keeps it constant from
the first step) — the setting the figures of RESULTS.md were measured with. As in v1: ε_train
0.45 pixels, hinge mix 0.75, lr 0.02, weight decay 5e-3, zero-padded crops by 1 pixel; PGD-20
in the end-of-run evaluation. Small enough for a single model to train on a 2-core CPU (its
time: RESULTS.md).
"""

import os

from linf_jax.config import base_config

MNIST_DIR_ENV = "LINF_JAX_MNIST_DIR"


def get_config():
    c = base_config()
    c.data.source = "idx:" + os.path.normpath(os.environ.get(MNIST_DIR_ENV, "data/mnist"))
    c.data.train_split = "test[:5000]"
    c.data.test_split = "test[5000:]"
    c.model.update(name="linf_dist_net", depth=4, width=256, head="none")
    c.train.update(schedule="v1", batch_size=250, epochs=(0, 8, 8, 40, 50), lr=0.02,
                   weight_decay=5e-3, eps_train=0.45, loss="hinge", mix=0.75, augment=True,
                   log_every=20, checkpoint_every_epochs=5)
    c.eval.update(eps=(0.1, 0.3), pgd_steps=20, batch_size=500)
    return c
