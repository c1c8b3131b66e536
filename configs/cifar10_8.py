"""CIFAR-10, ε = 8/255: the pure ℓ∞-dist Net of v1 (ICML 2021).

Mirrors ``zbh2047/L_inf-dist-net``, ``command/ell_inf_dist_net_cifar10.sh`` (docs/RECIPES.md):

* data: CIFAR-10 (``tfds:cifar10``), mean (0.4914, 0.4822, 0.4465), one std 0.2009; random crop
  after padding by 4 pixels with zeros, then a horizontal flip with probability 0.5; batch 512,
  the last partial batch kept (98 steps per epoch);
* model: ``MLP(depth=6, width=5)``: five ℓ∞-dist layers of 5120 units (mean shift, no bias) and
  the output layer 5120 → 10 (bias, no mean shift); no head;
* schedule 'v1', epochs (0, 100, 0, 750, 800): ε_train constant from the first step, p = 8 until
  100, geometric to 1000 at 750, ∞ to 800; lr 0.02 constant to 100, cosine to 0 at 800;
* ε_train 0.1568 pixels (≈ 5 · 8/255, 0.780488 normalised); loss hinge, mix 0.75, κ = 1;
* Adam β = (0.9, 0.99), eps 1e-10; weight decay 5e-3 on every parameter (ℓp form on the
  ℓ∞-dist weights, plain on the output bias);
* evaluation at ε_test = 0.03137 (8/255 as the script writes it; and 2/255), PGD-20.

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is kept and used
for evaluation (``certify.py --weights raw`` for the raw weights).

Published: 33.30% certified at 8/255 for v1's ℓ∞-dist Net, as the v2 paper quotes it (the V1
README gives no figure for this script; its 35.42% is the +MLP model, configs/cifar10_8_mlp.py).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    c.model.update(name="linf_dist_net", depth=6, width=5120, head="none")
    c.train.update(
        schedule="v1", epochs=(0, 100, 0, 750, 800), batch_size=512, drop_last=False,
        lr=0.02, weight_decay=5e-3, eps_train=0.1568, loss="hinge", mix=0.75, kappa=1.0,
        augment=True, crop_padding=4, crop_mode="zeros", flip=True,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(2 / 255, 0.03137), pgd_steps=20, batch_size=500)
    return c
