"""Fashion-MNIST, ε = 0.1: the pure ℓ∞-dist Net of v1 (ICML 2021).

Mirrors ``zbh2047/L_inf-dist-net``, ``command/ell_inf_dist_net_fashionmnist.sh``
(docs/RECIPES.md):

* data: Fashion-MNIST (``tfds:fashion_mnist``), mean 0.2860, one std 0.3520; random crop after
  padding by 1 pixel with zeros, no flip; batch 512, the last partial batch kept (118 steps);
* model: ``MLP(depth=5, width=5)``: four ℓ∞-dist layers of 5120 units (mean shift, no bias) and
  the output layer 5120 → 10 (bias, no mean shift); no head;
* schedule 'v1', epochs (0, 50, 0, 350, 400): ε_train constant from the first step, p = 8 until
  50, geometric to 1000 at 350, ∞ to 400; lr 0.02 constant to 50, cosine to 0 at 400;
* ε_train 0.225 pixels (0.639205 normalised); loss hinge, mix 1.0 (the max term only), κ = 1;
* Adam β = (0.9, 0.99), eps 1e-10; weight decay 5e-3 on every parameter (ℓp form on the
  ℓ∞-dist weights, plain on the output bias);
* evaluation at ε_test = 0.1, PGD-20.

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is kept and used
for evaluation (``certify.py --weights raw`` for the raw weights).

Published: the V1 README's headline 79.23% certified at ε = 0.1 is presumably the +MLP model
(``configs/fashion_mnist_01_mlp.py``); no figure is given for this script.
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:fashion_mnist"
    c.model.update(name="linf_dist_net", depth=5, width=5120, head="none")
    c.train.update(
        schedule="v1", epochs=(0, 50, 0, 350, 400), batch_size=512, drop_last=False,
        lr=0.02, weight_decay=5e-3, eps_train=0.225, loss="hinge", mix=1.0, kappa=1.0,
        augment=True, crop_padding=1, crop_mode="zeros", flip=False,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.1,), pgd_steps=20, batch_size=500)
    return c
