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
    # Which kernels the distance layers run (linf_jax.ops.kernel_backend): 'auto' (the library
    # default: LINF_JAX_KERNELS when set, else the native CPU kernels where they are the default
    # and the XLA code elsewhere), 'native', 'xla' or 'pallas'.
    c.kernels = "auto"

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
    c.model.head_hidden = 256  # hidden width of the MLP head (head='mlp')

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    # The recipe family that reads train.epochs (docs/RECIPES.md, linf_jax/schedules.py):
    # 'v1' (e0, e1, e2, e3, T) of the ICML 2021 code and the EMA paper, 'v2' (es, ee, ps, pe, T)
    # of the ICLR 2022 code.
    c.train.schedule = "v1"
    c.train.epochs = (0, 40, 40, 160, 180)  # v1: (e0, e1, e2, e3, T)
    # False: an epoch is ceil(N / batch_size) steps, the last one a partial batch (PyTorch's
    # DataLoader default, which every official script uses); True: floor(N / batch_size).
    c.train.drop_last = False
    c.train.lr = 0.02
    # Base lr of the v2 loss's logit scale s on the same schedule (None: train.lr).
    c.train.logit_scale_lr = ml_collections.config_dict.placeholder(float)
    # Decoupled, scaled by the current lr, on every parameter but the logit scale: the l_p form
    # (current p) on l_inf-dist weights, plain on biases and head weights (linf_jax/optim.py).
    c.train.weight_decay = 5e-3
    c.train.adam_eps = 1e-10  # Adam(β = (0.9, 0.99), eps = 1e-10), as the official code
    c.train.eps_train = 0.15  # pixels; the certified target is 0.1
    c.train.loss = "hinge"
    c.train.mix = 0.75
    # κ · loss(worst-case margins) + (1 − κ) · loss(clean margins), for hinge and kappa_ce;
    # 1: the worst-case margins only (every official hinge script).
    c.train.kappa = 1.0
    c.train.lam_start = 0.0  # v2 loss: λ, geometric lam_start -> lam_end along the p ramp
    c.train.lam_end = 0.0
    c.train.p_start = 8.0
    c.train.p_end = 1000.0
    c.train.ema_decay = 0.99
    c.train.augment = False  # 8×8 digits are too small to crop
    # Random crop after padding by crop_padding pixels (None: the data set's, 1 for MNIST-like,
    # 4 for CIFAR-like, 0 otherwise) with crop_mode 'zeros' (black, v1) or 'edge' (v2), then a
    # horizontal flip when flip (None: the data set's, CIFAR-like only).
    c.train.crop_padding = ml_collections.config_dict.placeholder(int)
    c.train.crop_mode = "zeros"
    c.train.flip = ml_collections.config_dict.placeholder(bool)
    c.train.log_every = 10
    c.train.checkpoint_every_epochs = 10
    c.train.keep_checkpoints = 2
    # GPU only: XLA's deterministic ops (scatter-adds in a fixed order), so that a resumed run is
    # bit-identical to an uninterrupted one there too, at some cost in speed. The CPU and TPU
    # backends are deterministic already. Needs XLA_FLAGS before JAX starts its backend:
    # train.py sets it; in a notebook, see linf_jax.train_lib.request_determinism.
    c.train.deterministic = False

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
