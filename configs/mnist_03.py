"""MNIST, ε = 0.3: the pure ℓ∞-dist Net of v1 (5 × 5120, hinge mix 0.75, ε_train 0.45).

Published certified accuracy at ε = 0.3 (SPEC §7): 93.09% (ℓ∞-dist Net, ICML 2021), 93.14% with
the EMA (arXiv 2107.00230). Needs TFDS MNIST (`tfds:mnist`); see README for offline data.
"""

from linf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds:mnist"
    c.model.update(name="linf_dist_net", depth=5, width=5120, head="none")
    c.train.update(batch_size=512, epochs=(0, 50, 50, 350, 400), lr=0.02, weight_decay=5e-3,
                   eps_train=0.45, loss="hinge", mix=0.75, augment=True, log_every=50,
                   checkpoint_every_epochs=1)
    c.eval.update(eps=(0.1, 0.3), pgd_steps=20, batch_size=500)
    return c
