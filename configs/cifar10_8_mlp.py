"""CIFAR-10, ε = 8/255: ℓ∞-dist Net + MLP head (5 × 5120 + 2-layer head), κ-mixed cross-entropy
with κ = 0.95 (the EMA paper; v1 used 1.0) and ε_train = 1.15 × 8/255, with the EMA.

Published certified accuracy at 8/255 (SPEC §7): 35.42% (ℓ∞-dist Net + MLP, v1 and EMA paper).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    c.model.update(name="linf_dist_net_mlp", depth=5, width=5120, head="mlp")
    c.train.update(batch_size=512, epochs=(0, 100, 100, 750, 800), lr=0.02, weight_decay=5e-3,
                   eps_train=1.15 * 8 / 255, loss="kappa_ce", kappa=0.95, augment=True,
                   log_every=50, checkpoint_every_epochs=1)
    c.eval.update(eps=(8 / 255,), pgd_steps=20, batch_size=500)
    return c
