"""What a config makes: the objects a run builds from its (validated) config, in one place.

An epoch is ``ceil(N / batch_size)`` steps over a permutation of the training split (the last
batch partial, as PyTorch's DataLoader; ``train.drop_last`` drops it), in an order drawn from
``(seed, epoch)`` (and the member, for independent ensembles).

The schedule, the optimiser, the loss, the batch preparation (augmentation and normalisation),
the epoch's batches and data order, the device mesh, the model and the kernel choice. The
training step (:mod:`linf_jax.train_lib`) and the loop (:mod:`linf_jax.trainer`) take these
objects and never read the config themselves; the schedule preview (``linf-schedule``) and
:func:`linf_jax.checkpoint.load_run` build the same objects from a run's saved config.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from linf_jax import data as data_lib
from linf_jax import losses, ops, optim, parallel
from linf_jax.config import LAMBDA_LOSSES, ConfigError, first_line, num_members
from linf_jax.schedules import Schedule


def make_schedule(config, steps_per_epoch: int, std: float) -> Schedule:
    """The run's :class:`Schedule` (family ``train.schedule``, smooth ε ramp
    ``train.eps_smooth``), ε in normalised units (``eps_train / std``); λ is 0 unless the loss
    has one (v2, ce_hinge: :data:`linf_jax.config.LAMBDA_LOSSES`)."""
    t = config.train
    with_lam = t.loss in LAMBDA_LOSSES
    return Schedule(
        epochs=tuple(int(e) for e in t.epochs),
        steps_per_epoch=steps_per_epoch,
        lr=float(t.lr),
        eps_train=data_lib.eps_to_normalized(float(t.eps_train), std),
        p_start=float(t.p_start),
        p_end=float(t.p_end),
        lam_start=float(t.lam_start) if with_lam else 0.0,
        lam_end=float(t.lam_end) if with_lam else 0.0,
        ema_decay=float(t.ema_decay),
        family=t.get("schedule", "v1"),
        eps_smooth=float(t.get("eps_smooth", 0.0)),
    )


def logit_scale_lr(config) -> float:
    """The base lr of the logit scale: ``train.logit_scale_lr``, or ``train.lr`` when None."""
    v = config.train.get("logit_scale_lr")
    return float(config.train.lr if v is None else v)


def make_optimizer(config, schedule: Schedule) -> optax.GradientTransformation:
    """The optimiser of a run: Adam, ``train.weight_decay`` (0: none, the v2 recipe) with the
    decay policy ``train.dist_decay`` / ``train.decay_logit_scale`` (SortNet: 'none' / True),
    and the schedule's lr, with ``train.logit_scale_lr`` for the logit scale."""
    t = config.train
    return optim.make_optimizer(schedule, float(t.weight_decay), float(t.get("adam_eps", 1e-10)),
                                logit_scale_lr=logit_scale_lr(config),
                                dist_decay=t.get("dist_decay", "lp"),
                                decay_logit_scale=bool(t.get("decay_logit_scale", False)))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False, data_devices: int = 1
                    ) -> int:
    """Steps of an epoch over ``n`` examples: ``ceil(n / batch_size)`` (the last batch partial,
    as PyTorch's DataLoader with its default ``drop_last=False``) or ``floor`` with
    ``drop_last``; see :func:`epoch_batches`."""
    return len(epoch_batches(n, batch_size, drop_last, data_devices))


def epoch_batches(n: int, batch_size: int, drop_last: bool = False, data_devices: int = 1
                  ) -> list[tuple[int, int]]:
    """``(start, stop)`` into the epoch's order for each step: full batches, then the partial
    one unless ``drop_last``. With several devices on the data axis the partial batch is cut to
    a multiple of their number (at most ``data_devices − 1`` examples of an epoch left out;
    none left means no partial step)."""
    full, rest = divmod(n, batch_size)
    out = [(i * batch_size, (i + 1) * batch_size) for i in range(full)]
    rest -= rest % data_devices
    if rest and not drop_last:
        out.append((full * batch_size, full * batch_size + rest))
    return out


def augmentation(config, meta: dict) -> tuple[int, str, bool]:
    """``(padding, mode, flip)`` of the random crop (:func:`linf_jax.data.crop_flip`):
    ``train.crop_padding`` / ``train.crop_mode`` / ``train.flip``, the data set's where None;
    ``(0, 'zeros', False)`` (nothing) without ``train.augment``."""
    t = config.train
    if not t.augment:
        return 0, "zeros", False
    kind = meta.get("augment", "none")
    pad = t.get("crop_padding")
    flip = t.get("flip")
    return (data_lib.DEFAULT_PADDING[kind] if pad is None else int(pad),
            t.get("crop_mode", "zeros"), kind == "cifar" if flip is None else bool(flip))


def make_mesh(config):
    """The device mesh of a run (``config.parallel.num_devices``, ``config.ensemble.shard``);
    the batch size must split evenly over its ``data`` axis."""
    try:
        mesh = parallel.make_mesh(config.parallel.num_devices, num_members(config),
                                  bool(config.ensemble.shard))
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None
    data = mesh.shape[parallel.DATA]
    if config.train.batch_size % data:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not allowed: a "
                          f"multiple of the {data} devices of the data axis")
    return mesh


def make_loss_fn(config) -> Callable:
    """``loss_fn(logits, margins, labels, eps, lam, scale)`` of ``train.loss``: ``hinge`` (mix,
    κ), ``kappa_ce`` (κ), ``v2`` (ε in normalised units, λ, the logit scale) or ``ce_hinge``
    (λ, the logit scale; SortNet's +MLP loss); see :mod:`linf_jax.losses` and docs/METHOD.md
    §4."""
    t = config.train
    if t.loss == "hinge":
        mix, kappa = float(t.mix), float(t.kappa)
        return lambda logits, margins, labels, eps, lam, scale: losses.kappa_mix(
            lambda m, _: losses.hinge_loss(m, mix), logits, margins, labels, kappa)
    if t.loss == "kappa_ce":
        kappa = float(t.kappa)
        return lambda logits, margins, labels, eps, lam, scale: losses.kappa_ce_loss(
            logits, margins, labels, kappa)
    if t.loss == "ce_hinge":
        return lambda logits, margins, labels, eps, lam, scale: losses.ce_hinge_loss(
            logits, margins, labels, lam, scale)
    return lambda logits, margins, labels, eps, lam, scale: losses.v2_mixture_loss(
        logits, margins, labels, eps, lam, scale)


def make_prepare_fn(config, meta: dict) -> Callable:
    """``prepare(images, labels, idx, key) -> (x, y)``: the batch ``idx`` of the split on the
    device, as pixels, randomly cropped and flipped (:func:`augmentation`), normalised."""
    mean = jnp.asarray(meta["mean"], jnp.float32)
    std = float(meta["std"])
    pad, pad_mode, flip = augmentation(config, meta)

    def prepare(images, labels, idx, key):
        x = data_lib.as_pixels(images[idx])
        x = data_lib.crop_flip(key, x, pad, pad_mode, flip)
        return data_lib.normalize(x, mean, std), labels[idx]

    return prepare


def data_key(rng):
    """The key of the data order (:func:`epoch_order`), from the run's key."""
    return jax.random.fold_in(rng, 1)


def augment_key(rng):
    """The key of the augmentation; each step folds in its number."""
    return jax.random.fold_in(rng, 2)


def epoch_order(rng, epoch: int, n: int, k: int | None) -> jax.Array:
    """The data order of an epoch, from ``(seed, epoch)`` (and the member for independent
    ensembles): ``[n]`` or ``[K, n]``."""
    key = jax.random.fold_in(data_key(rng), epoch)
    if k is None:
        return jax.random.permutation(key, n)
    return jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n))(
        jnp.arange(k))


def build_model(config, num_classes: int):
    """The model of ``config.model`` (:func:`linf_jax.models.build_model`); a bad model field is
    a one-line :class:`ConfigError`."""
    from linf_jax.models import build_model as build

    try:
        return build(config.model, num_classes)
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None


def kernels(config) -> ops.KernelChoice:
    """The run's :class:`linf_jax.ops.KernelChoice`: ``config.kernels`` unless it is ``auto``,
    then ``LINF_JAX_KERNELS`` where set, else ``auto`` (resolved now: the native build and the
    calibration run here the first time they are needed)."""
    try:
        return ops.resolve(config.get("kernels", "auto"), "config.kernels")
    except ValueError as err:  # LINF_JAX_KERNELS, LINF_JAX_NATIVE_ISA, native on a GPU
        raise ConfigError(first_line(err)) from None
