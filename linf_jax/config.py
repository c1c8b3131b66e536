"""The configuration schema: every field a run reads, with the library's defaults.

``configs/*.py`` start from :func:`base_config` and change what their experiment needs, so
every experiment has the same fields and any of them can be overridden on the command line
(``--config.model.width=1024``).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The default experiment (configs/default.py): a small net on the 8×8 digits."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    c.model.name = "linf_dist_net"
    c.model.depth = 4
    c.model.width = 512
    c.model.head = "none"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.epochs = (0, 40, 40, 160, 180)  # (e0, e1, e2, e3, T), SPEC §4
    c.train.lr = 0.02
    c.train.weight_decay = 5e-3
    c.train.adam_eps = 1e-10  # Adam(β = (0.9, 0.99), eps = 1e-10), SPEC §4
    c.train.eps_train = 0.15  # pixels; the certified target is 0.1
    c.train.loss = "hinge"
    c.train.mix = 0.75
    c.train.kappa = 0.5
    c.train.lam_start = 0.0
    c.train.lam_end = 0.0
    c.train.p_start = 8.0
    c.train.p_end = 1000.0
    c.train.ema_decay = 0.99
    c.train.augment = False  # 8×8 digits are too small to crop
    c.train.log_every = 10
    c.train.checkpoint_every_epochs = 10
    c.train.keep_checkpoints = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.eps = (0.1,)  # pixels
    c.eval.pgd_steps = 100
    c.eval.pgd_restarts = 1
    c.eval.batch_size = 360

    c.ensemble = ml_collections.ConfigDict()
    c.ensemble.size = 1
    c.ensemble.mode = "joint"
    c.ensemble.shard = False
    # How one program runs the member axis: auto (one member after the other on the CPU, where
    # that is faster, batched by vmap on accelerators), batched, or sequential; see
    # linf_jax.ensemble.resolve_execution. Results agree up to float rounding.
    c.ensemble.execution = "auto"

    c.parallel = ml_collections.ConfigDict()
    c.parallel.num_devices = 0  # 0: every device (data parallel; members too with ensemble.shard)
    return c
