"""CIFAR-10, ε = 8/255: the ℓ∞-dist Net v2 recipe (ICLR 2022).

Mirrors ``zbh2047/L_inf-dist-net-v2``, ``command/cifar_0.03137.sh`` (docs/RECIPES.md):

* data: CIFAR-10 (``tfds:cifar10``), mean (0.4914, 0.4822, 0.4465), one std 0.2009; random crop
  after padding by 3 pixels with edge replication, then a horizontal flip; batch 512, the last
  partial batch kept (98 steps per epoch);
* model: ``MLPModel(depth=6, width=5120)``: 3072 → 5120, four 5120 → 5120 (mean shift, no bias),
  5120 → 10 (bias, no mean shift); clean logits s · (−output) with a learnable scale s (init 1);
* schedule 'v2', epochs (0, 0, 100, 1250, 1300) = (es, ee, ps, pe, T): ε_train constant from
  the first step; p = 8 until 100, geometric to 1000 at 1250, ∞ from 1250 to 1300; lr a cosine
  from 0.03 at step 0 to 0 at 1300;
* ε_train 0.09411 pixels (= 3 · 8/255, 0.468442 normalised); loss v2 ``mixture``, λ geometric
  0.1 → 0.0005 along the p ramp;
* plain Adam β = (0.9, 0.99), eps 1e-10, no weight decay; the scale s has its own lr 0.006 on
  the same cosine;
* evaluation at ε_test = 0.03137, PGD-100.

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is added and used
for evaluation (``certify.py --weights raw`` for the raw weights; ``--config.train.ema_decay=0``
removes it).

Published (V2 README): 40.06% certified (clean 54.30%, PGD 41.84%) at 8/255.
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    c.model.update(name="linf_dist_net", depth=6, width=5120, head="none")
    c.train.update(
        schedule="v2", epochs=(0, 0, 100, 1250, 1300), batch_size=512, drop_last=False,
        lr=0.03, logit_scale_lr=0.006, weight_decay=0.0, eps_train=0.09411, loss="v2",
        lam_start=0.1, lam_end=5e-4,
        augment=True, crop_padding=3, crop_mode="edge", flip=True,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.03137,), pgd_steps=100, batch_size=500)
    return c
