"""The package as a user installs it: a wheel in a fresh virtual environment outside the
repository gives the console commands, the presets by name, and a run that trains and
certifies."""

import json
import os
import subprocess

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def installed(installed_wheel):
    bin_dir, work, _ = installed_wheel
    return bin_dir, work


def _run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_wheel_installs_commands_that_train_and_certify_a_preset(installed):
    bin_dir, work = installed
    where = _run([bin_dir / "python", "-c", "import linf_jax; print(linf_jax.__file__)"], work)
    assert where.returncode == 0 and str(REPO) not in where.stdout, where  # not the checkout
    train = _run([bin_dir / "linf-train", "--config", "default", "--workdir", work / "r",
                  "--config.model.width=16", "--config.train.epochs=(0,1,1,2,2)",
                  "--config.eval.pgd_steps=0", "--progress=false"], work)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "certified" in train.stdout
    out = work / "r.json"
    cert = _run([bin_dir / "linf-certify", "--workdir", work / "r", "--eps", "0.1",
                 "--output", out, "--pgd_steps=0", "--progress=false"], work)
    assert cert.returncode == 0, cert.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["num_examples"] == 360 and result["results"][0]["eps"] == 0.1
    exported = _run([bin_dir / "linf-certify", "--workdir", work / "r", "--export",
                     work / "r.jax"], work)
    assert exported.returncode == 0 and "exported" in exported.stdout, exported.stderr[-2000:]
    info = json.loads((work / "r.jax.json").read_text())
    assert info["kernels"]["requested"] == "xla" and info["platforms"] == ["cpu", "cuda", "tpu"]
    import jax
    import numpy as np

    model = jax.export.deserialize(bytearray((work / "r.jax").read_bytes()))
    logits, radii = model.call(np.full((3, 8, 8, 1), 0.5, np.float32))
    assert logits.shape == (3, 10) and radii.shape == (3,)
    plot = _run([bin_dir / "linf-plot", "curve", work / "c.png", out], work)
    assert plot.returncode == 0 and (work / "c.png").read_bytes()[:4] == b"\x89PNG", plot.stderr


def test_presets_by_name_and_module_entry_points(installed):
    bin_dir, work = installed
    shown = _run([bin_dir / "python", "-m", "linf_jax.cli.train", "--config", "mnist_03",
                  "--print_config"], work)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["data"]["source"] == "tfds:mnist"
    bad = _run([bin_dir / "linf-train", "--config", "mnist_3"], work)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "mnist_03" in bad.stderr
    certify = _run([bin_dir / "python", "-m", "linf_jax.cli.certify"], work)  # the command line
    assert certify.returncode == 2 and "--workdir is required" in certify.stderr, certify
    # without --config the preview reads the default preset of the installed package
    schedule = _run([bin_dir / "linf-schedule"], work)
    assert schedule.returncode == 0, schedule.stderr[-2000:]
    assert schedule.stdout.startswith("schedule v1, epochs (0, 40, 40, 160, 180)"), schedule.stdout
