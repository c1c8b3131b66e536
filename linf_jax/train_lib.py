"""Training: TrainState, the jitted train step, the loop, metrics and checkpoints.

``train_step(state, images, labels, batch_idx, p_mode)`` is ONE jitted pure function: it reads
p, ε, lr, λ and the EMA decay from :mod:`linf_jax.schedules` as functions of ``state.step``, runs
the model, the loss and the Optax chain, and returns the new state and metrics. ``p_mode`` is
static ('start' → the integer p = 8 fast path, 'ramp' → traced p, 'inf' → the exact ℓ∞ kernels),
so each phase compiles once and the ramp never recompiles.

Ensembles (``config.ensemble.size = K > 1``) are the same step over a stacked state (leading
member axis): ``joint`` averages the members' logits and margins before one loss (the EMA
paper), ``independent`` vmaps the whole single-member loss with member-specific data order and
augmentation. The optimiser update and the EMA are vmapped over members in both modes.

An epoch is ``ceil(N / batch_size)`` steps over a permutation of the training split, the last
batch partial (PyTorch's DataLoader default, which the official scripts use; ``train.drop_last``
drops it), and the schedules are those of the family ``train.schedule`` (docs/RECIPES.md).
Randomness comes only from keys derived from ``(seed, step)`` (augmentation) and
``(seed, epoch)`` (data order), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from linf_jax import certify as certify_lib
from linf_jax import data as data_lib
from linf_jax import ensemble as ensemble_lib
from linf_jax import losses, ops, optim, parallel
from linf_jax.models import build_model, is_1_lipschitz
from linf_jax.schedules import FAMILIES, Schedule

INF = float("inf")
LOSSES = ("hinge", "kappa_ce", "v2")
ENSEMBLE_MODES = ("joint", "independent")


class ConfigError(ValueError):
    """A user mistake in the configuration; its message is one line naming the field."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


class CheckpointError(RuntimeError):
    """A workdir without a usable checkpoint (missing, truncated or unreadable)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array  # raw uint32 key data of PRNGKey(seed); all keys derive from it


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def _field(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(config) -> None:
    """Checks every field a user can get wrong; raises :class:`ConfigError` (one line)."""
    t = config.train
    _require(isinstance(config.seed, int) and not isinstance(config.seed, bool), "seed",
             config.seed, "an integer")
    _require(config.get("kernels", "auto") in ops.KERNEL_CHOICES, "kernels",
             config.get("kernels"), f"one of {', '.join(ops.KERNEL_CHOICES)}")
    _require(isinstance(t.get("deterministic", False), bool), "train.deterministic",
             t.get("deterministic"), "True or False")
    for f in ("source", "train_split", "test_split"):
        v = config.data[f]
        _require(isinstance(v, str) and v.strip() != "", f"data.{f}", v, "a non-empty string")
    _require(isinstance(t.batch_size, int) and t.batch_size >= 1, "train.batch_size",
             t.batch_size, "a positive integer")
    family = t.get("schedule", "v1")
    _require(family in FAMILIES, "train.schedule", family,
             f"one of {FAMILIES} (how train.epochs is read; docs/RECIPES.md)")
    epochs = tuple(t.epochs)
    names = "(e0, e1, e2, e3, T)" if family == "v1" else "(es, ee, ps, pe, T)"
    _require(len(epochs) == 5 and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                      for e in epochs),
             "train.epochs", epochs, f"five non-negative integers {names}")
    if family == "v1":
        e0, e1, e2, e3, total = epochs
        _require(total >= 1 and e1 <= e3 <= total and e0 <= total, "train.epochs", epochs,
                 "v1 (e0, e1, e2, e3, T) with e1 <= e3 <= T, e0 <= T and T >= 1")
    else:
        es, ee, ps, pe, total = epochs
        _require(total >= 1 and ps <= pe <= total and es <= total and ee <= total,
                 "train.epochs", epochs,
                 "v2 (es, ee, ps, pe, T) with ps <= pe <= T, es <= T, ee <= T and T >= 1")
    _require(isinstance(t.get("drop_last", False), bool), "train.drop_last",
             t.get("drop_last"), "True or False")
    _require(_is_number(t.adam_eps) and t.adam_eps > 0, "train.adam_eps", t.adam_eps,
             "a finite number > 0")
    for f in ("lr", "weight_decay", "ema_decay", "mix", "kappa", "lam_start", "lam_end"):
        v = t[f]
        _require(_is_number(v) and v >= 0, f"train.{f}", v, "a finite number >= 0")
    scale_lr = t.get("logit_scale_lr")
    _require(scale_lr is None or (_is_number(scale_lr) and scale_lr >= 0),
             "train.logit_scale_lr", scale_lr, "None (train.lr) or a finite number >= 0")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "a number in [0, 1)")
    _require(0 <= t.mix <= 1, "train.mix", t.mix, "a number in [0, 1]")
    _require(0 <= t.kappa <= 1, "train.kappa", t.kappa, "a number in [0, 1]")
    _require(_is_number(t.eps_train) and 0 <= t.eps_train <= 1, "train.eps_train", t.eps_train,
             "a number of pixels in [0, 1]")
    _require(_is_number(t.p_start) and t.p_start >= 1, "train.p_start", t.p_start,
             "a finite number >= 1")
    _require(t.weight_decay == 0 or t.p_start >= 2, "train.p_start", t.p_start,
             ">= 2 with weight decay (the l_p decay is the gradient of ½||w||_p², p >= 2), or "
             "train.weight_decay=0")
    _require(_is_number(t.p_end) and t.p_end >= t.p_start, "train.p_end", t.p_end,
             "a finite number >= train.p_start")
    _require(t.loss in LOSSES, "train.loss", t.loss, f"one of {LOSSES}")
    if t.loss == "v2":
        _require(t.eps_train > 0 and _eps_ever_positive(family, epochs), "train.eps_train",
                 t.eps_train, "> 0 at some step with the v2 loss: with ε = 0 its margin term "
                 "(r / 2ε clipped to [0, 1]) is the 0-1 error, which has no gradient; check "
                 f"train.eps_train and the ε ramp of train.epochs={epochs}")
        _require((t.lam_start > 0) == (t.lam_end > 0), "train.lam_end", t.lam_end,
                 f"> 0 with train.lam_start={t.lam_start} (λ moves geometrically, lam_start · "
                 "(lam_end/lam_start)^r, which is undefined when only one of them is 0), or "
                 "both 0 (no cross-entropy term)")
    _require(t.get("crop_mode", "zeros") in data_lib.CROP_MODES, "train.crop_mode",
             t.get("crop_mode"), f"one of {data_lib.CROP_MODES}")
    pad = t.get("crop_padding")
    _require(pad is None or (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0),
             "train.crop_padding", pad, "None (the data set's) or an integer >= 0")
    _require(t.get("flip") is None or isinstance(t.get("flip"), bool), "train.flip",
             t.get("flip"), "None (the data set's), True or False")
    _require(isinstance(t.checkpoint_every_epochs, int) and t.checkpoint_every_epochs >= 1,
             "train.checkpoint_every_epochs", t.checkpoint_every_epochs, "a positive integer")
    _require(isinstance(t.log_every, int) and t.log_every >= 1, "train.log_every", t.log_every,
             "a positive integer")
    _require(isinstance(t.keep_checkpoints, int) and t.keep_checkpoints >= 1,
             "train.keep_checkpoints", t.keep_checkpoints, "a positive integer")
    _require(isinstance(t.augment, bool), "train.augment", t.augment, "True or False")
    e = config.ensemble
    _require(isinstance(e.size, int) and e.size >= 1, "ensemble.size", e.size,
             "a positive integer")
    _require(e.mode in ENSEMBLE_MODES, "ensemble.mode", e.mode, f"one of {ENSEMBLE_MODES}")
    _require(e.get("execution", "auto") in ensemble_lib.EXECUTIONS, "ensemble.execution",
             e.get("execution"), f"one of {ensemble_lib.EXECUTIONS}")
    validate_eval_config(config.eval)
    try:
        build_model(config.model, 2)
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None


def _eps_ever_positive(family: str, epochs) -> bool:
    """Whether the training ε is > 0 at some step of the run (given eps_train > 0)."""
    if family == "v1":
        e0, _, e2, _, total = epochs
        return e2 == 0 or e0 < total
    es, ee, _, _, total = epochs
    return ee <= es or es < total


def validate_eval_config(ev) -> None:
    eps = ev.eps if isinstance(ev.eps, (list, tuple)) else (ev.eps,)
    for v in eps:
        _require(_is_number(v) and 0 <= v <= 1, "eval.eps", v, "numbers of pixels in [0, 1]")
    _require(isinstance(ev.pgd_steps, int) and ev.pgd_steps >= 0, "eval.pgd_steps",
             ev.pgd_steps, "an integer >= 0")
    _require(isinstance(ev.pgd_restarts, int) and ev.pgd_restarts >= 0, "eval.pgd_restarts",
             ev.pgd_restarts, "an integer >= 0")
    _require(isinstance(ev.batch_size, int) and ev.batch_size >= 1, "eval.batch_size",
             ev.batch_size, "a positive integer")


def make_schedule(config, steps_per_epoch: int, std: float) -> Schedule:
    """The run's :class:`Schedule` (family ``train.schedule``), ε in normalised units
    (``eps_train / std``); λ is 0 unless the loss is v2 (the other losses have none)."""
    t = config.train
    v2_loss = t.loss == "v2"
    return Schedule(
        epochs=tuple(int(e) for e in t.epochs),
        steps_per_epoch=steps_per_epoch,
        lr=float(t.lr),
        eps_train=float(t.eps_train) / std,
        p_start=float(t.p_start),
        p_end=float(t.p_end),
        lam_start=float(t.lam_start) if v2_loss else 0.0,
        lam_end=float(t.lam_end) if v2_loss else 0.0,
        ema_decay=float(t.ema_decay),
        family=t.get("schedule", "v1"),
    )


def logit_scale_lr(config) -> float:
    """The base lr of the logit scale: ``train.logit_scale_lr``, or ``train.lr`` when None."""
    v = config.train.get("logit_scale_lr")
    return float(config.train.lr if v is None else v)


def make_run_optimizer(config, schedule: Schedule) -> optax.GradientTransformation:
    """The optimiser of a run: Adam, ``train.weight_decay`` (0: none, the v2 recipe) and the
    schedule's lr, with ``train.logit_scale_lr`` for the logit scale."""
    t = config.train
    return optim.make_optimizer(schedule, float(t.weight_decay), float(t.get("adam_eps", 1e-10)),
                                logit_scale_lr=logit_scale_lr(config))


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


# ----------------------------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------------------------


def _members(config) -> int | None:
    k = int(config.ensemble.size)
    return None if k == 1 else k


def _shared_counters(opt_state):
    """``(in_axes, opt_state)`` for vmapping the optimiser over ensemble members with its step
    counters unbatched: every member takes the same steps, so member 0's counter stands for
    all. Batched, the counter (and the p the ℓp weight decay derives from it) would turn the
    decay's ``lax.cond`` on p = ∞ into a select that computes both branches for every weight
    (measured: an exp and a log per weight at p = ∞, ~8% of the step)."""
    axes = jax.tree.map(lambda a: None if jnp.issubdtype(a.dtype, jnp.integer) else 0, opt_state)
    return axes, jax.tree.map(lambda a, ax: a if ax == 0 else a[0], opt_state, axes)


def make_mesh(config):
    """The device mesh of a run (``config.parallel.num_devices``, ``config.ensemble.shard``);
    the batch size must split evenly over its ``data`` axis."""
    try:
        mesh = parallel.make_mesh(config.parallel.num_devices, _members(config),
                                  bool(config.ensemble.shard))
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None
    data = mesh.shape[parallel.DATA]
    _require(config.train.batch_size % data == 0, "train.batch_size", config.train.batch_size,
             f"a multiple of the {data} devices of the data axis")
    return mesh


def create_train_state(config, model: nn.Module, input_shape, tx, mesh=None) -> TrainState:
    """Initial state; for an ensemble every leaf gains a leading member axis (own init each).

    With a ``mesh`` the state is created directly with the shardings of
    :func:`linf_jax.parallel.state_shardings` (member axis on ``members``, the rest replicated).
    """
    k = _members(config)
    rng = jax.random.PRNGKey(config.seed)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)

    def init_one(key):
        variables = model.init(key, dummy, p=INF, train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        return params, batch_stats, tx.init(params)

    def init(rng):
        init_key = jax.random.fold_in(rng, 0)
        if k is None:
            params, batch_stats, opt_state = init_one(init_key)
        else:
            params, batch_stats, opt_state = jax.vmap(init_one)(jax.random.split(init_key, k))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
            opt_state=opt_state, ema_params=jax.tree.map(jnp.copy, params),
            ema_batch_stats=jax.tree.map(jnp.copy, batch_stats), rng=rng)

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = parallel.state_shardings(jax.eval_shape(init, rng), mesh, k)
    return jax.jit(init, out_shardings=shardings)(rng)


def _keys(rng):
    return {"data": jax.random.fold_in(rng, 1), "augment": jax.random.fold_in(rng, 2)}


def epoch_order(rng, epoch: int, n: int, k: int | None) -> jax.Array:
    """The data order of an epoch, from ``(seed, epoch)`` (and the member for independent
    ensembles): ``[n]`` or ``[K, n]``."""
    key = jax.random.fold_in(_keys(rng)["data"], epoch)
    if k is None:
        return jax.random.permutation(key, n)
    return jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n))(
        jnp.arange(k))


def _squared_norm(tree) -> jax.Array:
    """``Σ g²`` over a pytree, as ``Σ |g|·|g|``: written ``g * g``, XLA merged the product with
    Adam's own ``g²`` and wrote that out as an array to feed the reduction (one extra write and
    read of every gradient on the CPU); with the ``abs`` it stays a separate product that the
    reduction fuses (checked in the compiled train step)."""
    return sum(jnp.sum(jnp.abs(g) * jnp.abs(g)) for g in jax.tree.leaves(tree))


def training_loss(config, logits, margins, labels, eps, lam, scale):
    """The loss ``train.loss`` of a batch: ``hinge`` (mix, κ), ``kappa_ce`` (κ) or ``v2`` (ε in
    normalised units, λ, the logit scale ``scale``); :mod:`linf_jax.losses`."""
    t = config.train
    if t.loss == "hinge":
        return losses.kappa_mix(lambda m, _: losses.hinge_loss(m, t.mix), logits, margins,
                                labels, float(t.kappa))
    if t.loss == "kappa_ce":
        return losses.kappa_ce_loss(logits, margins, labels, t.kappa)
    return losses.v2_mixture_loss(logits, margins, labels, eps, lam, scale)


def make_train_step(config, model: nn.Module, tx, schedule: Schedule, meta: dict,
                    mesh=None, state_sharding=None, donate: bool = False) -> Callable:
    """Builds the jitted ``train_step(state, images, labels, batch_idx, p_mode)``; with
    ``donate`` the input state's buffers are donated to the output state (the training loop
    does; the state passed in may not be used again).

    ``images``/``labels`` are the whole training split on the device; ``batch_idx`` is ``[B]``
    (single model and joint ensembles: all members see the same batch) or ``[K, B]``
    (independent ensembles). With a ``mesh`` the batch is constrained to the ``data`` axis and
    the state keeps ``state_sharding``; the program is the global-batch program either way.
    """
    k = _members(config)
    mode = config.ensemble.mode
    execution = ensemble_lib.resolve_execution(config.ensemble.get("execution", "auto"),
                                               sharded=bool(config.ensemble.shard),
                                               training=True)
    mean = jnp.asarray(meta["mean"], jnp.float32)
    std = float(meta["std"])
    pad, pad_mode, flip = augmentation(config, meta)

    def prepare(images, labels, idx, key):
        x = data_lib.as_pixels(images[idx])
        x = data_lib.crop_flip(key, x, pad, pad_mode, flip)
        return data_lib.normalize(x, mean, std), labels[idx]

    def constrain(x, y, member_axis: bool):
        if mesh is None:
            return x, y
        sharding = parallel.batch_sharding(mesh, member_axis)
        return (jax.lax.with_sharding_constraint(x, sharding),
                jax.lax.with_sharding_constraint(y, sharding))

    def member_apply(params, batch_stats, x, y, p, eps):
        variables = {"params": params, "batch_stats": batch_stats}
        (logits, margins), new = model.apply(
            variables, x, p=p, train=True, eps=eps, labels=y, mutable=["batch_stats"])
        return logits, margins, new.get("batch_stats", {})

    def loss_value(logits, margins, y, eps, lam, scale):
        return training_loss(config, logits, margins, y, eps, lam, scale)

    def single_loss(params, batch_stats, x, y, p, eps, lam):
        logits, margins, bs = member_apply(params, batch_stats, x, y, p, eps)
        loss = loss_value(logits, margins, y, eps, lam, params["logit_scale"])
        return loss, (logits, bs)

    def joint_loss(params, batch_stats, x, y, p, eps, lam):
        logits, margins, bs = ensemble_lib.members_map(
            member_apply, (0, 0, None, None, None, None), execution)(
            params, batch_stats, x, y, p, eps)
        logits = logits.mean(0)
        loss = loss_value(logits, margins.mean(0), y, eps, lam, params["logit_scale"].mean())
        return loss, (logits, bs)

    def train_step(state: TrainState, images, labels, batch_idx, p_mode: str):
        step = state.step
        if p_mode == "start":
            p = schedule.p_start
        elif p_mode == "inf":
            p = INF
        else:
            p = schedule.p(step)
        eps = schedule.eps(step)
        lam = schedule.lam(step)
        aug_key = jax.random.fold_in(_keys(state.rng)["augment"], step)
        alpha = schedule.ema_decay_at(step)

        def apply_grads(params, opt_state, ema_params, ema_bs, grads, bs):
            """Adam (Optax), then the EMA of the parameters and the running means."""
            # decay_p: in the start and inf phases p is a Python number and the ℓp decay is
            # compiled for it; a traced p (the ramp) is ignored there (optim.lp_weight_decay)
            updates, opt_state = tx.update(grads, opt_state, params, decay_p=p)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, optim.ema_update(ema_params, params, alpha),
                    optim.ema_update(ema_bs, bs, alpha))

        if k is None or mode == "joint":
            x, y = constrain(*prepare(images, labels, batch_idx, aug_key), member_axis=False)
            fn = single_loss if k is None else joint_loss
            (loss, (logits, bs)), grads = jax.value_and_grad(fn, has_aux=True)(
                state.params, state.batch_stats, x, y, p, eps, lam)
            accuracy = (logits.argmax(-1) == y).mean()
            grad_norm = jnp.sqrt(_squared_norm(grads))
            if k is None:
                params, opt_state, ema_params, ema_bs = apply_grads(
                    state.params, state.opt_state, state.ema_params, state.ema_batch_stats,
                    grads, bs)
            else:
                opt_axes, opt_in = _shared_counters(state.opt_state)
                params, opt_state, ema_params, ema_bs = jax.vmap(
                    apply_grads, in_axes=(0, opt_axes, 0, 0, 0, 0))(
                    state.params, opt_in, state.ema_params, state.ema_batch_stats, grads, bs)
        else:  # independent: every member its own batch, augmentation, loss and update
            member_keys = jax.vmap(lambda i: jax.random.fold_in(aug_key, i))(jnp.arange(k))
            x, y = constrain(*jax.vmap(prepare, in_axes=(None, None, 0, 0))(
                images, labels, batch_idx, member_keys), member_axis=True)

            def member_step(params, batch_stats, opt_state, ema_params, ema_bs, x, y):
                # The whole update of one member, so that a sequential execution writes each
                # member's new state once (no stacked gradient/update temporaries).
                (loss, (logits, bs)), grads = jax.value_and_grad(single_loss, has_aux=True)(
                    params, batch_stats, x, y, p, eps, lam)
                grad_sq = _squared_norm(grads)
                return (loss, logits, bs, grad_sq,
                        *apply_grads(params, opt_state, ema_params, ema_bs, grads, bs))

            opt_axes, opt_in = (_shared_counters(state.opt_state) if execution == "batched"
                                else (0, state.opt_state))
            loss_k, logits, bs, grad_sq, params, opt_state, ema_params, ema_bs = (
                ensemble_lib.members_map(member_step, (0, 0, opt_axes, 0, 0, 0, 0), execution)(
                    state.params, state.batch_stats, opt_in, state.ema_params,
                    state.ema_batch_stats, x, y))
            loss = loss_k.mean()
            accuracy = (logits.argmax(-1) == y).mean()
            grad_norm = jnp.sqrt(grad_sq.sum())
        new_state = state.replace(
            step=step + 1, params=params, batch_stats=bs, opt_state=opt_state,
            ema_params=ema_params, ema_batch_stats=ema_bs)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
                   "param_norm": optax.global_norm(params), "p": jnp.asarray(p, jnp.float32),
                   "eps": eps * std, "lr": schedule.lr_at(step), "lam": lam,
                   "ema_decay": alpha}
        return new_state, metrics

    # donate: the state's buffers are reused for the new state, so a step holds one copy of
    # parameters, Adam moments and EMA instead of two (the training loop never reads a state
    # it has passed on). Direct callers that step the same state twice (tests) keep it off.
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(train_step, static_argnames=("p_mode",), donate_argnums=donate_argnums)
    if mesh.size > 1:  # custom calls would run unpartitioned (see ops.partitionable)
        train_step = ops.partitionable(train_step)
    return jax.jit(train_step, static_argnames=("p_mode",), donate_argnums=donate_argnums,
                   out_shardings=(state_sharding, parallel.replicated(mesh)))


# ----------------------------------------------------------------------------------------------
# Checkpoints (Orbax; atomic: a step is written to a temporary folder and renamed when complete)
# ----------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # cleanup_tmp_directories: a save killed half-way (SIGKILL, power loss) leaves a
    # `<step>.orbax-checkpoint-tmp-*` folder; it is never restored and is removed here.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(path, options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState) -> None:
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
    mngr.wait_until_finished()


def restore_checkpoint(mngr: ocp.CheckpointManager, target: TrainState,
                       step: int | None = None) -> TrainState:
    """Restores the latest complete step (or ``step``) into the structure of ``target``."""
    step = mngr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            flax.serialization.to_state_dict(target))
    try:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return flax.serialization.from_state_dict(target, restored)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore: truncated, missing, other shapes
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} cannot be restored "
            f"({_root_cause_line(err)}); allowed: a complete checkpoint of this model and config"
        ) from None


class WorkdirLock:
    """One writer per run folder: an exclusive ``flock`` on ``<workdir>/.lock``, held while a run
    trains. The operating system drops it when the process ends in any way (``kill -9``
    included), so it never goes stale; the file itself stays (unlinking a lock file races with
    a process that has just opened it). Where ``fcntl`` does not exist (Windows) it is a no-op.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._file = None

    def acquire(self) -> WorkdirLock:
        try:
            import fcntl
        except ImportError:
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise TrainingError(
                f"workdir={os.path.dirname(self.path)!r} is in use by {holder}; allowed: one "
                "training process per workdir (wait for it, stop it, or use another --workdir)"
            ) from None
        f.seek(0)
        f.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"pid {os.getpid()} on {platform_node()} since {since}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def platform_node() -> str:
    import platform

    return platform.node() or "this host"


def restore_newest_good(mngr: ocp.CheckpointManager, target: TrainState, workdir: str,
                        warn: Callable[[str], None] | None = None) -> TrainState:
    """Restores the newest step that restores. A newer step that does not (a truncated or
    missing file) is moved aside, not deleted, to ``<workdir>/damaged_checkpoints/`` with one
    warning line naming it and the step resumed from; with no good step left the last error is
    raised. Nothing is lost: the damaged files stay for inspection."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    steps = sorted(mngr.all_steps(), reverse=True)
    damaged = []
    for i, step in enumerate(steps):
        try:
            state = restore_checkpoint(mngr, target, step)
        except CheckpointError as err:
            if i == len(steps) - 1:
                raise
            damaged.append((step, str(err)))
            continue
        for bad, why in damaged:
            dest = _move_aside(mngr, bad, workdir)
            cause = why.split("(", 1)[1].rsplit(")", 1)[0] if "(" in why else why
            warn(f"warning: checkpoint step {bad} cannot be restored ({cause}); moved to {dest}; "
                 f"resuming from step {step}")
        if damaged:
            mngr.reload()
        return state
    raise CheckpointError(f"workdir={workdir!r} has no checkpoint")


def _move_aside(mngr: ocp.CheckpointManager, step: int, workdir: str) -> str:
    src = os.path.join(os.fspath(mngr.directory), str(step))
    root = os.path.join(workdir, "damaged_checkpoints")
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(src, dest)  # same file system: an atomic rename
    return dest


def newest_good_step(mngr: ocp.CheckpointManager, target: TrainState) -> int | None:
    """The newest step that restores into ``target`` (read only; None if none does)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restore_checkpoint(mngr, target, step)
            return step
        except CheckpointError:
            continue
    return None


def _root_cause_line(err: BaseException, limit: int = 240) -> str:
    """The first line of the innermost exception of a chain (TensorStore's own words)."""
    seen = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


# ----------------------------------------------------------------------------------------------
# Metadata, evaluation and the loop
# ----------------------------------------------------------------------------------------------


def dataset_meta(ds: data_lib.Dataset) -> dict:
    return {"source": ds.name, "input_shape": list(ds.input_shape),
            "num_classes": int(ds.num_classes), "mean": [float(m) for m in ds.mean],
            "std": float(ds.std), "augment": ds.augment}


def write_json(path: str, obj) -> None:
    """Atomic JSON write (temporary file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the current step and exits.

    Several processes (``jax.distributed``): a SIGTERM reaching any of them, at any moment, is
    turned by JAX's preemption service into one agreed step for all
    (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`, asked after every
    step), so every process saves the same step and stops; that service owns SIGTERM there, and
    this flag handles SIGINT only."""

    def __init__(self):
        self.signum = None
        self.multihost = jax.process_count() > 1

    def agreed(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (the steps done): a local signal, or on several
        processes the step that all of them agreed on."""
        if self.multihost:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or int(signal.SIGTERM)
        return self.signum is not None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.signum = signum

        old = {}
        signals = (signal.SIGINT,) if self.multihost else (signal.SIGTERM, signal.SIGINT)
        try:
            for s in signals:
                old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    model: nn.Module
    meta: dict
    preempted: bool
    results: dict | None


def _metrics_log(workdir: str, start_step: int):
    """Opens metrics.jsonl for appending, first dropping lines at or after ``start_step`` (they
    belong to steps that a resumed run recomputes)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) < start_step]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return open(path, "a")


def variables_for(state: TrainState, weights: str) -> dict:
    """Model variables of the EMA (default) or raw weights."""
    if weights == "ema":
        params, bs = state.ema_params, state.ema_batch_stats
    elif weights == "raw":
        params, bs = state.params, state.batch_stats
    else:
        raise ConfigError(f"weights={weights!r} is not allowed: one of ('ema', 'raw')")
    return {"params": params, "batch_stats": bs} if bs else {"params": params}


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def request_determinism(config) -> None:
    """With ``config.train.deterministic``, adds XLA's deterministic-ops flag to ``XLA_FLAGS``.
    Effective only before JAX starts its GPU backend (train.py calls it right after reading the
    config); :func:`train_and_evaluate` refuses a deterministic run on a GPU without it."""
    if config.train.get("deterministic", False):
        flags = os.environ.get("XLA_FLAGS", "")
        if DETERMINISTIC_FLAG not in flags:
            os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_FLAG).strip()


def _check_determinism(config) -> None:
    if (config.train.get("deterministic", False) and jax.default_backend() == "gpu"
            and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", "")):
        raise ConfigError(
            f"config.train.deterministic=True is not allowed here: the GPU backend started "
            f"without XLA_FLAGS={DETERMINISTIC_FLAG}; allowed: set it before JAX starts "
            "(train.py does; in Python call linf_jax.train_lib.request_determinism(config) "
            "before the first JAX computation)")


def kernels_choice(config) -> str | None:
    """The :func:`linf_jax.ops.use_kernels` argument of ``config.kernels``: None for 'auto'
    (the library default, ``LINF_JAX_KERNELS`` when set), else the choice itself."""
    choice = config.get("kernels", "auto")
    return None if choice == "auto" else choice


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       evaluate_at_end: bool = True, max_steps: int | None = None) -> TrainResult:
    """Trains from ``config`` in ``workdir`` (resuming from its latest checkpoint) and, at the
    end, evaluates the EMA weights on the test split. Returns the final state and results.
    Everything is traced with the kernels of ``config.kernels``.

    ``max_steps`` stops after that many steps of this call (checkpoint saved, ``preempted`` set),
    exactly as a SIGTERM would; calling again resumes."""
    validate_config(config)
    _check_determinism(config)
    with ops.use_kernels(kernels_choice(config)):
        return _train_and_evaluate(config, workdir, progress, evaluate_at_end, max_steps)


def _train_and_evaluate(config, workdir, progress, evaluate_at_end, max_steps) -> TrainResult:
    from tqdm.auto import tqdm  # local: keeps `import linf_jax` light

    os.makedirs(workdir, exist_ok=True)
    d = config.data
    train_ds = data_lib.load(d.source, d.train_split, d.get("data_dir"))
    meta = dataset_meta(train_ds)
    model = build_model(config.model, train_ds.num_classes)
    k = _members(config)
    n = len(train_ds.labels)
    mesh = make_mesh(config)
    drop_last = bool(config.train.get("drop_last", False))
    batches = epoch_batches(n, config.train.batch_size, drop_last, mesh.shape[parallel.DATA])
    if not batches:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not allowed: "
                          f"at most the {n} training examples of {d.source}:{d.train_split} "
                          "with train.drop_last=True")
    steps_per_epoch = len(batches)
    schedule = make_schedule(config, steps_per_epoch, meta["std"])
    tx = make_run_optimizer(config, schedule)
    state = create_train_state(config, model, train_ds.input_shape, tx, mesh)
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0:  # multi-host: process 0 writes the run's files
        lock.acquire()
    try:
        return _train_locked(config, workdir, progress, evaluate_at_end, max_steps, tqdm, train_ds,
                             meta, model, k, mesh, batches, schedule, tx, state)
    finally:
        lock.release()


def _train_locked(config, workdir, progress, evaluate_at_end, max_steps, tqdm, train_ds, meta,
                  model, k, mesh, batches, schedule, tx, state) -> TrainResult:
    d, n, steps_per_epoch = config.data, len(train_ds.labels), len(batches)
    state_sharding = jax.tree.map(lambda a: a.sharding, state)
    mngr = checkpoint_manager(workdir, config.train.keep_checkpoints)
    if mngr.latest_step() is not None:
        state = restore_newest_good(mngr, state, workdir)
    main_process = jax.process_index() == 0  # multi-host: one writer of the run's files
    progress = progress and main_process
    if main_process:
        write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
        write_json(os.path.join(workdir, "meta.json"), meta)

    train_step = make_train_step(config, model, tx, schedule, meta, mesh, state_sharding,
                                 donate=True)
    images = parallel.global_array(train_ds.images, parallel.replicated(mesh))
    labels = parallel.global_array(train_ds.labels, parallel.replicated(mesh))
    total = schedule.total_steps
    start = int(state.step)
    log = _metrics_log(workdir, start) if main_process else open(os.devnull, "a")
    stop = _StopFlag()
    order, order_epoch = None, -1
    order_k = k if config.ensemble.mode == "independent" else None  # joint: one shared order
    pending = None  # (step, metrics) read one step late so the host never stalls the device
    t0 = time.time()

    def check(step_metrics):
        step, metrics = step_metrics
        for name in ("loss", "grad_norm", "param_norm"):
            value = float(metrics[name])
            if not math.isfinite(value):
                raise TrainingError(
                    f"non-finite {name} {value} at step {step}; stopped, the last good "
                    f"checkpoint (step {mngr.latest_step()}) is kept")
        return {key: float(v) for key, v in metrics.items()}

    def emit(step_metrics, last: bool = False):
        """Checks one step's metrics and logs them every ``log_every`` steps and at the end."""
        values = check(step_metrics)
        step = step_metrics[0]
        if step % config.train.log_every == 0 or step == total - 1 or last:
            record = {"step": step, "epoch": step / steps_per_epoch,
                      "time": round(time.time() - t0, 3), **values}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}",
                            p=f"{values['p']:.4g}", eps=f"{values['eps']:.3f}",
                            lr=f"{values['lr']:.2e}", refresh=False)

    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    preempted = False
    with stop.installed(), log:
        for step in range(start, total):
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = np.asarray(epoch_order(state.rng, epoch, n, order_k)), epoch
            lo, hi = batches[pos]  # the last batch of an epoch may be partial (its own compile)
            idx = parallel.global_array(order[..., lo:hi], parallel.replicated(mesh))
            state, metrics = train_step(state, images, labels, idx, schedule.p_phase(step))
            if pending is not None:
                emit(pending)
            pending = (step, metrics)
            bar.update(1)
            done = step + 1
            if max_steps is not None and done - start >= max_steps and done < total:
                stop.signum = -1
            stopping = stop.agreed(done)
            if done % (steps_per_epoch * config.train.checkpoint_every_epochs) == 0 \
                    or done == total or stopping:
                check(pending)
                save_checkpoint(mngr, state)
            if stopping:
                preempted = True
                break
        if pending is not None:  # the last step (also when preempted: the resumed run goes on)
            emit(pending, last=not preempted)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    results = None
    if evaluate_at_end and not preempted:
        test_ds = data_lib.load(d.source, d.test_split, d.get("data_dir"))
        results = evaluate(model, variables_for(state, "ema"), test_ds, meta, config.eval,
                           members=k, progress=progress, key=jax.random.fold_in(state.rng, 3))
        results["weights"] = "ema"
        if main_process:
            write_json(os.path.join(workdir, "results.json"), results)
    return TrainResult(state=state, model=model, meta=meta, preempted=preempted, results=results)


def make_eval_fns(model: nn.Module, variables, members: int | None, execution: str = "auto"):
    """``(logits_fn, margins_fn)`` in normalised units; for an ensemble both average over the
    members in one call (:func:`linf_jax.ensemble.members_map`, ``execution``)."""
    if members is None:
        logits_fn = lambda x: model.apply(variables, x)
        margins_fn = lambda lo, hi, y: model.apply(variables, lo, hi, y, method="certify_margins")
    else:
        logits_fn = lambda x: ensemble_lib.apply(model, variables, x, execution=execution)
        margins_fn = lambda lo, hi, y: ensemble_lib.apply(
            model, variables, lo, hi, y, method="certify_margins", execution=execution)
    return logits_fn, margins_fn


def evaluate(model: nn.Module, variables, ds: data_lib.Dataset, meta: dict, eval_config,
             members: int | None = None, progress: bool = True, key=None) -> dict:
    """Clean, PGD and certified accuracy (interval, and the Lipschitz rule for 1-Lipschitz
    models only) for every ε in ``eval_config.eps`` (pixels), plus per-example certified radii
    (pixels)."""
    logits_fn, margins_fn = make_eval_fns(model, variables, members)
    eps_pixels = [float(e) for e in (eval_config.eps if isinstance(eval_config.eps, (list, tuple))
                                     else (eval_config.eps,))]
    return certify_lib.evaluate_dataset(
        logits_fn, margins_fn, ds.images, ds.labels, mean=meta["mean"], std=meta["std"],
        eps_pixels=eps_pixels, batch_size=eval_config.batch_size,
        pgd_steps=eval_config.pgd_steps, pgd_restarts=eval_config.pgd_restarts,
        key=jax.random.PRNGKey(0) if key is None else key, progress=progress,
        lipschitz=is_1_lipschitz(model))


def read_run_files(workdir: str):
    """``(config, meta)`` from a run folder's config.json and meta.json; CheckpointError else."""
    import ml_collections

    if not os.path.isdir(workdir):
        raise CheckpointError(f"workdir={workdir!r} is not a linf-jax run: no such folder")
    cfg_path = os.path.join(workdir, "config.json")
    meta_path = os.path.join(workdir, "meta.json")
    for path in (cfg_path, meta_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"workdir={workdir!r} is not a linf-jax run: {path} is missing")
    try:
        with open(cfg_path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        with open(meta_path) as f:
            meta = json.load(f)
        meta["num_classes"], meta["input_shape"], meta["std"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"workdir={workdir!r}: unreadable run files ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return config, meta


# Fields a resumed run must share with the checkpoint it resumes (they fix the parameter shapes
# and what the parameters mean).
RESUME_FIELDS = ("model", "ensemble.size", "ensemble.mode", "data.source")
# Config fields added after runs were made: a run whose config.json lacks one was trained with
# the value given here (so that such runs still resume).
ADDED_FIELDS = {"model.head_hidden": 256}


def _flat(node, prefix: str = "") -> dict:
    if hasattr(node, "items"):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, (list, tuple)) else node}


def check_resume(config, workdir: str) -> None:
    """Raises :class:`ConfigError` (one line) when ``workdir`` holds a run whose model, ensemble
    or data source differs from ``config``: resuming it would fail or mix two experiments."""
    workdir = os.fspath(workdir)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        return
    try:
        old, _ = read_run_files(workdir)
    except CheckpointError:
        if os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise
        return  # an interrupted first start: nothing to resume
    new_flat = _flat(json.loads(config.to_json()))
    old_flat = _flat(old)
    for key in sorted(set(new_flat) | set(old_flat)):
        if not any(key == f or key.startswith(f + ".") for f in RESUME_FIELDS):
            continue
        old_flat.setdefault(key, ADDED_FIELDS.get(key))
        if new_flat.get(key) != old_flat.get(key):
            raise ConfigError(
                f"config.{key}={new_flat.get(key)!r} is not allowed: the run in "
                f"workdir={workdir!r} was trained with {old_flat.get(key)!r}; resume with the same "
                "value or train into a new --workdir")


def load_run(workdir: str, step: int | None = None):
    """``(config, meta, model, state)`` of a finished or interrupted run, from its latest complete
    checkpoint (or ``step``). Raises :class:`CheckpointError` with one line when there is none,
    or when the latest cannot be restored: the line names the newest step that can.

    Only finalised steps count: a save that was killed leaves an ``*.orbax-checkpoint-tmp-*``
    folder, which is ignored. Nothing in ``workdir`` is written, and nothing is unpickled (the
    arrays are read with TensorStore from OCDBT, the metadata is JSON)."""
    workdir = os.fspath(workdir)
    config, meta = read_run_files(workdir)
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"workdir={workdir!r} is not a linf-jax run: {ckpt_dir} is missing")
    try:
        model = build_model(config.model, meta["num_classes"])
        tx = make_run_optimizer(config, make_schedule(config, 1, meta["std"]))
        state = create_train_state(config, model, tuple(meta["input_shape"]), tx)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"workdir={workdir!r}: config.json/meta.json do not describe a model "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    # create=False and no garbage collection: this manager never writes.
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"workdir={workdir!r} has no complete checkpoint in {ckpt_dir}")
        if step is not None and step not in steps:
            raise CheckpointError(f"--step={step} is not allowed: workdir={workdir!r} has the "
                                  f"steps {sorted(steps)}")
        chosen = mngr.latest_step() if step is None else step
        try:
            state = restore_checkpoint(mngr, state, chosen)
        except CheckpointError as err:
            good = newest_good_step(mngr, state)
            hint = (f"; the newest step that restores is {good}: certify it with --step={good}"
                    if good is not None else "; no step of this run restores")
            raise CheckpointError(f"workdir={workdir!r}: {err}{hint}") from None
    finally:
        mngr.close()
    return config, meta, model, state
