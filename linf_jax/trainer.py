"""The training loop: data on the device, the jitted step, metrics, checkpoints, signals.

:func:`train_and_evaluate` trains a config in a workdir, resuming from its newest checkpoint
that restores, and evaluates the EMA weights on the test split at the end. Around the step
(:mod:`linf_jax.train_lib`) it does what a run needs and nothing else:

* cadence through actions, not modulo arithmetic: :class:`PeriodicAction` logs every
  ``train.log_every`` steps and at the last step; Orbax's save policy
  (``save_interval_steps`` = ``train.checkpoint_every_epochs`` epochs) decides which steps are
  checkpointed, plus the last step and a preemption step (forced);
* metrics to ``metrics.jsonl`` (one JSON object per logged step) and to TensorBoard event files
  in the workdir (tensorboardX: no TensorFlow needed), both rewound on resume;
* SIGTERM/SIGINT (and on several hosts JAX's preemption sync point) → save and stop, exit 0;
* a SortNet's running means re-estimated for its raw and EMA weights before every checkpoint
  is written (:mod:`linf_jax.recalibrate`), so each checkpoint certifies without the data;
* one writer per workdir (:class:`linf_jax.checkpoint.WorkdirLock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linf_jax import checkpoint as ckpt
from linf_jax import config as config_lib
from linf_jax import data as data_lib
from linf_jax import ensemble as ensemble_lib
from linf_jax import evaluation, experiment, ops, parallel, train_lib
from linf_jax import recalibrate as recalibrate_lib
from linf_jax.config import ConfigError, TrainingError
from linf_jax.train_lib import TrainState


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    model: nn.Module
    meta: dict
    preempted: bool
    results: dict | None


class PeriodicAction:
    """Calls ``action(step, *args)`` on every ``every``-th step (steps counted from 0) and
    whenever asked with ``force=True`` (the last step). CLU's ``periodic_actions`` are the
    model; CLU itself imports TensorFlow, which linf-jax does not need."""

    def __init__(self, every: int, action: Callable[..., None]):
        self.every, self.action = int(every), action

    def __call__(self, step: int, *args, force: bool = False) -> bool:
        if force or step % self.every == 0:
            self.action(step, *args)
            return True
        return False


class MetricWriter:
    """``metrics.jsonl`` plus TensorBoard event files in the workdir, from ``start_step`` on:
    lines and events of steps at or after it (a resumed run recomputes them) are dropped. In
    TensorBoard, ``train/p`` is drawn while p is finite and ``train/inv_p`` (1/p, 0 from the
    ℓ∞ phase on) over the whole run."""

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                keep = [ln for ln in f
                        if ln.strip() and json.loads(ln).get("step", 0) < start_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)
        self._jsonl = open(path, "a")
        # purge_step: TensorBoard discards the earlier events at or after it (a resumed run).
        self._tb = SummaryWriter(logdir=workdir, purge_step=start_step or None,
                                 flush_secs=30)

    def write_scalars(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if not isinstance(value, (int, float)) or name == "step":
                continue
            if name == "p":  # p = ∞ is shown as 1/p = 0; TensorBoard has no non-finite scalars
                self._tb.add_scalar("train/inv_p", 0.0 if math.isinf(value) else 1.0 / value, step)
                if math.isinf(value):
                    continue
            self._tb.add_scalar(f"train/{name}", value, step)

    def write_results(self, step: int, results: dict) -> None:
        """The final evaluation as TensorBoard scalars (``eval/...``)."""
        if not self.enabled:
            return
        self._tb.add_scalar("eval/clean_accuracy", results["clean_accuracy"], step)
        for row in results["results"]:
            for key in ("certified_accuracy", "pgd_accuracy", "lipschitz_certified_accuracy"):
                if row.get(key) is not None:
                    self._tb.add_scalar(f"eval/{key}@{row['eps']:g}", row[key], step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class StopSignal:
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


def dataset_meta(ds: data_lib.Dataset) -> dict:
    """What a trained model needs to know of its data (``meta.json``)."""
    return {"source": ds.name, "input_shape": list(ds.input_shape),
            "num_classes": int(ds.num_classes), "mean": [float(m) for m in ds.mean],
            "std": float(ds.std), "augment": ds.augment}


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       evaluate_at_end: bool = True, max_steps: int | None = None, *,
                       kernels: ops.KernelChoice | None = None,
                       validated: bool = False) -> TrainResult:
    """Trains from ``config`` in ``workdir`` (resuming from its newest good checkpoint) and, at
    the end, evaluates the EMA weights on the test split.

    ``kernels``: the run's kernel choice (None: :func:`linf_jax.experiment.kernels` of the
    config, resolved here); every program of the run is traced with it and ``meta.json``
    records it. ``validated``: the caller has already run
    :func:`linf_jax.config.validate_config` on ``config`` (the command line does, before the
    heavy imports), so it is not checked twice. ``max_steps`` stops after that many steps of
    this call (checkpoint saved, ``preempted`` set), exactly as a SIGTERM would; calling again
    resumes."""
    if not validated:
        config_lib.validate_config(config)
    config_lib.check_determinism(config)
    kernels = experiment.kernels(config) if kernels is None else kernels
    return _train_and_evaluate(config, workdir, progress, evaluate_at_end, max_steps, kernels)


@dataclasses.dataclass
class _Run:
    """What the loop works with, built once from the config and the data."""

    config: object
    workdir: str
    train_ds: data_lib.Dataset
    meta: dict
    model: nn.Module
    mesh: object
    batches: list
    schedule: object
    state_sharding: object
    kernels: ops.KernelChoice


def _build(config, workdir: str, kernels: ops.KernelChoice) -> tuple[_Run, TrainState]:
    d = config.data
    train_ds = data_lib.load(d.source, d.train_split, d.get("data_dir"))
    meta = dataset_meta(train_ds)
    model = experiment.build_model(config, train_ds.num_classes)
    n = len(train_ds.labels)
    mesh = experiment.make_mesh(config)
    if mesh.size > 1:  # custom calls would run unpartitioned: recorded as what runs
        kernels = kernels.for_partitioned()
    batches = experiment.epoch_batches(n, config.train.batch_size,
                                      bool(config.train.get("drop_last", False)),
                                      mesh.shape[parallel.DATA])
    if not batches:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not allowed: "
                          f"at most the {n} training examples of {d.source}:{d.train_split} "
                          "with train.drop_last=True")
    meta["steps_per_epoch"] = len(batches)
    meta["kernels"] = kernels.record()
    schedule = experiment.make_schedule(config, len(batches), meta["std"])
    tx = experiment.make_optimizer(config, schedule)
    with ops.use_kernels(kernels):
        state = train_lib.create_train_state(config, model, train_ds.input_shape, tx, mesh)
    sharding = jax.tree.map(lambda a: a.sharding, state)
    run = _Run(config, workdir, train_ds, meta, model, mesh, batches, schedule, sharding, kernels)
    return run, state


def _train_and_evaluate(config, workdir, progress, evaluate_at_end, max_steps, kernels
                        ) -> TrainResult:
    run, state = _build(config, workdir, kernels)  # a bad model or data: nothing written yet
    os.makedirs(workdir, exist_ok=True)
    main_process = jax.process_index() == 0  # multi-host: process 0 writes the run's files
    lock = ckpt.WorkdirLock(workdir)
    if main_process:
        lock.acquire()
    try:
        steps_per_epoch = len(run.batches)
        mngr = ckpt.checkpoint_manager(
            workdir, config.train.keep_checkpoints,
            every_steps=steps_per_epoch * config.train.checkpoint_every_epochs,
            keep_every_steps=_keep_every_steps(config, steps_per_epoch))
        writer = None
        try:
            if mngr.latest_step() is not None:
                state = ckpt.restore_newest_good(mngr, state, workdir)
            writer = MetricWriter(workdir, int(state.step), enabled=main_process)
            if main_process:
                ckpt.write_json(os.path.join(workdir, "config.json"),
                                json.loads(config.to_json()))
                ckpt.write_json(os.path.join(workdir, "meta.json"), run.meta)
            state, preempted = _loop(run, state, mngr, writer, progress and main_process,
                                     max_steps)
            results = None
            if evaluate_at_end and not preempted:
                results = _evaluate_at_end(run, state, writer, progress and main_process)
        finally:
            if writer is not None:
                writer.close()
            mngr.wait_until_finished()
            mngr.close()
    finally:
        lock.release()
    return TrainResult(state=state, model=run.model, meta=run.meta, preempted=preempted,
                       results=results)


def _loop(run: _Run, state: TrainState, mngr, writer: MetricWriter, progress: bool,
          max_steps: int | None):
    """Trains from ``state`` to the end (or a stop); ``(state, preempted)``."""
    from tqdm.auto import tqdm  # local: keeps `import linf_jax` light

    config, schedule = run.config, run.schedule
    steps_per_epoch = len(run.batches)
    step_fn = train_lib.make_train_step(config, schedule, run.meta, run.mesh, run.state_sharding,
                                        donate=True, kernels=run.kernels)
    replicated = parallel.replicated(run.mesh)
    images = parallel.global_array(run.train_ds.images, replicated)
    labels = parallel.global_array(run.train_ds.labels, replicated)
    n = len(run.train_ds.labels)
    total = schedule.total_steps
    start = int(state.step)
    order_k = config_lib.num_members(config) if config.ensemble.mode == "independent" else None
    recalibrated = _recalibration(run, images, labels)
    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    t0 = time.time()

    def checked(step: int, metrics) -> dict:
        values = {key: float(v) for key, v in metrics.items()}
        for name in ("loss", "grad_norm", "param_norm"):
            if not math.isfinite(values[name]):
                raise TrainingError(
                    f"non-finite {name} {values[name]} at step {step}; stopped, the last good "
                    f"checkpoint (step {mngr.latest_step()}) is kept")
        return values

    def log(step: int, values: dict) -> None:
        writer.write_scalars(step, {"epoch": step / steps_per_epoch,
                                    "time": round(time.time() - t0, 3), **values})
        bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}",
                        p=f"{values['p']:.4g}", eps=f"{values['eps']:.3f}",
                        lr=f"{values['lr']:.2e}", refresh=False)

    log_action = PeriodicAction(config.train.log_every, log)
    stop = StopSignal()
    preempted = False
    pending = None  # (step, metrics) read one step late so the host never stalls the device
    order, order_epoch = None, -1

    def emit(step_metrics, last: bool = False):
        step, metrics = step_metrics
        log_action(step, checked(step, metrics), force=last or step == total - 1)

    try:
        with stop.installed():
            for step in range(start, total):
                epoch, pos = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order = np.asarray(experiment.epoch_order(state.rng, epoch, n, order_k))
                    order_epoch = epoch
                lo, hi = run.batches[pos]  # the last batch of an epoch may be partial
                idx = parallel.global_array(order[..., lo:hi], replicated)
                state, metrics = step_fn(state, images, labels, idx, schedule.p_phase(step))
                if pending is not None:
                    emit(pending)
                pending = (step, metrics)
                bar.update(1)
                done = step + 1
                if max_steps is not None and done - start >= max_steps and done < total:
                    stop.signum = -1
                stopping = stop.agreed(done)
                if stopping or done == total or mngr.should_save(done):
                    checked(*pending)  # never checkpoint a non-finite state
                    if recalibrated is not None:
                        state = recalibrated(state)
                    ckpt.save_checkpoint(mngr, state, force=True)
                if stopping:
                    preempted = True
                    break
            if pending is not None:  # the last step (also when preempted: the rerun goes on)
                emit(pending, last=not preempted)
    finally:
        bar.close()
    return state, preempted


def _recalibration(run: _Run, images, labels) -> Callable[[TrainState], TrainState] | None:
    """``fn(state)``: the state with its ``recalibrated`` field re-estimated for its raw and EMA
    weights over the training set (:mod:`linf_jax.recalibrate`), batches as in training and
    augmented with a key of ``(seed, step)``; None for a model that needs none."""
    if not recalibrate_lib.needs_recalibration(run.model):
        return None
    config = run.config
    execution = ensemble_lib.resolve_execution(config.ensemble.get("execution", "auto"),
                                               sharded=bool(config.ensemble.shard))
    means = recalibrate_lib.make_means_fn(
        run.model.apply, experiment.make_prepare_fn(config, run.meta),
        config_lib.num_members(config), execution)
    batches = [np.arange(lo, hi) for lo, hi in run.batches]

    def fn(state: TrainState) -> TrainState:
        key = jax.random.fold_in(recalibrate_lib.recalibration_key(state.rng), state.step)
        with ops.use_kernels(run.kernels):
            raw, ema = (recalibrate_lib.recalibrate(means, params, bs, images, labels, batches,
                                                    key)
                        for params, bs in ((state.params, state.batch_stats),
                                           (state.ema_params, state.ema_batch_stats)))
        new = {"raw": raw, "ema": ema, "step": jnp.copy(state.step)}  # its own buffer: donated
        return state.replace(recalibrated=jax.device_put(new, run.state_sharding.recalibrated))

    return fn


def _keep_every_steps(config, steps_per_epoch: int) -> int | None:
    """``train.keep_every_epochs`` in steps (checkpoints kept for good), or None."""
    k = config.train.get("keep_every_epochs")
    return None if not k else int(k) * steps_per_epoch


def _evaluate_at_end(run: _Run, state: TrainState, writer: MetricWriter, progress: bool
                     ) -> dict:
    """The EMA weights on the test split (written to ``results.json`` and TensorBoard)."""
    d = run.config.data
    test_ds = data_lib.load(d.source, d.test_split, d.get("data_dir"))
    with ops.use_kernels(run.kernels):
        results = evaluation.evaluate(
            run.model, ckpt.variables_for(state, "ema"), test_ds, run.meta, run.config.eval,
            num_members=config_lib.num_members(run.config), progress=progress,
            key=jax.random.fold_in(state.rng, 3))
    results["weights"] = "ema"
    if jax.process_index() == 0:
        ckpt.write_json(os.path.join(run.workdir, "results.json"), results)
        writer.write_results(int(state.step), results)
    return results
