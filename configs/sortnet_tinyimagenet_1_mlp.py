"""Tiny ImageNet, ε = 1/255: SortNet + MLP head (NeurIPS 2022).

Mirrors ``zbh2047/SortNet``, ``commands/tinyimagenet1_255_mlp.sh`` (``main.py``, ``dataset.py``,
``ell_inf_models.py``; docs/RECIPES.md):

* data: Tiny ImageNet, 200 classes, 64 × 64 (``tinyimagenet:FILE``, an npz written by
  ``linf_jax.data_sources.pack_tinyimagenet`` from the ``tiny-imagenet-200`` folder; the file is
  ``$LINF_JAX_TINYIMAGENET``, default ``data/tinyimagenet.npz``; test: the 10,000 validation
  images), mean (0.4802, 0.4481, 0.3975), one std 0.2276; random crop after padding by 5 pixels with
  edge replication, then a horizontal flip; batch 512, the last partial batch kept (196 steps per
  epoch);
* model: ``SortHybridModel(depth=7, width=5120, hidden=512, dropout=0.7)``: an ℓ∞-dist layer 12288 →
  5120 and four sort layers 5120 → 5120 (keep probability q = 0.7), each mean-shifted, no bias, then
  the head 5120 → 512 → tanh → 200; logits s · head, s learnable (init 1);
* schedule 'v2', epochs (0, 500, 100, 980, 1000) = (es, ee, ps, pe, T): ε_train ramps from 0 at
  epoch 0 to its full value at 500 along SortNet's smooth curve (eps_smooth r0 = 0.4: t⁴/((4 −
  3r0)·r0³) below the ramp's first 40%, then a line to 1; 1/7 of ε_train at epoch 200); p = 8 until
  epoch 100, geometric to 1000 at 980, ∞ from 980 to 1000; lr a cosine from 0.02 at step 0 to 0 at
  1000;
* ε_train 0.00431 pixels (1.1 · ε_test); loss ``ce_hinge``: mean [1(argmax s·z = y) · max(0,
  max_{j≠y} r_j + 1)] + λ · CE(s · z), the worst-case margins r unscaled, λ geometric 1 → 0.01 along
  the p ramp;
* AdamW β = (0.9, 0.99), eps 1e-10, one lr for every parameter, decoupled weight decay 0.02 · lr on
  the head's weights and biases and on the scale s, none on the distance layers (their weights and
  biases: ``train.dist_decay='none'``, ``train.decay_logit_scale=True``);
* evaluation at ε_test = 0.00392, PGD-100 (step ε/4), after the running means are re-estimated over
  the training set at p = ∞ (the official ``update_bn``).

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is added and used for
evaluation (``certify.py --weights raw`` for the raw weights; ``--config.train.ema_decay=0`` removes
it); each block of 32 examples keeps exactly round(q · n) units of a layer where the official code
draws that number from Binomial(n, q) per layer call (JAX needs the size static; docs/METHOD.md §10).

Published: 17.46% certified (clean 23.91%) at 1/255, the mean of the eight runs in
``logs/tinyimagenet1_255_mlp/exp0-7/test_inf.log`` (certified 17.21–17.92%).
"""

import os

import ml_collections

from linf_jax.config import base_config

DATA_ENV = "LINF_JAX_TINYIMAGENET"


def get_config():
    c = base_config()
    c.data.source = "tinyimagenet:" + os.path.normpath(
        os.environ.get(DATA_ENV, "data/tinyimagenet.npz"))
    # A model section of its own: base_config's has the ℓ∞-dist Net's head fields,
    # which a SortNet fixes itself.
    c.model = ml_collections.ConfigDict(dict(
        name="sort_net_mlp", depth=7, width=5120, head_hidden=512, q=0.7, identity_init=False))
    c.train.update(
        schedule="v2", epochs=(0, 500, 100, 980, 1000), batch_size=512, drop_last=False,
        lr=0.02, logit_scale_lr=None, weight_decay=0.02, dist_decay="none",
        decay_logit_scale=True, adam_eps=1e-10, p_start=8.0, p_end=1000.0,
        eps_train=0.00431, eps_smooth=0.4, loss="ce_hinge", lam_start=1.0, lam_end=0.01,
        augment=True, crop_padding=5, crop_mode="edge", flip=True,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.00392,), pgd_steps=100, batch_size=500)
    return c
