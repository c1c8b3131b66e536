"""MNIST, ε = 0.3: the pure ℓ∞-dist Net of v1 (ICML 2021).

Mirrors ``zbh2047/L_inf-dist-net``, ``command/ell_inf_dist_net_mnist.sh`` (docs/RECIPES.md):

* data: MNIST (``tfds:mnist``), mean 0.1307, one std 0.3081; random crop after padding by 1
  pixel with zeros, no flip; batch 512, the last partial batch of an epoch kept (118 steps);
* model: ``MLP(depth=5, width=5)``: four ℓ∞-dist layers of 5120 units (mean shift, no bias) and
  the output ℓ∞-dist layer 5120 → 10 (bias, no mean shift), logits = −output; no head;
* schedule 'v1', epochs (0, 50, 0, 350, 400): ε_train constant from the first step (e2 = 0),
  p = 8 until epoch 50, then geometric to 1000 at 350, ∞ from 350 to 400; lr 0.02 constant to
  epoch 50, then a cosine to 0 at 400;
* ε_train 0.45 pixels (1.46056 normalised); loss hinge, mix 0.75, κ = 1 (worst-case margins
  only);
* Adam β = (0.9, 0.99), eps 1e-10; weight decay 5e-3 on every parameter (ℓp form with the
  current p on the ℓ∞-dist weights, plain on the output bias);
* evaluation at ε_test = 0.3 (and 0.1), PGD-20.

Deliberate differences: the parameter EMA of the EMA paper (decay min(1 − 1/(epoch+1), 0.99))
is kept, and the final evaluation uses the EMA weights (it certifies more; ``certify.py
--weights raw`` evaluates the raw weights as the official code does, and
``--config.train.ema_decay=0`` makes the EMA the raw weights); certification uses exact interval
bounds besides the Lipschitz margin.

Published: the V1 README's headline 93.09% certified at ε = 0.3 is presumably the +MLP model
(``configs/mnist_03_mlp.py``); the repository gives no figure for this script.
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:mnist"
    c.model.update(name="linf_dist_net", depth=5, width=5120, head="none")
    c.train.update(
        schedule="v1", epochs=(0, 50, 0, 350, 400), batch_size=512, drop_last=False,
        lr=0.02, weight_decay=5e-3, eps_train=0.45, loss="hinge", mix=0.75, kappa=1.0,
        augment=True, crop_padding=1, crop_mode="zeros", flip=False,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.1, 0.3), pgd_steps=20, batch_size=500)
    return c
