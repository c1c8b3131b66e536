"""CIFAR-10, ε = 8/255: pure ℓ∞-dist Net of v1 (6 × 5120), ε_train 0.1568 = 5 × 8/255, mix 0.75.

Published certified accuracy at 8/255 (SPEC §7): 35.42% (v1 table; EMA paper 35.42%).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:cifar10"
    c.model.update(name="linf_dist_net", depth=6, width=5120, head="none")
    c.train.update(batch_size=512, epochs=(0, 100, 100, 750, 800), lr=0.02, weight_decay=5e-3,
                   eps_train=0.1568, loss="hinge", mix=0.75, augment=True, log_every=50,
                   checkpoint_every_epochs=1)
    c.eval.update(eps=(2 / 255, 8 / 255), pgd_steps=20, batch_size=500)
    return c
