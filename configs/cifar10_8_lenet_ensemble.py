"""CIFAR-10, ε = 8/255: the EMA paper's ℓ∞-dist LeNet + MLP head, a joint ensemble of K = 10.

Published certified accuracy at 8/255 (SPEC §7): 33.42% (LeNet ensemble, arXiv 2107.00230).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    c.model = c.model.__class__(dict(name="linf_lenet", channels=(6, 16), kernel_size=5,
                                     dense=(120, 1024), head="mlp"))
    c.train.update(batch_size=512, epochs=(0, 100, 100, 750, 800), lr=0.02, weight_decay=5e-3,
                   eps_train=1.15 * 8 / 255, loss="kappa_ce", kappa=0.95, augment=True,
                   log_every=50, checkpoint_every_epochs=1)
    c.ensemble.update(size=10, mode="joint")
    c.eval.update(eps=(8 / 255,), pgd_steps=20, batch_size=500)
    return c
