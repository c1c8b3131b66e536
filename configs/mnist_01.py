"""MNIST, ε = 0.1: the ℓ∞-dist Net v2 recipe (ICLR 2022).

Mirrors ``zbh2047/L_inf-dist-net-v2``, ``command/mnist_0.1.sh`` (docs/RECIPES.md):

* data: MNIST (``tfds:mnist``), mean 0.1307, one std 0.3081; random crop after padding by 1
  pixel with edge replication, no flip; batch 512, the last partial batch kept (118 steps);
* model: ``MLPModel(depth=5, width=5120)``: 784 → 5120, three 5120 → 5120 (mean shift, no bias),
  5120 → 10 (bias, no mean shift); clean logits s · (−output) with a learnable scale s (init 1);
* schedule 'v2', epochs (0, 0, 25, 400, 450) = (es, ee, ps, pe, T): ε_train constant from the
  first step (ee ≤ es); p = 8 until epoch 25, geometric to 1000 at 400, ∞ from 400 to 450; lr a
  cosine from 0.03 at step 0 to 0 at 450;
* ε_train 0.3 pixels (= 3 · ε_test, 0.97371 normalised); loss v2 ``mixture``:
  mean max_j clip(r_j / 2ε, 0, 1) + λ · CE(s · z), λ geometric 0.05 → 0.0002 along the p ramp;
* plain Adam β = (0.9, 0.99), eps 1e-10, no weight decay; the scale s has its own lr 0.006 on
  the same cosine;
* evaluation at ε_test = 0.1, PGD-100.

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is added and used
for evaluation (``certify.py --weights raw`` for the raw weights; ``--config.train.ema_decay=0``
removes it).

Published (V2 README): 97.95% certified (clean 98.93%, PGD 98.03%) at ε = 0.1.
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:mnist"
    c.model.update(name="linf_dist_net", depth=5, width=5120, head="none")
    c.train.update(
        schedule="v2", epochs=(0, 0, 25, 400, 450), batch_size=512, drop_last=False,
        lr=0.03, logit_scale_lr=0.006, weight_decay=0.0, eps_train=0.3, loss="v2",
        lam_start=0.05, lam_end=2e-4,
        augment=True, crop_padding=1, crop_mode="edge", flip=False,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.1,), pgd_steps=100, batch_size=500)
    return c
