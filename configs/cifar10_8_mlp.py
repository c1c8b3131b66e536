"""CIFAR-10, ε = 8/255: the ℓ∞-dist Net + MLP head of v1 (ICML 2021).

Mirrors ``zbh2047/L_inf-dist-net``, ``command/ell_inf_dist_net++_cifar10.sh``
(docs/RECIPES.md):

* data: CIFAR-10 (``tfds:cifar10``), mean (0.4914, 0.4822, 0.4465), one std 0.2009; random crop
  after padding by 4 pixels with zeros, then a horizontal flip; batch 512, the last partial
  batch kept (98 steps per epoch);
* model: ``MLPFeature(depth=5, width=5)``: five ℓ∞-dist layers of 5120 units (mean shift, no
  bias), then the head 5120 → 512 → tanh → 10;
* schedule 'v1', epochs (0, 100, 100, 750, 800): ε_train ramps linearly from 0 over the first
  100 epochs; p = 8 until 100, geometric to 1000 at 750, ∞ to 800; lr 0.02 constant to 100,
  cosine to 0 at 800;
* ε_train 0.03451 pixels (= 1.1 · 8/255, 0.171777 normalised); loss κ-mixed cross-entropy with
  κ = 1.0 (cross-entropy of the worst-case margins only);
* Adam β = (0.9, 0.99), eps 1e-10; weight decay 5e-3 on every parameter (ℓp form on the
  ℓ∞-dist weights, plain on the head's weights and biases);
* evaluation at ε_test = 0.03137, PGD-20.

Deliberate differences: the parameter EMA (decay min(1 − 1/(epoch+1), 0.99)) is kept and used
for evaluation (``certify.py --weights raw`` for the raw weights). The EMA paper's
``command/lipnet++_cifar10.sh`` (``Theia-4869/EMA-and-Ensemble-Lip-Networks``) is this recipe
with κ = 0.95 (V1's value before its commit 864edce) plus the EMA: ``--config.train.kappa=0.95``.

Published: 35.42% certified at 8/255 (V1 README headline, presumably this script; the EMA paper
reports the same figure).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    c.model.update(name="linf_dist_net_mlp", depth=5, width=5120, head="mlp", head_hidden=512)
    c.train.update(
        schedule="v1", epochs=(0, 100, 100, 750, 800), batch_size=512, drop_last=False,
        lr=0.02, weight_decay=5e-3, eps_train=0.03451, loss="kappa_ce", kappa=1.0,
        augment=True, crop_padding=4, crop_mode="zeros", flip=True,
        log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(0.03137,), pgd_steps=20, batch_size=500)
    return c
