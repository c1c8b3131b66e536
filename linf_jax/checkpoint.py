"""A run folder on disk: Orbax checkpoints, the run's JSON files, the writer's lock, loading.

A workdir holds ``config.json`` (the resolved config), ``meta.json`` (the data set's shape,
classes and normalisation), ``checkpoints/<step>/`` (Orbax, OCDBT + TensorStore: arrays and JSON,
nothing pickled), ``metrics.jsonl`` and TensorBoard event files, ``results.json`` and
``.lock``. Saves are atomic (Orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when
complete), and every JSON file is written to a temporary file and renamed.

Loading for inference (:func:`load_variables`) restores only the weights asked for (EMA or raw,
with the mean-shift running means) by a partial Orbax restore: no optimiser is built.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import flax
import jax
import orbax.checkpoint as ocp

from linf_jax import experiment, train_lib
from linf_jax import recalibrate as recalibrate_lib
from linf_jax.config import (
    CheckpointError,
    ConfigError,
    TrainingError,
    check_weights,
    first_line,
    flat,
)
from linf_jax.models import build_model
from linf_jax.train_lib import TrainState

# ----------------------------------------------------------------------------------------------
# Orbax
# ----------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, keep: int = 2, every_steps: int | None = None,
                       keep_every_steps: int | None = None) -> ocp.CheckpointManager:
    """The Orbax manager of ``<workdir>/checkpoints``: ``should_save(step)`` is True on every
    ``every_steps``-th step (None: only when a save is forced), the newest ``keep`` steps are
    kept, and with ``keep_every_steps`` every step that is a multiple of it is kept as well
    (to study a run afterwards). A save killed half-way (SIGKILL, power loss) leaves a
    ``<step>.orbax-checkpoint-tmp-*`` folder; it is never restored and is removed here."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    policy = (ocp.checkpoint_managers.FixedIntervalPolicy(int(every_steps)) if every_steps
              else ocp.checkpoint_managers.AnySavePolicy([]))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every_steps, create=True,
        cleanup_tmp_directories=True, save_decision_policy=policy)
    return ocp.CheckpointManager(path, options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, force: bool = True) -> bool:
    """Saves ``state`` at its step (synchronously: the step is on disk when this returns) if
    ``force`` or the manager's policy says so; False if nothing was written (not due, or the
    step exists already)."""
    step = int(state.step)
    if step in mngr.all_steps():
        return False
    # PyTreeSave/PyTreeRestore (Orbax's standard handler is built on it and writes the same
    # files): one handler for saving and for the partial restores of restore_checkpoint.
    saved = mngr.save(step, args=ocp.args.PyTreeSave(flax.serialization.to_state_dict(state)),
                      force=force)
    mngr.wait_until_finished()
    return bool(saved)


def restore_checkpoint(mngr: ocp.CheckpointManager, target: TrainState,
                       step: int | None = None) -> TrainState:
    """Restores the latest complete step (or ``step``) into the structure of ``target``."""
    step = mngr.latest_step() if step is None else step
    full = jax.tree.map(ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(target))
    abstract = _without_empty(full)
    # A partial restore: a checkpoint of an earlier version, whose optimiser state also kept step
    # counters of its own (now the train state's step is the only one), restores too.
    restored = _partial_restore(mngr, step, abstract)
    try:
        return flax.serialization.from_state_dict(target, _with_empty(restored, full))
    except (ValueError, KeyError, TypeError) as err:  # another structure than the target's
        raise _unrestorable(mngr, step, err) from None


def _partial_restore(mngr: ocp.CheckpointManager, step: int, abstract):
    """The leaves of ``abstract`` (shapes, dtypes, shardings) from checkpoint ``step``; the
    checkpoint may hold more. What Orbax or TensorStore cannot read is one CheckpointError."""
    try:
        return mngr.restore(step, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore: truncated, missing, other shapes
        raise _unrestorable(mngr, step, err) from None


def _without_empty(tree):
    """``tree`` without its empty dicts (the state dicts of stateless Optax transforms), which
    Orbax cannot match against a checkpoint that holds something there (:func:`_with_empty`
    puts them back)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: _without_empty(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def _with_empty(tree, template):
    """``tree`` with the empty dicts of ``template`` that :func:`_without_empty` left out."""
    if not isinstance(template, dict):
        return tree
    return {k: _with_empty(tree[k], v) if k in tree else v for k, v in template.items()}


def _unrestorable(mngr: ocp.CheckpointManager, step: int, err: BaseException) -> CheckpointError:
    """The one line for a checkpoint step that Orbax/TensorStore cannot read back."""
    return CheckpointError(
        f"checkpoint step {step} in {mngr.directory} cannot be restored "
        f"({first_line(err, 240, root=True)}); allowed: a complete checkpoint of this model "
        "and config")


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
    warning (``warn``, default: this module's logger) naming it and the step resumed from; with
    no good step left the last error is raised. Nothing is lost: the damaged files stay for
    inspection."""
    warn = warn or logging.getLogger(__name__).warning
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
            warn(f"checkpoint step {bad} cannot be restored ({cause}); moved to {dest}; "
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


def newest_good_step(mngr: ocp.CheckpointManager, restore: Callable[[int], object]
                     ) -> int | None:
    """The newest step for which ``restore(step)`` succeeds (read only; None if none does)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restore(step)
            return step
        except CheckpointError:
            continue
    return None


def write_atomic(path: str, data: str | bytes | bytearray) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file + rename): a reader sees the old
    file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Atomic JSON write (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def variables_for(state: TrainState, weights: str) -> dict:
    """Model variables of the EMA (default) or raw weights of a train state; for a SortNet with
    its re-estimated running means (:mod:`linf_jax.recalibrate`), which must belong to the
    state's step (CheckpointError else)."""
    check_weights(weights)
    params, bs = ((state.ema_params, state.ema_batch_stats) if weights == "ema"
                  else (state.params, state.batch_stats))
    if state.recalibrated:
        check_recalibrated(int(state.recalibrated["step"]), int(state.step))
        bs = state.recalibrated[weights]
    return {"params": params, "batch_stats": bs} if bs else {"params": params}


def check_recalibrated(recalibrated_step: int, step: int, where: str = "") -> None:
    """One-line CheckpointError unless a SortNet's running means were re-estimated for the
    weights of ``step``."""
    if recalibrated_step != step:
        when = ("never" if recalibrated_step < 0
                else f"for the weights of step {recalibrated_step}")
        raise CheckpointError(
            f"{where}SortNet step {step} has no re-estimated running means (re-estimated "
            f"{when}); allowed: a checkpoint written by linf-jax's trainer, which re-estimates "
            "them over the training set before every save (linf_jax.recalibrate)")


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
            f"{first_line(err)})") from None
    return config, meta


# Fields a resumed run must share with the checkpoint it resumes (they fix the parameter shapes
# and what the parameters mean).
RESUME_FIELDS = ("model", "ensemble.size", "ensemble.mode", "data.source")
# Config fields added after runs were made: a run whose config.json lacks one was trained with
# the value given here (so that such runs still resume).
ADDED_FIELDS = {"model.head_hidden": 256}


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
    new_flat = flat(json.loads(config.to_json()))
    old_flat = flat(old)
    for key in sorted(set(new_flat) | set(old_flat)):
        if not any(key == f or key.startswith(f + ".") for f in RESUME_FIELDS):
            continue
        old_flat.setdefault(key, ADDED_FIELDS.get(key))
        if new_flat.get(key) != old_flat.get(key):
            raise ConfigError(
                f"config.{key}={new_flat.get(key)!r} is not allowed: the run in "
                f"workdir={workdir!r} was trained with {old_flat.get(key)!r}; resume with the same "
                "value or train into a new --workdir")


def _on_this_device(abstract):
    """Shapes and dtypes of ``abstract`` placed on this process's first device: how a run saved
    by any number of processes or devices is read back into one process."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)


def _open_run(workdir: str):
    """``(config, meta, model, checkpoint folder)`` of a run, or one-line CheckpointError."""
    config, meta = read_run_files(workdir)
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"workdir={workdir!r} is not a linf-jax run: {ckpt_dir} is missing")
    try:
        model = build_model(config.model, meta["num_classes"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"workdir={workdir!r}: config.json/meta.json do not describe a model "
            f"({first_line(err)})") from None
    return config, meta, model, ckpt_dir


def _restore_step(workdir: str, ckpt_dir: str, step: int | None, restore):
    """``(step, restore(mngr, step))`` for the latest complete step (or ``step``). A step that
    does not restore is refused in one line naming the newest step that does. Only finalised
    steps count (a killed save's ``*.orbax-checkpoint-tmp-*`` folder is ignored), and nothing
    in the folder is written (``create=False``, no garbage collection)."""
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
            return chosen, restore(mngr, chosen)
        except CheckpointError as err:
            good = newest_good_step(mngr, lambda s: restore(mngr, s))
            hint = (f"; the newest step that restores is {good}: certify it with --step={good}"
                    if good is not None else "; no step of this run restores")
            raise CheckpointError(f"workdir={workdir!r}: {err}{hint}") from None
    finally:
        mngr.close()


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps of a run, oldest first (read only)."""
    _, _, _, ckpt_dir = _open_run(os.fspath(workdir))
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def steps_per_epoch_from_metrics(workdir: str) -> int | None:
    """Steps per epoch of a run whose meta.json predates that field, from the step and epoch of
    a logged line of its metrics.jsonl (None if none tells)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("step") and rec.get("epoch"):
                    return round(rec["step"] / rec["epoch"])
    except (OSError, ValueError):
        pass
    return None


def load_run(workdir: str, step: int | None = None):
    """``(config, meta, model, state)``: the whole train state of a finished or interrupted run
    (optimiser included) from its latest complete checkpoint, or ``step``. Raises
    :class:`CheckpointError` with one line when there is none, or when the chosen step cannot
    be restored (naming the newest step that can). For inference, :func:`load_variables` is
    cheaper: it reads the weights only."""
    workdir = os.fspath(workdir)
    config, meta, model, ckpt_dir = _open_run(workdir)
    try:
        tx = experiment.make_optimizer(config, experiment.make_schedule(config, 1, meta["std"]))
        target = _on_this_device(jax.eval_shape(lambda: train_lib.create_train_state(
            config, model, tuple(meta["input_shape"]), tx)))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"workdir={workdir!r}: config.json/meta.json do not describe a model "
            f"({first_line(err)})") from None
    _, state = _restore_step(workdir, ckpt_dir, step,
                             lambda mngr, s: restore_checkpoint(mngr, target, s))
    return config, meta, model, state


def load_variables(workdir: str, weights: str = "ema", step: int | None = None):
    """``(config, meta, model, variables, step)``: the EMA (default) or raw weights of a run
    with the mean-shift running means, from its latest complete checkpoint (or ``step``), as
    model variables (a leading member axis for an ensemble run). A partial restore: the
    optimiser state stays on disk and no optimiser is built."""
    check_weights(weights)
    workdir = os.fspath(workdir)
    config, meta, model, ckpt_dir = _open_run(workdir)
    params, batch_stats = jax.eval_shape(lambda: train_lib.init_variables(
        config, model, tuple(meta["input_shape"]), jax.random.PRNGKey(0)))
    sort_net = recalibrate_lib.needs_recalibration(model)
    keys = ("ema_params", "ema_batch_stats") if weights == "ema" else ("params", "batch_stats")
    if sort_net:  # the running means re-estimated for the certified network
        abstract = {keys[0]: params, "recalibrated": {
            weights: batch_stats, "step": jax.ShapeDtypeStruct((), jax.numpy.int32)}}
    else:
        abstract = {keys[0]: params, keys[1]: batch_stats}
    abstract = _on_this_device(abstract)

    def restore(mngr, s):
        restored = _partial_restore(mngr, s, abstract)
        if sort_net:
            check_recalibrated(int(restored["recalibrated"]["step"]), s,
                               f"workdir={workdir!r}: checkpoint ")
        return restored

    chosen, restored = _restore_step(workdir, ckpt_dir, step, restore)
    params = restored[keys[0]]
    bs = restored["recalibrated"][weights] if sort_net else restored[keys[1]]
    variables = {"params": params, "batch_stats": bs} if bs else {"params": params}
    return config, meta, model, variables, chosen
