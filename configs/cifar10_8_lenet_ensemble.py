"""CIFAR-10, ε = 8/255: the EMA paper's ℓ∞-dist LeNet + MLP head, a joint ensemble of K = 10.

Mirrors ``Theia-4869/EMA-and-Ensemble-Lip-Networks``, ``command/liplenet++_ensemble_cifar10.sh``
(``main_ensemble.py``; docs/RECIPES.md):

* data: CIFAR-10 (``tfds:cifar10``), mean (0.4914, 0.4822, 0.4465), one std 0.2009; random crop
  after padding by 4 pixels with zeros, then a horizontal flip; batch 512, the last partial
  batch kept (98 steps per epoch);
* model: ten ``LeNetFeature(hidden=1024)`` members: ℓ∞-dist conv 3 → 6 (5×5), 2×2 max-pool,
  6 → 16 (5×5), max-pool, ℓ∞-dist 400 → 120 → 1024 (mean shift, no bias), each with its head
  1024 → 512 → tanh → 10; trained jointly: one loss on the members' averaged logits and
  averaged worst-case margins, one optimiser;
* schedule 'v1', epochs (0, 100, 100, 750, 800): ε_train ramps from 0 over the first 100
  epochs; p = 8 until 100, geometric to 1000 at 750, ∞ to 800; lr 0.02 constant to 100,
  cosine to 0 at 800;
* ε_train 0.03451 pixels (0.171777 normalised); loss κ-mixed cross-entropy, κ = 0.95;
* Adam β = (0.9, 0.99), eps 1e-10; weight decay 5e-3 on every parameter (ℓp form on the
  ℓ∞-dist weights, plain on the heads);
* parameter EMA after every step with decay min(1 − 1/(epoch+1), 0.99) (the fork's);
* evaluation at ε_test = 0.03137, PGD-20.

Deliberate differences: the final evaluation uses the EMA weights (the fork evaluates only clean
accuracy with them and certifies the raw weights; ``certify.py --weights raw`` does that), and
the EMA also averages the mean-shift running means. The fork as committed does not run (its
``main_ensemble.py`` imports the deleted ``model/alexnet2.py``), so this is the recipe its
scripts describe.

Published: 33.42% certified at 8/255 ("ℓ∞-dist LeNet", EMA paper README; presumably this script).
"""

import ml_collections

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    # A model section of its own: base_config's is the ℓ∞-dist Net's (depth, width), fields the
    # LeNet does not have and build_model rejects.
    c.model = ml_collections.ConfigDict(dict(
        name="linf_lenet", channels=(6, 16), kernel_size=5, dense=(120, 1024), head="mlp",
        head_hidden=512))
    c.train.update(
        schedule="v1", epochs=(0, 100, 100, 750, 800), batch_size=512, drop_last=False,
        lr=0.02, weight_decay=5e-3, eps_train=0.03451, loss="kappa_ce", kappa=0.95,
        ema_decay=0.99, augment=True, crop_padding=4, crop_mode="zeros", flip=True,
        log_every=50, checkpoint_every_epochs=1)
    c.ensemble.update(size=10, mode="joint")
    c.eval.update(eps=(0.03137,), pgd_steps=20, batch_size=500)
    return c
