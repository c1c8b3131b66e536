"""Fashion-MNIST, ε = 0.1: the ℓ∞-dist Net + MLP head of v1 (ICML 2021).

Mirrors ``zbh2047/L_inf-dist-net``, ``command/ell_inf_dist_net++_fashionmnist.sh``
(docs/RECIPES.md):

* data: Fashion-MNIST (``tfds:fashion_mnist``), mean 0.2860, one std 0.3520; random crop after
  padding by 1 pixel with zeros, no flip; batch 512, the last partial batch kept (118 steps);
* model: ``MLPFeature(depth=4, width=5)``: four ℓ∞-dist layers of 5120 units (mean shift, no
  bias), then the head 5120 → 512 → tanh → 10;
* schedule 'v1', epochs (0, 50, 50, 350, 400): ε_train ramps linearly from 0 over the first 50
  epochs; p = 8 until 50, geometric to 1000 at 350, ∞ to 400; lr 0.02 constant to 50, cosine
  to 0 at 400;
* ε_train 0.11 pixels (0.3125 normalised); loss κ-mixed cross-entropy, κ = 0.5;
* Adam β = (0.9, 0.99), eps 1e-10; weight decay 5e-3 on every parameter (ℓp form on the
  ℓ∞-dist weights, plain on the head's weights and biases);
* evaluation at ε_test = 0.1, PGD-20.

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is kept and used
for evaluation (``certify.py --weights raw`` for the raw weights).

Published: 79.23% certified at ε = 0.1 (V1 README headline, presumably this script).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:fashion_mnist"
    c.model.update(name="linf_dist_net_mlp", depth=4, width=5120, head="mlp", head_hidden=512)
    c.train.update(
        schedule="v1", epochs=(0, 50, 50, 350, 400), batch_size=512, drop_last=False,
        lr=0.02, weight_decay=5e-3, eps_train=0.11, loss="kappa_ce", kappa=0.5,
        augment=True, crop_padding=1, crop_mode="zeros", flip=False,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.1,), pgd_steps=20, batch_size=500)
    return c
