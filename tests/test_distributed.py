"""Multi-host for real: two ``train.py --distributed`` processes (one CPU device each, Gloo
collectives) train one model with the batch sharded across the processes, and end with the
parameters of a single-process run; only process 0 writes the run's files."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config, xla_flags

from linf_jax import checkpoint as ckpt
from linf_jax import trainer

# 20 steps, 10 at p = 8 and 10 at p = ∞; Adam's eps = 1e-3 keeps rounding noise from being
# amplified to ~lr (see sharded_check.py). The same command trains the uninterrupted run that
# both tests compare with (the fixture below).
OVERRIDES = {"train.epochs": (0, 1, 0, 1, 2), "train.adam_eps": 1e-3, "train.log_every": 1}
STEPS = 20
FLAGS = ["--config.model.depth=3", "--config.model.width=32",
         "--config.data.train_split=train[:640]", "--config.train.batch_size=64",
         "--config.train.log_every=1", "--config.train.checkpoint_every_epochs=2",
         "--config.train.eps_train=0.15", "--config.train.epochs=(0,1,0,1,2)",
         "--config.train.adam_eps=1e-3", "--config.eval.pgd_steps=2", "--progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two_hosts(workdir, env_for_second=False):
    """The two ``train.py --distributed`` processes of one run on ``workdir``; with
    ``env_for_second`` the second takes coordinator, count and id from JAX's environment
    variables instead of the flags."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags()
    procs = []
    for pid in range(2):
        args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *FLAGS,
                "--distributed", f"--coordinator_address=localhost:{port}",
                "--num_processes=2", f"--process_id={pid}"]
        if pid == 1 and env_for_second:
            args = args[:-3]
            env = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID="1")
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def two_host_run(tmp_path_factory):
    """``(workdir, outputs)`` of one uninterrupted two-process run of ``FLAGS``."""
    workdir = str(tmp_path_factory.mktemp("two_hosts") / "dist")
    procs = _start_two_hosts(workdir, env_for_second=True)
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return workdir, outs


def test_two_processes_train_like_one(two_host_run, tmp_path):
    workdir, outs = two_host_run
    for out, _ in outs:
        assert "clean accuracy" in out
    files = sorted(os.listdir(workdir))
    events = [f for f in files if f.startswith("events.out.tfevents.")]
    assert len(events) == 1  # TensorBoard: process 0 writes the run's files
    assert [f for f in files if f not in events] == [
        ".lock", "checkpoints", "config.json", "meta.json", "metrics.jsonl",
        "results.json"]  # .lock: process 0's one-writer lock (released)

    _, _, _, state = ckpt.load_run(workdir)
    one = trainer.train_and_evaluate(tiny_config(**OVERRIDES), str(tmp_path / "one"),
                                       progress=False, evaluate_at_end=False)
    assert int(state.step) == int(one.state.step) == STEPS
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one.state.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_distributed_flags_need_distributed(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}/x",
         "--process_id=3", "--num_processes=2", "--distributed"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --process_id=3 is not allowed: 0..1", proc.stderr
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}/x",
         "--num_processes=2"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "only allowed with --distributed" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/x")


def test_sigterm_on_two_hosts_stops_both_at_one_step_and_resume_is_bit_identical(
        two_host_run, tmp_path):
    """SIGTERM reaches two processes at different moments: JAX's preemption service makes both
    agree on one step, both save it and exit 0; the same command again finishes the run, whose
    state is bit for bit that of the uninterrupted two-process run (the fixture's)."""
    import signal
    import time

    workdir = str(tmp_path / "pre")
    procs = _start_two_hosts(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    # After the third logged step: the signal lands at p = 8, well before the end (the switch
    # to the p = ∞ step at step 10 alone takes longer than a few steps).
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGTERM)  # the two hosts at different moments
    time.sleep(0.3)
    if procs[0].poll() is None:
        procs[0].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    stopped = [int(out.strip().splitlines()[-1].split()[3].rstrip(";")) for out, _ in outs
               if out.strip().splitlines()[-1].startswith("interrupted at step")]
    assert len(stopped) >= 1 and len(set(stopped)) == 1, [o[-300:] for o, _ in outs]
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    assert steps[-1] == stopped[0] < STEPS
    print(f"\nstopped at step {stopped[0]} of {STEPS}")
    for p in _start_two_hosts(workdir):
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    _, _, _, a = ckpt.load_run(workdir)
    _, _, _, b = ckpt.load_run(two_host_run[0])
    assert int(a.step) == int(b.step) == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
