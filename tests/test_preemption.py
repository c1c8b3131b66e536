"""Preemption through the real command line: SIGTERM / SIGINT at a random step of a running
``train.py`` saves a checkpoint and exits 0; rerunning the same command finishes the run, and the
final state, metrics and results are bit-identical to an uninterrupted run with the same seed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO

from linf_jax import checkpoint as ckpt

# 640 examples / batch 64 = 10 steps per epoch, 40 epochs: p = 8 for steps 0-79, the p ramp
# (traced p) for 80-239, p = ∞ from 240; the signal lands in the first two phases, and the
# resumed run crosses the phase boundaries after it.
TOTAL_STEPS = 400
ARGS = ["--config.model.depth=3", "--config.model.width=32",
        "--config.data.train_split=train[:640]", "--config.train.batch_size=64",
        "--config.train.epochs=(0,8,8,24,40)", "--config.train.log_every=1",
        "--config.eval.pgd_steps=2", "--config.eval.eps=(0.05,)", "--progress=false"]
SEED = int(os.environ.get("LINF_PREEMPT_SEED", "6"))


def _cmd(workdir):
    return [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *ARGS]


def _run(workdir, timeout=300):
    return subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def _last_logged_step(path) -> int:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:  # a line being written
            continue
    return -1


def _metrics(workdir):
    """metrics.jsonl without the wall-clock field."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return {k: v for k, v in json.load(f).items() if k != "seconds"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started in the background (it shares the CPU with the test)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)

    def finished():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return workdir

    return finished


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resume_is_bit_identical(signum, reference, tmp_path):
    workdir = str(tmp_path / "run")
    target = random.Random(SEED * 100 + int(signum)).randint(10, 230)
    proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while _last_logged_step(metrics) < target and proc.poll() is None:
        assert time.time() < deadline, "the run did not reach the target step"
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    line = out.strip().splitlines()[-1]
    assert line.startswith("interrupted at step ") and "Rerun the same command" in line, out
    stopped = int(line.split()[3].rstrip(";"))
    print(f"\n{signal.Signals(signum).name} after logged step {target}: stopped at step "
          f"{stopped} of {TOTAL_STEPS}")
    assert target < stopped < TOTAL_STEPS
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    assert steps[-1] == stopped  # the checkpoint of the signal, complete (renamed from tmp)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    assert [m["step"] for m in _metrics(workdir)] == list(range(stopped))

    done = _run(workdir)  # the same command again: resumes and finishes
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clean accuracy" in done.stdout

    ref = reference()
    _, _, _, state = ckpt.load_run(workdir)
    _, _, _, ref_state = ckpt.load_run(ref)
    assert int(state.step) == int(ref_state.step) == TOTAL_STEPS
    leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
    assert len(leaves) == len(ref_leaves) > 10
    for a, b in zip(leaves, ref_leaves, strict=True):  # params, EMA, Adam moments, BN stats
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.array_equal(np.asarray(a), np.asarray(b)), "resumed state differs"
    assert _metrics(workdir) == _metrics(ref)  # every step logged once, the same numbers
    assert _results(workdir) == _results(ref)


def test_one_writer_per_workdir_and_no_stale_lock(tmp_path):
    """A second train.py on a workdir that a running one holds exits non-zero with one line
    naming the holder; after ``kill -9`` of the first (no clean-up at all) a new run on the same
    workdir starts (resumes) and trains."""
    workdir = str(tmp_path / "run")
    metrics = os.path.join(workdir, "metrics.jsonl")
    long_run = [a if not a.startswith("--config.train.epochs=") else
                "--config.train.epochs=(0,8,8,24,400)" for a in _cmd(workdir)]  # 4,000 steps

    def start():
        return subprocess.Popen(long_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)

    def wait_for_step(proc, step):
        deadline = time.time() + 240
        while _last_logged_step(metrics) < step:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)

    first = start()
    try:
        wait_for_step(first, 3)
        second = subprocess.run(long_run, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.kill()
        first.communicate()
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode != 0 and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith("error: workdir=") and f"pid {first.pid}" in lines[0], lines[0]
    assert "one training process per workdir" in lines[0]
    resumed_from = _last_logged_step(metrics)
    third = start()  # the lock died with the first process
    try:
        wait_for_step(third, resumed_from + 3)
    finally:
        third.send_signal(signal.SIGTERM)
        out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err[-3000:]
    assert "interrupted at step" in out
