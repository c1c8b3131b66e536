"""The offline real-data protocol of ``mnist_local`` with a SortNet: train on the first 5,000
images of the MNIST test split, certify on the last 5,000 (RESULTS.md, "SortNet against the
ℓ∞-dist net").

The MNIST test split as IDX files is read from ``$LINF_JAX_MNIST_DIR`` (default
``data/mnist``), as in ``configs/mnist_local.py``.

linf-jax's own scaled-down version of SortNet's MNIST ε = 0.3 script (``zbh2047/SortNet``,
``commands/mnist0.3.sh``; docs/RECIPES.md), not a paper preset, at the budget of
``mnist_local``: a pure SortNet of depth 4 and width 256 (4 distance layers, as the 4 × 256
ℓ∞-dist Net of ``mnist_local``) instead of depth 5 × 5120, 50 epochs instead of 1,500, batch 250.
As the script: keep probability q = 0.75, top 10 distances, identity init, the v2 schedule
family with its epochs scaled to 50, ``(0, 0, 3, 48, 50)`` (``0,0,100,1450,1500``: p = 8, then
the p ramp to 1000, then ∞; ε_train constant from step 0, so the smooth ε ramp changes
nothing), ε_train 0.45 pixels, the mixture loss (``'v2'``) with λ 0.02 → 0.0002, lr 0.02 on a
cosine, Adam(0.9, 0.99) with decoupled decay 0.02 on the logit scale only (a pure SortNet has
no other non-distance parameter), edge-padded crops by 1 pixel; PGD-20 in the end-of-run
evaluation. ``--config.model.q=1.0`` is the ℓ∞-dist net under the same recipe.
"""

import os

from linf_jax.config import base_config

MNIST_DIR_ENV = "LINF_JAX_MNIST_DIR"


def get_config():
    c = base_config()
    c.data.source = "idx:" + os.path.normpath(os.environ.get(MNIST_DIR_ENV, "data/mnist"))
    c.data.train_split = "test[:5000]"
    c.data.test_split = "test[5000:]"
    c.model = dict(name="sort_net", depth=4, width=256, q=0.75, top_k=10, identity_init=True,
                   mask_block=32)
    c.train.update(schedule="v2", batch_size=250, epochs=(0, 0, 3, 48, 50), lr=0.02,
                   weight_decay=0.02, dist_decay="none", decay_logit_scale=True,
                   eps_train=0.45, eps_smooth=0.4, loss="v2", lam_start=0.02, lam_end=0.0002,
                   augment=True, crop_padding=1, crop_mode="edge", log_every=20,
                   checkpoint_every_epochs=5)
    c.eval.update(eps=(0.1, 0.3), pgd_steps=20, batch_size=500)
    return c
