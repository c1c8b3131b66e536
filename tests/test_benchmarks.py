"""The prepared GPU check runs: ``benchmarks/gpu_check.py --smoke`` on this machine (Pallas in
interpret mode, tiny shapes, reduced models) compares the Pallas kernels with the XLA code and
float64, times one tile, runs the epoch and ensemble stages as subprocesses, writes its JSON,
and passes; a stage that fails is a failed check."""

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))


def test_gpu_check_smoke_passes_and_writes_its_json(tmp_path):
    out = tmp_path / "r.json"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "correctness: 4 Pallas/XLA/float64 comparisons and 2 bounds checks, 0 failures" in lines
    assert any(line.startswith("best Pallas tiles at p = 8:") for line in lines)
    assert lines[-1] == "GPU CHECK: PASS"
    report = json.loads(out.read_text())
    assert report["pass"] is True and report["backend"] == "cpu" and report["smoke"] is True
    stages = report["stages"]
    assert list(stages) == ["auto", "correctness", "tiles", "epochs", "ensemble"]
    assert stages["auto"]["kernels"]["requested"] == "auto"
    assert all(st["ok"] and st["seconds"] >= 0 for st in stages.values())
    assert stages["correctness"]["failures"] == []
    assert set(stages["epochs"]["runs"]) == {"xla", "auto"}
    assert "epoch time (xla" in stages["epochs"]["runs"]["xla"]["output"]
    assert "ratios (loop / one program" in stages["ensemble"]["output"]


def test_gpu_check_fails_on_a_stage_that_fails_or_runs_over():
    """A subprocess stage over its time limit is a failed check (exit 1, FAIL), and an unknown
    stage is one error line."""
    proc = _run("--smoke", "--stages", "ensemble", "--stage-timeout", "0.5")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "over its 0.5 s limit" in proc.stdout and proc.stdout.splitlines()[-1] == \
        "GPU CHECK: FAIL"
    bad = _run("--smoke", "--stages", "tiles,gpu")
    assert bad.returncode == 2 and "--stages='tiles,gpu'" in bad.stderr


def test_loop_count_prints_the_table_and_the_targets_hold():
    """benchmarks/loop_count.py traces the CIFAR-10 6 × 5120 step and one wide layer from
    abstract shapes and prints their sequential loop iterations lowered for CUDA."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "loop_count.py"), "--kernels", "auto",
         "--platforms", "cuda"], capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| CIFAR")]
    assert len(rows) == 3
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("worst program loop iterations") and "auto cuda:" in last
    for part in last.split(": ", 1)[1].split("; "):
        value, target = part.split(": ")[1].split(" (target ")
        assert int(value.replace(",", "")) <= int(target.rstrip(")").replace(",", "")), part


def test_sort_bench_prints_the_table_and_the_ratios():
    """benchmarks/sort_bench.py on one tiny shape: every method agrees with the naive top_k
    version, and the table and the ratios line are printed."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "sort_bench.py"), "--shapes",
         "8x40x12", "--repeats", "1", "--no-torch"], capture_output=True, text=True,
        timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    agree = next(line for line in lines if line.startswith("agreement with naive at 8x40x12"))
    for part in agree.split(": ", 1)[1].split(", "):
        assert float(part.split()[1]) < 1e-5, agree
    assert len([line for line in lines if line.startswith("| (8, 40, 12) |")]) == 4
    assert lines[-1].startswith("RATIOS (ours faster by) 8x40x12 fwd: ")
    assert "vs ours-xla" in lines[-1] and "vs naive" in lines[-1]
