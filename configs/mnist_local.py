"""The real-data protocol runnable offline: train on the first 5,000 images of the MNIST test
split in ../shared/data/mnist, certify on the last 5,000 (RESULTS.md).

A reduced ℓ∞-dist Net (4 × 256 instead of the paper's 5 × 5120, 50 epochs instead of 400, so a
2-core CPU trains a single model in about two minutes); ε_train 0.45 and hinge mix 0.75 as in v1
for ε = 0.3; PGD-20 in the end-of-run evaluation. Figures in RESULTS.md.
"""

import os

from linf_jax.config import base_config

MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                         "mnist")


def get_config():
    c = base_config()
    c.data.source = "idx:" + os.path.normpath(MNIST_DIR)
    c.data.train_split = "test[:5000]"
    c.data.test_split = "test[5000:]"
    c.model.update(name="linf_dist_net", depth=4, width=256, head="none")
    c.train.update(batch_size=250, epochs=(0, 8, 8, 40, 50), lr=0.02, weight_decay=5e-3,
                   eps_train=0.45, loss="hinge", mix=0.75, augment=True, log_every=20,
                   checkpoint_every_epochs=5)
    c.eval.update(eps=(0.1, 0.3), pgd_steps=20, batch_size=500)
    return c
