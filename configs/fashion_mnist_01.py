"""Fashion-MNIST, ε = 0.1: pure ℓ∞-dist Net (5 × 5120), ε_train 0.225, hinge mix 1.0.

Published certified accuracy at ε = 0.1 (SPEC §7): 79.23% (ℓ∞-dist Net, ICML 2021).
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:fashion_mnist"
    c.model.update(name="linf_dist_net", depth=5, width=5120, head="none")
    c.train.update(batch_size=512, epochs=(0, 50, 50, 350, 400), lr=0.02, weight_decay=5e-3,
                   eps_train=0.225, loss="hinge", mix=1.0, augment=True, log_every=50,
                   checkpoint_every_epochs=1)
    c.eval.update(eps=(0.1,), pgd_steps=20, batch_size=500)
    return c
