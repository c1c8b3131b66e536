"""Nothing lost: a save killed with SIGKILL half-way never damages the previous checkpoint, the
restore takes the latest complete one, checkpoints hold no pickles and are never unpickled, and a
non-finite loss stops training at once, naming the step and value, with the last good checkpoint
kept."""

import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config

from linf_jax import checkpoint as ckpt
from linf_jax import config as config_lib
from linf_jax import train_lib, trainer

N = 4_000_000  # 16 MB per array: a save takes long enough to be killed inside it


@flax.struct.dataclass
class S:
    """The checkpointed state of the SIGKILL test (the child process imports it from here)."""
    step: jnp.ndarray
    w: jnp.ndarray
    v: jnp.ndarray


CHILD = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
    import jax.numpy as jnp
    from linf_jax import checkpoint as ckpt
    from test_checkpoints import S

    def state(step):
        w = jnp.arange({N}, dtype=jnp.float32) * 1e-3 + step
        return S(step=jnp.int32(step), w=w, v=-w)

    mngr = ckpt.checkpoint_manager(sys.argv[1], keep=5)
    ckpt.save_checkpoint(mngr, state(1))
    print("saved 1", flush=True)
    sys.stdin.readline()  # the parent is watching the folder now
    ckpt.save_checkpoint(mngr, state(2))
    print("saved 2", flush=True)
""")


def _expected(step):
    w = np.arange(N, dtype=np.float32) * np.float32(1e-3) + np.float32(step)
    return {"step": np.int32(step), "w": w, "v": -w}


def _kill_during_save(workdir, delay):
    """Starts the child, lets it save step 1, then SIGKILLs it ``delay`` seconds after the save
    of step 2 begins (``delay=None``: the moment Orbax's temporary folder appears). Returns
    whether a temporary (incomplete) step-2 folder was seen before the kill."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, workdir], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "saved 1", proc.stderr.read()[-2000:]
        ckpt = os.path.join(workdir, "checkpoints")
        proc.stdin.write("\n")
        proc.stdin.flush()
        t0 = time.time()
        seen_tmp = False
        while proc.poll() is None and time.time() - t0 < 60:
            seen_tmp = seen_tmp or any("tmp" in name for name in os.listdir(ckpt))
            if (delay is None and seen_tmp) or (delay is not None and time.time() - t0 >= delay):
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return seen_tmp
    finally:
        proc.kill()


def _restore(workdir):
    target = S(step=jnp.int32(0), w=jnp.zeros(N, jnp.float32), v=jnp.zeros(N, jnp.float32))
    mngr = ckpt.checkpoint_manager(workdir, keep=5)  # removes the killed save's tmp folder
    try:
        step = mngr.latest_step()
        restored = ckpt.restore_checkpoint(mngr, target)
        leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
        return step, restored, leftovers
    finally:
        mngr.close()


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_during_save_keeps_the_previous_checkpoint(trial, tmp_path):
    # Trial 0 kills the moment the temporary folder of step 2 appears (inside the save, for
    # sure); the others at random times inside or around the save.
    delay = None if trial == 0 else random.Random(trial).uniform(0.0, 0.4)
    workdir = str(tmp_path)
    seen_tmp = _kill_during_save(workdir, delay)
    if trial == 0:
        assert seen_tmp, "the kill did not land inside the save"
    step, restored, leftovers = _restore(workdir)
    assert step in (1, 2)  # step 2 only if its save completed (renamed) before the kill
    want = _expected(step)
    assert int(restored.step) == step
    np.testing.assert_array_equal(np.asarray(restored.w), want["w"])
    np.testing.assert_array_equal(np.asarray(restored.v), want["v"])
    assert not leftovers, leftovers
    if trial == 0:
        assert step == 1


def _is_pickle(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def test_checkpoints_hold_no_pickles_and_restore_never_unpickles(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    trainer.train_and_evaluate(tiny_config(**{"train.epochs": (0, 1, 1, 1, 2)}), workdir,
                                 progress=False, evaluate_at_end=False)
    files = [os.path.join(root, f) for root, _, names in os.walk(workdir) for f in names]
    assert len(files) > 5
    assert not [f for f in files if _is_pickle(f)]

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", lambda *a, **k: refuse())
    _, _, _, state = ckpt.load_run(workdir)
    assert int(state.step) == 20


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN appears in the parameters at step 25 (checkpoints every 20 steps): training stops
    with a message naming the step and the value, no later checkpoint is written, and the step-20
    checkpoint restores to finite parameters."""
    bad_step = 25
    make = train_lib.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def wrapped(state, *rest):
            if int(state.step) == bad_step:
                state = state.replace(params=jax.tree.map(lambda a: a * np.nan, state.params))
            return step_fn(state, *rest)

        return wrapped

    monkeypatch.setattr(train_lib, "make_train_step", poisoned)
    workdir = str(tmp_path)
    with pytest.raises(config_lib.TrainingError) as info:
        trainer.train_and_evaluate(tiny_config(), workdir, progress=False)
    message = str(info.value)
    assert f"at step {bad_step};" in message and "nan" in message, message
    assert "step 20" in message  # the checkpoint that stays
    monkeypatch.undo()
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == 20
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    _, _, _, state = ckpt.load_run(workdir)
    assert int(state.step) == 20
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_non_finite_loss_through_the_command_line_is_one_line(tmp_path):
    """The same stop through train.py: one line on stderr, non-zero exit, no traceback. The NaN
    comes from a learning rate of 1e30 (Adam's first step moves every weight by ~1e30)."""
    args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}",
            "--config.model.depth=3", "--config.model.width=32",
            "--config.data.train_split=train[:640]", "--config.train.batch_size=64",
            "--config.train.epochs=(0,1,1,1,2)", "--config.train.lr=1e30", "--progress=false"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: non-finite"), proc.stderr[-2000:]
    assert "at step" in lines[0] and "Traceback" not in proc.stderr


def test_damaged_latest_checkpoint_is_moved_aside_and_training_resumes(tmp_path, caplog):
    """A data file of the latest checkpoint truncated: training moves that step aside (kept, not
    deleted), says so in one line naming the step it resumes from, and ends with the parameters
    of a run resumed from that step with the damaged one simply absent."""
    import shutil

    cfg = tiny_config(**{"train.epochs": (0, 1, 1, 2, 3), "train.checkpoint_every_epochs": 1})
    base = str(tmp_path / "base")
    trainer.train_and_evaluate(cfg, base, progress=False, evaluate_at_end=False, max_steps=20)
    assert sorted(int(s) for s in os.listdir(os.path.join(base, "checkpoints"))) == [10, 20]
    damaged, reference = str(tmp_path / "damaged"), str(tmp_path / "reference")
    shutil.copytree(base, damaged)
    shutil.copytree(base, reference)
    data = os.path.join(damaged, "checkpoints", "20", "default", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        path = os.path.join(data, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    shutil.rmtree(os.path.join(reference, "checkpoints", "20"))
    with caplog.at_level(logging.WARNING, logger="linf_jax"):
        got = trainer.train_and_evaluate(cfg, damaged, progress=False, evaluate_at_end=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "checkpoint step 20 cannot be restored" in warnings[0]
    assert "resuming from step 10" in warnings[0] and "damaged_checkpoints" in warnings[0]
    moved = os.listdir(os.path.join(damaged, "damaged_checkpoints"))
    assert len(moved) == 1 and moved[0].startswith("20-")
    want = trainer.train_and_evaluate(cfg, reference, progress=False, evaluate_at_end=False)
    assert int(got.state.step) == int(want.state.step) == 30
    for a, b in zip(jax.tree.leaves(got.state), jax.tree.leaves(want.state), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # certification of the run now finds its latest checkpoint intact
    ckpt.load_run(damaged)
