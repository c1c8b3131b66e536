"""The training step: TrainState, its creation, and ``train_step`` as one pure function.

``train_step(state, images, labels, batch_idx, p_phase, *, spec)`` is a module-level function in
the style of flax's ``examples/imagenet``: the state carries the model's apply function and the
optimiser (static fields of :class:`TrainState`), and the caller binds the rest of what a run
fixes, one :class:`StepSpec` (schedule, loss, batch preparation, ensemble layout), with
``functools.partial`` and jits it (:func:`make_train_step` does both for a config; the objects
come from :mod:`linf_jax.experiment`). It reads p, ε, lr, λ and the EMA decay from
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

The step's randomness (augmentation, and a SortNet's training masks) comes from keys derived from
``(seed, step)``, and the data order from ``(seed, epoch)``
(:func:`linf_jax.experiment.epoch_order`), so a resumed run is bit-identical to an uninterrupted
one. The method is described in docs/METHOD.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from linf_jax import ensemble as ensemble_lib
from linf_jax import experiment, ops, optim, parallel
from linf_jax import recalibrate as recalibrate_lib
from linf_jax.config import num_members
from linf_jax.experiment import augment_key
from linf_jax.models import uses_dropout
from linf_jax.schedules import INF, Schedule


@flax.struct.dataclass
class TrainState:
    """The whole state of a run: its arrays (checkpointed) and, as static fields (not pytree
    leaves, never saved), the model's apply function and the optimiser, as in flax's
    ``training.train_state.TrainState``."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array  # raw uint32 key data of PRNGKey(seed); all keys derive from it
    # A SortNet's running means re-estimated for the certified network, {'raw', 'ema', 'step'}
    # (linf_jax.recalibrate); {} for every other model.
    recalibrated: Any
    apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)


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

    k = num_members(config)
    return init_one(key) if k is None else jax.vmap(init_one)(jax.random.split(key, k))


def create_train_state(config, model: nn.Module, input_shape, tx, mesh=None) -> TrainState:
    """The initial state of a run: variables, optimiser state (per member for an ensemble),
    their EMA copies, step 0 and the seed's key.

    With a ``mesh`` the state is created directly with the shardings of
    :func:`linf_jax.parallel.state_shardings` (member axis on ``members``, the rest replicated).
    """
    k = num_members(config)
    rng = jax.random.PRNGKey(config.seed)

    def init(rng):
        params, batch_stats = init_variables(config, model, input_shape, jax.random.fold_in(rng, 0))
        opt_state = tx.init(params) if k is None else jax.vmap(tx.init)(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
            opt_state=opt_state, ema_params=jax.tree.map(jnp.copy, params),
            ema_batch_stats=jax.tree.map(jnp.copy, batch_stats), rng=rng,
            recalibrated=(recalibrate_lib.initial(batch_stats)
                          if recalibrate_lib.needs_recalibration(model) else {}),
            apply_fn=model.apply, tx=tx)

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = parallel.state_shardings(jax.eval_shape(init, rng), mesh, k)
    return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def squared_norm(tree) -> jax.Array:
    """``Σ g²`` over a pytree, as ``Σ |g|·|g|``: written ``g * g``, XLA merges the product with
    Adam's own ``g²`` and materialises it to feed the reduction (an extra write and read of
    every gradient on the CPU); with the ``abs`` the product stays fused into the reduction."""
    return sum(jnp.sum(jnp.abs(g) * jnp.abs(g)) for g in jax.tree.leaves(tree))


def dropout_key(rng):
    """The key of SortNet's training masks; each step folds in its number, each ensemble member
    its index (so a resumed run draws the same masks)."""
    return jax.random.fold_in(rng, 4)


def member_apply(apply_fn: Callable, params, batch_stats, x, y, p, eps, key=None):
    """One model in training mode: ``(logits, worst-case margins, new batch_stats)``. ``key``:
    the ``'dropout'`` RNG of a SortNet's masks (None: a model without random masks)."""
    variables = {"params": params, "batch_stats": batch_stats}
    rngs = None if key is None else {"dropout": key}
    (logits, margins), new = apply_fn(
        variables, x, p=p, train=True, eps=eps, labels=y, mutable=["batch_stats"], rngs=rngs)
    return logits, margins, new.get("batch_stats", {})


def member_loss(params, batch_stats, x, y, p, eps, lam, key=None, *, apply_fn, loss_fn):
    """The loss of one model on a batch: ``(loss, (logits, new batch_stats))``."""
    logits, margins, bs = member_apply(apply_fn, params, batch_stats, x, y, p, eps, key)
    return loss_fn(logits, margins, y, eps, lam, params["logit_scale"]), (logits, bs)


def joint_loss(params, batch_stats, x, y, p, eps, lam, keys=None, *, apply_fn, loss_fn,
               execution):
    """The loss of a joint ensemble: the members applied (mapped over the member axis), then
    ONE loss of their mean logits and mean worst-case margins (docs/METHOD.md §8). ``keys``:
    one mask key per member (``[K, ...]``), or None."""
    logits, margins, bs = ensemble_lib.members_map(
        functools.partial(member_apply, apply_fn),
        (0, 0, None, None, None, None, None if keys is None else 0), execution)(
        params, batch_stats, x, y, p, eps, keys)
    logits = logits.mean(0)
    loss = loss_fn(logits, margins.mean(0), y, eps, lam, params["logit_scale"].mean())
    return loss, (logits, bs)


class MemberUpdate(NamedTuple):
    """One model's new parameters, optimiser state and EMA copies."""

    params: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any


class MemberStep(NamedTuple):
    """The result of :func:`member_step`: the step's loss, logits, new running means and
    ``Σ grad²``, and the :class:`MemberUpdate`."""

    loss: jax.Array
    logits: jax.Array
    batch_stats: Any
    grad_sq: jax.Array
    update: MemberUpdate


def member_update(params, opt_state, ema_params, ema_bs, grads, bs, *, tx, step, p, alpha
                  ) -> MemberUpdate:
    """Adam, the weight decay and the lr of ``step`` (Optax), then the EMA of the parameters and
    of the running means, for one model."""
    # In the start and inf phases p is a Python number and the ℓp decay is compiled for it; in
    # the ramp it is the traced p of the step.
    updates, opt_state = tx.update(grads, opt_state, params, p=p, step=step)
    params = optax.apply_updates(params, updates)
    return MemberUpdate(params, opt_state, optim.ema_update(ema_params, params, alpha),
                        optim.ema_update(ema_bs, bs, alpha))


def member_step(params, batch_stats, opt_state, ema_params, ema_bs, x, y, p, eps, lam, alpha,
                key=None, *, apply_fn, loss_fn, tx, step) -> MemberStep:
    """The whole step of one model. The single-model step, and mapped over the members the
    independent ensemble's (each member's new state written once, no stacked temporaries).
    ``key``: the step's mask key of a SortNet, or None."""
    (loss, (logits, bs)), grads = jax.value_and_grad(
        functools.partial(member_loss, apply_fn=apply_fn, loss_fn=loss_fn), has_aux=True)(
        params, batch_stats, x, y, p, eps, lam, key)
    return MemberStep(loss, logits, bs, squared_norm(grads),
                      member_update(params, opt_state, ema_params, ema_bs, grads, bs, tx=tx,
                                    step=step, p=p, alpha=alpha))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a run fixes for its step besides the model and the optimiser (which the
    :class:`TrainState` carries): the schedule, the loss, the batch preparation, the pixel std
    that turns the metrics' ε back into pixels, the ensemble layout (``num_members``: K, or None
    for a single model; ``mode`` 'joint' or 'independent'; ``execution``, how the member axis
    runs, :func:`linf_jax.ensemble.members_map`) and ``constrain(x, y, member_axis)``, which
    places the batch on a device mesh (None: no mesh). :func:`step_spec` builds it from a
    config."""

    schedule: Schedule
    loss_fn: Callable
    prepare: Callable
    pixel_std: float
    num_members: int | None = None
    mode: str = "joint"
    execution: str = "batched"
    constrain: Callable | None = None
    dropout: bool = False  # a SortNet with random masks: the step draws a 'dropout' key


def train_step(state: TrainState, images, labels, batch_idx, p_phase: str, *, spec: StepSpec):
    """One training step: ``(new_state, metrics)``.

    ``images``/``labels`` are the whole training split on the device; ``batch_idx`` is ``[B]``
    (single model and joint ensembles: all members see the same batch) or ``[K, B]``
    (independent ensembles). The model and the optimiser are the state's ``apply_fn`` and
    ``tx``; everything else a run fixes is ``spec``.
    """
    schedule, k = spec.schedule, spec.num_members
    step = state.step
    p = {"start": schedule.p_start, "inf": INF}.get(p_phase)
    p = schedule.p(step) if p is None else p
    eps, lam, alpha = schedule.eps(step), schedule.lam(step), schedule.ema_decay_at(step)
    aug_key = jax.random.fold_in(augment_key(state.rng), step)
    drop_key = jax.random.fold_in(dropout_key(state.rng), step) if spec.dropout else None
    member_keys = None if drop_key is None or k is None else jax.vmap(
        lambda i: jax.random.fold_in(drop_key, i))(jnp.arange(k))
    constrain = spec.constrain or (lambda x, y, member_axis: (x, y))
    one_step = functools.partial(member_step, apply_fn=state.apply_fn, loss_fn=spec.loss_fn,
                                 tx=state.tx, step=step)

    if k is None:
        x, y = constrain(*spec.prepare(images, labels, batch_idx, aug_key), member_axis=False)
        out = one_step(state.params, state.batch_stats, state.opt_state, state.ema_params,
                       state.ema_batch_stats, x, y, p, eps, lam, alpha, drop_key)
        loss, logits, bs, grad_sq, update = out
    elif spec.mode == "joint":
        x, y = constrain(*spec.prepare(images, labels, batch_idx, aug_key), member_axis=False)
        (loss, (logits, bs)), grads = jax.value_and_grad(
            functools.partial(joint_loss, apply_fn=state.apply_fn, loss_fn=spec.loss_fn,
                              execution=spec.execution),
            has_aux=True)(state.params, state.batch_stats, x, y, p, eps, lam, member_keys)
        grad_sq = squared_norm(grads)
        # p and the step are the same for every member: closed over, not batched, so the ℓp
        # decay's lax.cond on p = ∞ stays a cond instead of a select computing both branches
        update = jax.vmap(functools.partial(member_update, tx=state.tx, step=step, p=p,
                                            alpha=alpha))(
            state.params, state.opt_state, state.ema_params, state.ema_batch_stats, grads, bs)
    else:  # independent: the single-model step mapped over the members
        aug_keys = jax.vmap(lambda i: jax.random.fold_in(aug_key, i))(jnp.arange(k))
        x, y = constrain(*jax.vmap(spec.prepare, in_axes=(None, None, 0, 0))(
            images, labels, batch_idx, aug_keys), member_axis=True)
        loss, logits, bs, grad_sq, update = ensemble_lib.members_map(
            one_step, (0, 0, 0, 0, 0, 0, 0, None, None, None, None,
                       None if member_keys is None else 0), spec.execution)(
            state.params, state.batch_stats, state.opt_state, state.ema_params,
            state.ema_batch_stats,
            x, y, p, eps, lam, alpha, member_keys)
        loss, grad_sq = loss.mean(), grad_sq.sum()
    new_state = state.replace(
        step=step + 1, params=update.params, batch_stats=bs, opt_state=update.opt_state,
        ema_params=update.ema_params, ema_batch_stats=update.ema_batch_stats)
    metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == y).mean(),
               "grad_norm": jnp.sqrt(grad_sq), "param_norm": optax.global_norm(update.params),
               "p": jnp.asarray(p, jnp.float32), "eps": eps * spec.pixel_std,
               "lr": schedule.lr_at(step), "lam": lam, "ema_decay": alpha}
    return new_state, metrics


def step_spec(config, schedule: Schedule, meta: dict, constrain: Callable | None = None
              ) -> StepSpec:
    """The :class:`StepSpec` of a config: its loss, its batch preparation and its ensemble
    layout, with ``schedule`` and ``constrain``."""
    execution = ensemble_lib.resolve_execution(config.ensemble.get("execution", "auto"),
                                               sharded=bool(config.ensemble.shard),
                                               training=True)
    return StepSpec(schedule=schedule, loss_fn=experiment.make_loss_fn(config),
                    prepare=experiment.make_prepare_fn(config, meta),
                    pixel_std=float(meta["std"]), num_members=num_members(config),
                    mode=config.ensemble.mode, execution=execution, constrain=constrain,
                    dropout=uses_dropout(config.model))


def bind_train_step(config, schedule: Schedule, meta: dict,
                    constrain: Callable | None = None) -> Callable:
    """:func:`train_step` with the config's :class:`StepSpec` bound, not jitted:
    ``step_fn(state, images, labels, batch_idx, p_phase)``, for the caller to jit with
    ``static_argnames=("p_phase",)``."""
    return functools.partial(train_step, spec=step_spec(config, schedule, meta, constrain))


def make_train_step(config, schedule: Schedule, meta: dict, mesh=None, state_sharding=None,
                    donate: bool = False, kernels: ops.KernelChoice | None = None) -> Callable:
    """:func:`bind_train_step` jitted: ``step_fn(state, images, labels, batch_idx, p_phase)``,
    traced under ``kernels`` (None: the choice in force when it is first traced).
    With ``donate`` the input state's buffers are reused for the output state (the training
    loop never reads a state it has passed on), so a step holds one copy of parameters, Adam
    moments and EMA instead of two; callers that step the same state twice keep it off. With a
    ``mesh`` the batch is constrained to its ``data`` axis and the state keeps
    ``state_sharding``; the program is the global-batch program either way; on several devices
    the kernels are :meth:`linf_jax.ops.KernelChoice.for_partitioned`."""

    def constrain(x, y, member_axis: bool):
        sharding = parallel.batch_sharding(mesh, member_axis)
        return (jax.lax.with_sharding_constraint(x, sharding),
                jax.lax.with_sharding_constraint(y, sharding))

    bound = bind_train_step(config, schedule, meta, constrain=None if mesh is None else constrain)
    if mesh is not None and mesh.size > 1:  # custom calls would run unpartitioned
        bound = ops.partitionable(bound)

    def step_fn(state, images, labels, batch_idx, p_phase):
        # None: the choice in force where the step is first traced (an outer use_kernels)
        with contextlib.nullcontext() if kernels is None else ops.use_kernels(kernels):
            return bound(state, images, labels, batch_idx, p_phase)

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step_fn, static_argnames=("p_phase",), donate_argnums=donate_argnums)
    return jax.jit(step_fn, static_argnames=("p_phase",), donate_argnums=donate_argnums,
                   out_shardings=(state_sharding, parallel.replicated(mesh)))
