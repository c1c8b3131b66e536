"""ImageNet 64 × 64, ε = 1/255: SortNet + MLP head (NeurIPS 2022).

Mirrors ``zbh2047/SortNet``, ``commands/imagenet1_255_mlp.sh`` (``main.py``, ``dataset.py``,
``ell_inf_models.py``; docs/RECIPES.md):

* data: ImageNet 64 × 64, 1,000 classes (``tfds:imagenet_resized/64x64``, the downsampled ImageNet;
  test: its 50,000-image ``validation`` split), mean (0.4815, 0.4578, 0.4082), one std 0.2128;
  random crop after padding by 4 pixels with edge replication, then a horizontal flip; batch 1024,
  the last partial batch kept (1,252 steps per epoch);
* model: ``SortHybridModel(depth=7, width=5120, hidden=2048, dropout=0.7)``: an ℓ∞-dist layer 12288
  → 5120 and four sort layers 5120 → 5120 (keep probability q = 0.7), each mean-shifted, no bias,
  then the head 5120 → 2048 → tanh → 1000; logits s · head, s learnable (init 1);
* schedule 'v2', epochs (0, 200, 30, 290, 300) = (es, ee, ps, pe, T): ε_train ramps from 0 at epoch
  0 to its full value at 200 along SortNet's smooth curve (eps_smooth r0 = 0.4: t⁴/((4 − 3r0)·r0³)
  below the ramp's first 40%, then a line to 1; 1/7 of ε_train at epoch 80); p = 8 until epoch 30,
  geometric to 1000 at 290, ∞ from 290 to 300; lr a cosine from 0.01 at step 0 to 0 at 300;
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
draws that number from Binomial(n, q) per layer call (JAX needs the size static; docs/METHOD.md §10);
the script trains on two GPUs (512 examples each, each GPU's own mean-shift statistics); here one
batch of 1024; the data are TFDS's downsampled ImageNet where the official loader reads an
``Imagenet64`` image folder (the same images; the class indices may be ordered differently).

Published: 8.94% certified (clean 13.32%) at 1/255, the mean of the eight runs in
``logs/imagenet1_255_mlp/exp0-7/test_inf.log`` (certified 8.89–9.02%).
"""

import ml_collections

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:imagenet_resized/64x64"
    c.data.test_split = "validation"
    # A model section of its own: base_config's has the ℓ∞-dist Net's head fields,
    # which a SortNet fixes itself.
    c.model = ml_collections.ConfigDict(dict(
        name="sort_net_mlp", depth=7, width=5120, head_hidden=2048, q=0.7, identity_init=False))
    c.train.update(
        schedule="v2", epochs=(0, 200, 30, 290, 300), batch_size=1024, drop_last=False,
        lr=0.01, logit_scale_lr=None, weight_decay=0.02, dist_decay="none",
        decay_logit_scale=True, adam_eps=1e-10, p_start=8.0, p_end=1000.0,
        eps_train=0.00431, eps_smooth=0.4, loss="ce_hinge", lam_start=1.0, lam_end=0.01,
        augment=True, crop_padding=4, crop_mode="edge", flip=True,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.00392,), pgd_steps=100, batch_size=500)
    return c
