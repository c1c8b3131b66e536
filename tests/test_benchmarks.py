"""The prepared GPU check runs: ``benchmarks/gpu_check.py --smoke`` on this machine (Pallas in
interpret mode, tiny shapes) compares the Pallas kernels with the XLA code and float64, times
one tile, and passes."""

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_smoke_passes():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"),
                           "--smoke"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "correctness: 4 Pallas/XLA/float64 comparisons and 1 bounds checks, 0 failures" in lines
    assert any(line.startswith("best Pallas tiles at p = 8:") for line in lines)
    assert lines[-1] == "GPU CHECK: PASS"
