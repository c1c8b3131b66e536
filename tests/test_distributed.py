"""Multi-host for real: two ``train.py --distributed`` processes (one CPU device each, Gloo
collectives) train one model with the batch sharded across the processes, and end with the
parameters of a single-process run; only process 0 writes the run's files."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import REPO, tiny_config, xla_flags

from linf_jax import checkpoint as ckpt
from linf_jax import trainer

# A few steps at p = 8 and at p = ∞; Adam's eps = 1e-3 keeps rounding noise from being amplified
# to ~lr (see sharded_check.py).
OVERRIDES = {"train.epochs": (0, 1, 0, 1, 2), "train.adam_eps": 1e-3}
FLAGS = ["--config.model.depth=3", "--config.model.width=32",
         "--config.data.train_split=train[:640]", "--config.train.batch_size=64",
         "--config.train.log_every=5", "--config.train.checkpoint_every_epochs=2",
         "--config.train.eps_train=0.15", "--config.train.epochs=(0,1,0,1,2)",
         "--config.train.adam_eps=1e-3", "--config.eval.pgd_steps=2", "--progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    workdir = str(tmp_path / "dist")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags()
    procs = []
    for pid in range(2):
        args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *FLAGS,
                "--distributed", f"--coordinator_address=localhost:{port}",
                "--num_processes=2", f"--process_id={pid}"]
        if pid == 1:  # the second process takes the rest from the environment
            args = args[:-3]
            env = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID="1")
            args.append("--distributed")
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
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
    assert int(state.step) == int(one.state.step) == 20
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


def test_sigterm_on_two_hosts_stops_both_at_one_step_and_resume_is_bit_identical(tmp_path):
    """SIGTERM reaches two processes at different moments: JAX's preemption service makes both
    agree on one step, both save it and exit 0; the same command again finishes the run, whose
    state is bit for bit that of an uninterrupted two-process run."""
    import signal
    import time

    # The evaluation after training is not under test here (the test above runs it): no PGD.
    longer = ["--config.train.log_every=1"]
    swap = {"--config.train.epochs=": "--config.train.epochs=(0,2,0,4,7)",
            "--config.eval.pgd_steps=": "--config.eval.pgd_steps=0"}
    flags = [next((v for k, v in swap.items() if f.startswith(k)), f) for f in FLAGS]
    workdir, reference = str(tmp_path / "pre"), str(tmp_path / "ref")

    def run(workdir):
        procs = []
        port = _free_port()
        env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = xla_flags()
        for pid in range(2):
            args = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
                    *flags, *longer, "--distributed", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={pid}"]
            procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        return procs

    procs = run(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 15):
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.01)
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
    assert steps[-1] == stopped[0] < 70
    for procs_again in (run(workdir), run(reference)):
        for p in procs_again:
            out, err = p.communicate(timeout=400)
            assert p.returncode == 0, err[-3000:]
    _, _, _, a = ckpt.load_run(workdir)
    _, _, _, b = ckpt.load_run(reference)
    assert int(a.step) == int(b.step) == 70
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
