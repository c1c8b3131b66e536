"""The training step: TrainState, its creation, and ``train_step`` as one pure function.

``train_step(state, images, labels, batch_idx, *, p_phase, ...)`` is a module-level function in
the style of flax's ``examples/imagenet``: the caller binds what a run fixes (model, optimiser,
schedule, loss, batch preparation, ensemble layout) with ``functools.partial`` and jits it
(:func:`make_train_step` does both for a config). It reads p, ε, lr, λ and the EMA decay from
the :class:`~linf_jax.schedules.Schedule` as functions of ``state.step``, runs the model, the
loss and the Optax chain, and returns the new state and the step's metrics. ``p_phase`` is
static ('start' → the integer p = 8 path, 'ramp' → traced p, 'inf' → the exact ℓ∞ kernels), so
each phase compiles once and the ramp never recompiles.

Ensembles (``config.ensemble.size = K > 1``) are the single-model path mapped over a stacked
state (a leading member axis on every leaf, :mod:`linf_jax.ensemble`):

* ``independent``: :func:`member_step` (loss, gradient, Adam, EMA of one model) mapped over the
  members, each with its own data order and augmentation;
* ``joint`` (the EMA paper): :func:`member_apply` mapped over the members, ONE loss of the mean
  logits and mean worst-case margins, then the update mapped over the members.

An epoch is ``ceil(N / batch_size)`` steps over a permutation of the training split (the last
batch partial, as PyTorch's DataLoader; ``train.drop_last`` drops it). Randomness comes only
from keys derived from ``(seed, step)`` (augmentation) and ``(seed, epoch)`` (data order), so a
resumed run is bit-identical to an uninterrupted one. The method is described in
docs/METHOD.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from linf_jax import data as data_lib
from linf_jax import ensemble as ensemble_lib
from linf_jax import losses, ops, optim, parallel
from linf_jax.config import ConfigError, members
from linf_jax.schedules import INF, Schedule


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
# What a config fixes: schedule, optimiser, epochs, augmentation, mesh
# ----------------------------------------------------------------------------------------------


def make_schedule(config, steps_per_epoch: int, std: float) -> Schedule:
    """The run's :class:`Schedule` (family ``train.schedule``), ε in normalised units
    (``eps_train / std``); λ is 0 unless the loss is v2 (the other losses have none)."""
    t = config.train
    v2_loss = t.loss == "v2"
    return Schedule(
        epochs=tuple(int(e) for e in t.epochs),
        steps_per_epoch=steps_per_epoch,
        lr=float(t.lr),
        eps_train=data_lib.eps_to_normalized(float(t.eps_train), std),
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


def make_mesh(config):
    """The device mesh of a run (``config.parallel.num_devices``, ``config.ensemble.shard``);
    the batch size must split evenly over its ``data`` axis."""
    try:
        mesh = parallel.make_mesh(config.parallel.num_devices, members(config),
                                  bool(config.ensemble.shard))
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None
    data = mesh.shape[parallel.DATA]
    if config.train.batch_size % data:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not allowed: a "
                          f"multiple of the {data} devices of the data axis")
    return mesh



# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


def init_variables(config, model: nn.Module, input_shape, key) -> tuple[Any, Any]:
    """``(params, batch_stats)`` of a fresh model, or of K fresh members stacked on a leading
    axis (each its own init key) for an ensemble."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)

    def init_one(key):
        variables = model.init(key, dummy, p=INF, train=False)
        return variables["params"], variables.get("batch_stats", {})

    k = members(config)
    return init_one(key) if k is None else jax.vmap(init_one)(jax.random.split(key, k))


def create_train_state(config, model: nn.Module, input_shape, tx, mesh=None) -> TrainState:
    """The initial state of a run: variables, optimiser state (per member for an ensemble),
    their EMA copies, step 0 and the seed's key.

    With a ``mesh`` the state is created directly with the shardings of
    :func:`linf_jax.parallel.state_shardings` (member axis on ``members``, the rest replicated).
    """
    k = members(config)
    rng = jax.random.PRNGKey(config.seed)

    def init(rng):
        params, batch_stats = init_variables(config, model, input_shape, jax.random.fold_in(rng, 0))
        opt_state = tx.init(params) if k is None else jax.vmap(tx.init)(params)
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


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def make_loss_fn(config) -> Callable:
    """``loss_fn(logits, margins, labels, eps, lam, scale)`` of ``train.loss``: ``hinge`` (mix,
    κ), ``kappa_ce`` (κ) or ``v2`` (ε in normalised units, λ, the logit scale); see
    :mod:`linf_jax.losses` and docs/METHOD.md §4."""
    t = config.train
    if t.loss == "hinge":
        mix, kappa = float(t.mix), float(t.kappa)
        return lambda logits, margins, labels, eps, lam, scale: losses.kappa_mix(
            lambda m, _: losses.hinge_loss(m, mix), logits, margins, labels, kappa)
    if t.loss == "kappa_ce":
        kappa = float(t.kappa)
        return lambda logits, margins, labels, eps, lam, scale: losses.kappa_ce_loss(
            logits, margins, labels, kappa)
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


def squared_norm(tree) -> jax.Array:
    """``Σ g²`` over a pytree, as ``Σ |g|·|g|``: written ``g * g``, XLA merges the product with
    Adam's own ``g²`` and materialises it to feed the reduction (an extra write and read of
    every gradient on the CPU); with the ``abs`` the product stays fused into the reduction."""
    return sum(jnp.sum(jnp.abs(g) * jnp.abs(g)) for g in jax.tree.leaves(tree))


def member_apply(model: nn.Module, params, batch_stats, x, y, p, eps):
    """One model in training mode: ``(logits, worst-case margins, new batch_stats)``."""
    variables = {"params": params, "batch_stats": batch_stats}
    (logits, margins), new = model.apply(
        variables, x, p=p, train=True, eps=eps, labels=y, mutable=["batch_stats"])
    return logits, margins, new.get("batch_stats", {})


def member_loss(params, batch_stats, x, y, p, eps, lam, *, model, loss_fn):
    """The loss of one model on a batch: ``(loss, (logits, new batch_stats))``."""
    logits, margins, bs = member_apply(model, params, batch_stats, x, y, p, eps)
    return loss_fn(logits, margins, y, eps, lam, params["logit_scale"]), (logits, bs)


def joint_loss(params, batch_stats, x, y, p, eps, lam, *, model, loss_fn, execution):
    """The loss of a joint ensemble: the members applied (mapped over the member axis), then
    ONE loss of their mean logits and mean worst-case margins (docs/METHOD.md §8)."""
    logits, margins, bs = ensemble_lib.members_map(
        functools.partial(member_apply, model), (0, 0, None, None, None, None), execution)(
        params, batch_stats, x, y, p, eps)
    logits = logits.mean(0)
    loss = loss_fn(logits, margins.mean(0), y, eps, lam, params["logit_scale"].mean())
    return loss, (logits, bs)


def member_update(params, opt_state, ema_params, ema_bs, grads, bs, *, tx, p, alpha):
    """Adam and the weight decay (Optax), then the EMA of the parameters and of the running
    means, for one model."""
    # In the start and inf phases p is a Python number and the ℓp decay is compiled for it; a
    # traced p (the ramp) is read from the schedule inside the decay (linf_jax.optim).
    updates, opt_state = tx.update(grads, opt_state, params, phase_p=p)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, optim.ema_update(ema_params, params, alpha),
            optim.ema_update(ema_bs, bs, alpha))


def member_step(params, batch_stats, opt_state, ema_params, ema_bs, x, y, p, eps, lam, alpha,
                *, model, loss_fn, tx):
    """The whole step of one model: ``(loss, logits, batch_stats, Σ grad², params, opt_state,
    ema_params, ema_batch_stats)``. The single-model step, and mapped over the members the
    independent ensemble's (each member's new state written once, no stacked temporaries)."""
    (loss, (logits, bs)), grads = jax.value_and_grad(
        functools.partial(member_loss, model=model, loss_fn=loss_fn), has_aux=True)(
        params, batch_stats, x, y, p, eps, lam)
    return (loss, logits, bs, squared_norm(grads),
            *member_update(params, opt_state, ema_params, ema_bs, grads, bs, tx=tx, p=p,
                           alpha=alpha))


def shared_counters(opt_state):
    """``(in_axes, opt_state)`` for mapping the optimiser over ensemble members with its integer
    step counters unbatched: every member takes the same steps, so member 0's counter stands for
    all. Batched, the counter (and the p the ℓp weight decay derives from it) would turn the
    decay's ``lax.cond`` on p = ∞ into a select that computes both branches for every weight."""
    axes = jax.tree.map(lambda a: None if jnp.issubdtype(a.dtype, jnp.integer) else 0, opt_state)
    return axes, jax.tree.map(lambda a, ax: a if ax == 0 else a[0], opt_state, axes)


def train_step(state: TrainState, images, labels, batch_idx, p_phase: str, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: Schedule, loss_fn: Callable,
               prepare: Callable, pixel_std: float, ensemble: int | None = None,
               mode: str = "joint", execution: str = "batched",
               constrain: Callable | None = None):
    """One training step: ``(new_state, metrics)``.

    ``images``/``labels`` are the whole training split on the device; ``batch_idx`` is ``[B]``
    (single model and joint ensembles: all members see the same batch) or ``[K, B]``
    (independent ensembles). ``ensemble`` is K (None: a single model), ``mode`` 'joint' or
    'independent', ``execution`` how the member axis runs (:func:`linf_jax.ensemble.members_map`).
    ``constrain(x, y, member_axis)`` places the batch on a device mesh (None: no mesh).
    ``pixel_std`` converts the metrics' ε back to pixels.
    """
    step = state.step
    p = {"start": schedule.p_start, "inf": INF}.get(p_phase)
    p = schedule.p(step) if p is None else p
    eps, lam, alpha = schedule.eps(step), schedule.lam(step), schedule.ema_decay_at(step)
    aug_key = jax.random.fold_in(_keys(state.rng)["augment"], step)
    constrain = constrain or (lambda x, y, member_axis: (x, y))
    one_step = functools.partial(member_step, model=model, loss_fn=loss_fn, tx=tx)

    if ensemble is None:
        x, y = constrain(*prepare(images, labels, batch_idx, aug_key), member_axis=False)
        loss, logits, bs, grad_sq, params, opt_state, ema_params, ema_bs = one_step(
            state.params, state.batch_stats, state.opt_state, state.ema_params,
            state.ema_batch_stats, x, y, p, eps, lam, alpha)
    elif mode == "joint":
        x, y = constrain(*prepare(images, labels, batch_idx, aug_key), member_axis=False)
        (loss, (logits, bs)), grads = jax.value_and_grad(
            functools.partial(joint_loss, model=model, loss_fn=loss_fn, execution=execution),
            has_aux=True)(state.params, state.batch_stats, x, y, p, eps, lam)
        grad_sq = squared_norm(grads)
        opt_axes, opt_in = shared_counters(state.opt_state)
        params, opt_state, ema_params, ema_bs = jax.vmap(
            functools.partial(member_update, tx=tx, p=p, alpha=alpha),
            in_axes=(0, opt_axes, 0, 0, 0, 0))(
            state.params, opt_in, state.ema_params, state.ema_batch_stats, grads, bs)
    else:  # independent: the single-model step mapped over the members
        member_keys = jax.vmap(lambda i: jax.random.fold_in(aug_key, i))(jnp.arange(ensemble))
        x, y = constrain(*jax.vmap(prepare, in_axes=(None, None, 0, 0))(
            images, labels, batch_idx, member_keys), member_axis=True)
        opt_axes, opt_in = (shared_counters(state.opt_state) if execution == "batched"
                            else (0, state.opt_state))
        loss, logits, bs, grad_sq, params, opt_state, ema_params, ema_bs = (
            ensemble_lib.members_map(
                one_step, (0, 0, opt_axes, 0, 0, 0, 0, None, None, None, None), execution)(
                state.params, state.batch_stats, opt_in, state.ema_params,
                state.ema_batch_stats, x, y, p, eps, lam, alpha))
        loss, grad_sq = loss.mean(), grad_sq.sum()
    new_state = state.replace(
        step=step + 1, params=params, batch_stats=bs, opt_state=opt_state,
        ema_params=ema_params, ema_batch_stats=ema_bs)
    metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == y).mean(),
               "grad_norm": jnp.sqrt(grad_sq), "param_norm": optax.global_norm(params),
               "p": jnp.asarray(p, jnp.float32), "eps": eps * pixel_std,
               "lr": schedule.lr_at(step), "lam": lam, "ema_decay": alpha}
    return new_state, metrics


def bind_train_step(config, model: nn.Module, tx, schedule: Schedule, meta: dict,
                    constrain: Callable | None = None) -> Callable:
    """:func:`train_step` with everything a run's config fixes bound (``functools.partial``),
    not jitted: ``step_fn(state, images, labels, batch_idx, p_phase)``, for the caller to jit
    with ``static_argnames=("p_phase",)``."""
    execution = ensemble_lib.resolve_execution(config.ensemble.get("execution", "auto"),
                                               sharded=bool(config.ensemble.shard),
                                               training=True)
    return functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, loss_fn=make_loss_fn(config),
        prepare=make_prepare_fn(config, meta), pixel_std=float(meta["std"]),
        ensemble=members(config), mode=config.ensemble.mode, execution=execution,
        constrain=constrain)


def make_train_step(config, model: nn.Module, tx, schedule: Schedule, meta: dict,
                    mesh=None, state_sharding=None, donate: bool = False) -> Callable:
    """:func:`bind_train_step` jitted: ``step_fn(state, images, labels, batch_idx, p_phase)``.
    With ``donate`` the input state's buffers are reused for the output state (the training
    loop never reads a state it has passed on), so a step holds one copy of parameters, Adam
    moments and EMA instead of two; callers that step the same state twice keep it off. With a
    ``mesh`` the batch is constrained to its ``data`` axis and the state keeps
    ``state_sharding``; the program is the global-batch program either way."""

    def constrain(x, y, member_axis: bool):
        sharding = parallel.batch_sharding(mesh, member_axis)
        return (jax.lax.with_sharding_constraint(x, sharding),
                jax.lax.with_sharding_constraint(y, sharding))

    step_fn = bind_train_step(config, model, tx, schedule, meta,
                              constrain=None if mesh is None else constrain)
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step_fn, static_argnames=("p_phase",), donate_argnums=donate_argnums)
    if mesh.size > 1:  # custom calls would run unpartitioned (see ops.partitionable)
        step_fn = ops.partitionable(step_fn)
    return jax.jit(step_fn, static_argnames=("p_phase",), donate_argnums=donate_argnums,
                   out_shardings=(state_sharding, parallel.replicated(mesh)))
