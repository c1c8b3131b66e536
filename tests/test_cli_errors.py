"""Bad input through the REAL command lines (issue 6, "Nothing lost, nothing unsound").

Every case runs ``python train.py ...`` or ``python certify.py ...`` as a subprocess and demands:
ONE line on stderr (``error: ...``) naming the field, the value and what is allowed, a non-zero
exit code, no traceback, and every existing file unchanged (all files under the test folder are
hashed before and after). The Python API cases call :mod:`linf_jax` in-process and demand the
library's one-line error types. ``CASES`` and ``API_CASES`` are the tables of tried inputs.
"""

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, tiny_config

from linf_jax import config as config_lib
from linf_jax import experiment, trainer

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# The tiny run's architecture on the command line (so that a resume check does not fire first).
TINY = ["--config.model.depth=3", "--config.model.width=32",
        "--config.data.train_split=train[:640]", "--config.train.batch_size=64"]

# (id, program, arguments, substrings the one stderr line must contain). Placeholders:
# {run} a finished tiny run, {narrow} a run of another width, {truncated}/{deleted} copies of
# {run} with a damaged latest checkpoint, {file} a regular file, {new} a fresh folder name,
# {npz_*} data files (99 / negative labels, NaN / inf / 1.5 / int32 pixels, 30 labels for 40
# images, rank-2 images), {mnist} a folder of MNIST-shaped (28x28) IDX files made by the fixture,
# {readonly} a chmod-0o500 folder.
CASES = [
    # --- ε, p and the model (train.py; the existing run must stay untouched)
    ("train-eps-negative", "train.py", ["--workdir={run}", "--config.train.eps_train=-1"],
     ["config.train.eps_train", "-1", "[0, 1]"]),
    ("train-eps-not-a-number", "train.py", ["--workdir={run}", "--config.train.eps_train=abc"],
     ["config.train.eps_train", "abc"]),
    ("train-p-below-1", "train.py", ["--workdir={run}", "--config.train.p_start=0.5"],
     ["config.train.p_start", "0.5", ">= 1"]),
    ("train-width-zero", "train.py", ["--workdir={run}", "--config.model.width=0"],
     ["config.model.width", "0", "positive integer"]),
    ("train-depth-negative", "train.py", ["--workdir={run}", "--config.model.depth=-2"],
     ["config.model.depth", "-2", "positive integer"]),
    ("train-unknown-kernels", "train.py", ["--workdir={run}", "--config.kernels=cuda"],
     ["config.kernels", "cuda", "native, xla"]),
    ("train-unknown-model", "train.py", ["--workdir={run}", "--config.model.name=resnet50"],
     ["config.model.name", "resnet50", "linf_dist_net"]),
    # --- schedules and losses (docs/RECIPES.md)
    ("train-unknown-schedule", "train.py", ["--workdir={run}", "--config.train.schedule=v3"],
     ["config.train.schedule", "v3", "v1", "v2"]),
    ("train-v2-lambda-undefined", "train.py", ["--workdir={run}", "--config.train.loss=v2",
                                               "--config.train.lam_start=0.05"],
     ["config.train.lam_end", "0.0", "undefined"]),
    ("train-v2-eps-zero-throughout", "train.py", ["--workdir={run}", "--config.train.loss=v2",
                                                  "--config.train.eps_train=0"],
     ["config.train.eps_train", "0", "0-1 error"]),
    ("train-resume-other-width", "train.py", ["--workdir={run}", *TINY[:1],
                                              "--config.model.width=64"],
     ["config.model.width", "64", "32", "--workdir"]),
    # --- data (train.py into a fresh folder, which must not be left behind)
    ("train-unknown-source", "train.py", ["--workdir={new}", "--config.data.source=nosuch:x"],
     ["data.source", "nosuch:x", "allowed"]),
    ("train-negative-labels", "train.py", ["--workdir={new}", "--config.data.source=npz:{npz_neg}",
                                           "--config.data.train_split=train"],
     ["data.labels", "-3", "allowed"]),
    ("train-pixels-above-1", "train.py", ["--workdir={new}", "--config.data.source=npz:{npz_big}"],
     ["data.images", "1.5", "allowed: [0, 1]"]),
    ("train-pixels-int32", "train.py", ["--workdir={new}", "--config.data.source=npz:{npz_int}"],
     ["data.images", "int32", "allowed: uint8 0..255"]),
    ("train-labels-images-lengths", "train.py", ["--workdir={new}",
                                                 "--config.data.source=npz:{npz_len}"],
     ["data.labels", "30 labels for 40 images", "one label per image"]),
    ("train-image-rank", "train.py", ["--workdir={new}", "--config.data.source=npz:{npz_rank}"],
     ["data.images", "(40, 64)", "[N, H, W]"]),
    ("train-empty-split", "train.py", ["--workdir={new}", "--config.data.train_split=train[:0]"],
     ["data.split", "train[:0]", "selects no examples"]),
    ("train-inf-pixels", "train.py", ["--workdir={new}", "--config.data.source=npz:{npz_inf}"],
     ["data.images", "inf", "allowed: finite"]),
    # --- folders, files and flags
    ("train-workdir-under-a-file", "train.py", ["--workdir={file}/run"],
     ["--workdir", "{file}", "is a file", "writable folder"]),
    ("train-config-file-missing", "train.py", ["--workdir={run}", "--config={tmp}/nope.py"],
     ["--config", "nope.py", "no such file", "allowed"]),
    ("train-unknown-flag", "train.py", ["--workdir={run}", "--epsilon=0.1"],
     ["epsilon"]),
    ("train-override-bad-type", "train.py", ["--workdir={run}", "--config.model.width=wide"],
     ["config.model.width", "wide"]),
    ("train-override-unknown-field", "train.py", ["--workdir={run}", "--config.model.widht=64"],
     ["config.model.widht", "no field"]),
    # --- certify.py (the runs must stay untouched; no certify.json may appear)
    ("certify-eps-negative", "certify.py", ["--workdir={run}", "--eps=-0.1"],
     ["--eps", "-0.1", "[0, 1]"]),
    ("certify-eps-not-a-number", "certify.py", ["--workdir={run}", "--eps=abc"],
     ["--eps", "abc", "not a number"]),
    ("certify-eps-above-1-pixel", "certify.py", ["--workdir={run}", "--eps=0.1,1.5"],
     ["--eps", "1.5", "[0, 1]"]),
    ("certify-unknown-source", "certify.py", ["--workdir={run}", "--data=nosuch"],
     ["data.source", "nosuch", "allowed"]),
    ("certify-shape-mismatch", "certify.py", ["--workdir={run}", "--data=idx:{mnist}"],
     ["--data", "(28, 28, 1)", "(8, 8, 1)"]),
    ("certify-label-out-of-range", "certify.py", ["--workdir={run}", "--data=npz:{npz_99}"],
     ["--data", "label 99", "0..9"]),
    ("certify-empty-split", "certify.py", ["--workdir={run}", "--split=test[:0]"],
     ["data.split", "test[:0]", "selects no examples"]),
    ("certify-nan-pixels", "certify.py", ["--workdir={run}", "--data=npz:{npz_nan}"],
     ["data.images", "NaN", "allowed: finite"]),
    ("certify-truncated-checkpoint", "certify.py", ["--workdir={truncated}"],
     ["{truncated}", "cannot be restored", "newest step that restores is 10", "--step=10"]),
    ("certify-step-not-in-run", "certify.py", ["--workdir={run}", "--step=15"],
     ["--step=15", "[10, 20]"]),
    ("certify-all-checkpoints-two-runs", "certify.py",
     ["--workdir={run}", "--workdir={narrow}", "--all_checkpoints"],
     ["--all_checkpoints", "several --workdir", "one run"]),
    ("train-keep-every-negative", "train.py", ["--workdir={run}",
                                               "--config.train.keep_every_epochs=-1"],
     ["train.keep_every_epochs", "-1", ">= 0"]),
    ("certify-deleted-checkpoint-file", "certify.py", ["--workdir={deleted}"],
     ["{deleted}", "cannot be restored", "allowed"]),
    ("certify-no-such-run", "certify.py", ["--workdir={tmp}/no_such_run"],
     ["workdir", "no_such_run", "not a linf-jax run"]),
    ("certify-ensemble-of-two-widths", "certify.py", ["--workdir={run}", "--workdir={narrow}"],
     ["{narrow}", "config.model.width=16", "32", "one architecture"]),
    ("certify-output-under-a-file", "certify.py", ["--workdir={run}", "--output={file}/r.json"],
     ["--output", "{file}", "allowed"]),
]
if not IS_ROOT:  # root writes through chmod 0o500; the path-under-a-file cases cover root
    CASES += [
        ("train-workdir-read-only", "train.py", ["--workdir={readonly}/run"],
         ["--workdir", "not writable"]),
        ("certify-workdir-read-only", "certify.py", ["--workdir={readonly}"],
         ["--output", "not writable"]),
    ]


def _snapshot(root):
    """``{relative path: sha256}`` of every file under ``root`` (and the folder list)."""
    out = {}
    for base, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), root) + "/"] = "dir"
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _save_npz(path, x, y):
    np.savez(path, x=x.astype(np.float32), y=np.asarray(y, np.int64))


def _write_mnist_like_idx(directory, n=20, seed=0):
    """A ``t10k`` pair of IDX files with ``n`` random 28x28 images, in MNIST's format: the
    shape-mismatch case needs MNIST-shaped data, not MNIST itself, and a clone of the
    repository has no copy of MNIST."""
    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for name, magic, arr in (("t10k-images-idx3-ubyte", 2051, images),
                             ("t10k-labels-idx1-ubyte", 2049, labels)):
        header = np.array([magic, *arr.shape], dtype=">i4").tobytes()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(header + arr.tobytes())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Runs and files for the cases; the tiny run is trained once, in-process."""
    tmp = str(tmp_path_factory.mktemp("cli_errors"))
    run = os.path.join(tmp, "run")
    cfg = tiny_config(**{"train.epochs": (0, 1, 1, 1, 2), "train.checkpoint_every_epochs": 1})
    trainer.train_and_evaluate(cfg, run, progress=False, evaluate_at_end=False)
    narrow = os.path.join(tmp, "narrow")
    trainer.train_and_evaluate(tiny_config(**{"model.width": 16}), narrow, progress=False,
                                 max_steps=1)
    steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    assert steps == [10, 20]
    truncated, deleted = os.path.join(tmp, "truncated"), os.path.join(tmp, "deleted")
    shutil.copytree(run, truncated)
    shutil.copytree(run, deleted)
    step_dir = os.path.join("checkpoints", "20", "default")
    data = os.path.join(truncated, step_dir, "ocdbt.process_0", "d")
    # Every data file of the latest step is cut to its first 16 bytes: no array restores. (A
    # file cut in half can leave the EMA weights whole, and loading for inference reads only
    # those: that step would rightly load.)
    for name in os.listdir(data):
        with open(os.path.join(data, name), "r+b") as f:
            f.truncate(16)
    os.remove(os.path.join(deleted, step_dir, "manifest.ocdbt"))
    for sub in os.listdir(os.path.join(deleted, step_dir)):
        if sub.startswith("ocdbt.process"):
            shutil.rmtree(os.path.join(deleted, step_dir, sub))

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(40, 8, 8, 1))
    y = np.arange(40) % 10
    paths = {k: os.path.join(tmp, f"{k}.npz") for k in ("npz_99", "npz_neg", "npz_nan",
                                                        "npz_inf")}
    _save_npz(paths["npz_99"], x, np.where(np.arange(40) == 7, 99, y))
    _save_npz(paths["npz_neg"], x, np.where(np.arange(40) == 3, -3, y))
    x_nan = x.copy()
    x_nan[5, 2, 3, 0] = np.nan
    _save_npz(paths["npz_nan"], x_nan, y)
    for name, arrays in {"npz_big": dict(x=np.where(np.arange(40)[:, None, None, None] == 2,
                                                    1.5, x).astype(np.float32), y=y),
                         "npz_int": dict(x=(x * 300).astype(np.int32), y=y),
                         "npz_len": dict(x=x.astype(np.float32), y=y[:30]),
                         "npz_rank": dict(x=x.reshape(40, 64).astype(np.float32), y=y)}.items():
        paths[name] = os.path.join(tmp, f"{name}.npz")
        np.savez(paths[name], **arrays)
    x_inf = x.copy()
    x_inf[1, 0, 0, 0] = np.inf
    _save_npz(paths["npz_inf"], x_inf, y)
    file = os.path.join(tmp, "a_file")
    with open(file, "w") as f:
        f.write("not a folder\n")
    mnist = os.path.join(tmp, "mnist_idx")
    _write_mnist_like_idx(mnist)
    readonly = os.path.join(tmp, "readonly")
    shutil.copytree(run, readonly)
    os.chmod(readonly, 0o500)
    yield dict(tmp=tmp, run=run, narrow=narrow, truncated=truncated, deleted=deleted, file=file,
               mnist=mnist, readonly=readonly, **paths)
    os.chmod(readonly, 0o700)


def _run_case(case, env, index):
    name, program, args, _ = case
    fill = dict(env, new=os.path.join(env["tmp"], f"new_{index}"))
    cmd = [sys.executable, os.path.join(REPO, program), *(a.format(**fill) for a in args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    return proc, fill, time.perf_counter() - t0


@pytest.fixture(scope="module")
def results(env):
    """Runs every case (three at a time) between two snapshots of all files."""
    before = _snapshot(env["tmp"])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {case[0]: pool.submit(_run_case, case, env, i) for i, case in enumerate(CASES)}
        out = {name: f.result() for name, f in futures.items()}
    after = _snapshot(env["tmp"])
    return out, before, after


def test_case_table_is_reported():
    programs = [c[1] for c in CASES]
    print(f"\n{len(CASES)} command-line cases ({programs.count('train.py')} train.py, "
          f"{programs.count('certify.py')} certify.py) + {len(API_CASES)} Python API cases = "
          f"{len(CASES) + len(API_CASES)} bad inputs")
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len(CASES) + len(API_CASES) >= 35


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(case, results, env):
    name, _, _, expected = case
    proc, fill, _ = results[0][name]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, f"{name}: exit 0\n{proc.stdout[-1000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[:3000]
    assert len(lines) == 1, f"{name}: {len(lines)} stderr lines:\n{proc.stderr[:3000]}"
    line = lines[0]
    assert line.startswith("error: "), line
    for part in expected:
        assert part.format(**fill) in line, f"{name}: {part.format(**fill)!r} not in {line!r}"
    assert not os.path.exists(fill["new"]), f"{name}: left a folder behind"


def test_no_existing_file_changed(results, env):
    out, before, after = results
    seconds = sorted(((round(v[2], 1), k) for k, v in out.items()), reverse=True)
    print(f"\nsubprocess seconds: total {sum(t for t, _ in seconds):.0f}, slowest {seconds[:5]}")
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files changed by failing commands: {changed[:20]}"
    assert len(before) > 50  # the runs, their checkpoints and the data files were hashed


def test_good_command_still_works(env, tmp_path):
    """The same run certifies when the input is right (the failures above are the input's)."""
    out = tmp_path / "ok.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "certify.py"), f"--workdir={env['run']}",
         "--eps=0.02", f"--output={out}", "--pgd_steps=2", "--limit=50", "--progress=false"],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr[-2000:]  # no INFO logging from Orbax or JAX
    assert out.exists()


def test_config_mistakes_are_reported_before_jax_is_imported(tmp_path):
    """A bad config field ends train.py before JAX or Flax is imported, so that it costs none of
    those imports' time (BENCHMARKS.md), and ``import linf_jax`` imports neither until a name of
    the package is used."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', '--workdir={tmp_path}/run', '--config.train.eps_train=-1']\n"
        "try:\n"
        f"    runpy.run_path({os.path.join(REPO, 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'jax' in sys.modules, 'flax' in sys.modules)\n"
        "import linf_jax\n"
        "print('package', 'jax' in sys.modules)\n"
        "from linf_jax import dist, load_classifier\n"
        "print('names', callable(dist), callable(load_classifier), 'flax' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.stdout.splitlines() == ["exit 2 False False", "package False",
                                        "names True True True"], proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("error: config.train.eps_train=-1"), proc.stderr
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# The Python API: one-line errors of the library's own types


def _api_cases():
    from linf_jax import data as data_lib
    from linf_jax.classifier import InputError, load_classifier
    from linf_jax.ensemble import EnsembleError

    def x_ok(n=4):
        return np.full((n, 8, 8, 1), 0.5, np.float32)

    def with_nan():
        x = x_ok()
        x[1, 2, 3, 0] = np.nan
        return x

    def with_inf():
        x = x_ok()
        x[0, 0, 0, 0] = -np.inf
        return x

    y_ok = np.zeros(4, np.int64)
    return [
        ("api-call-wrong-shape", lambda e: e["clf"](np.zeros((2, 28, 28, 1), np.float32)),
         InputError, ["x.shape", "(2, 28, 28, 1)", "(N, 8, 8, 1)"]),
        ("api-call-nan", lambda e: e["clf"](with_nan()), InputError, ["x", "NaN", "finite"]),
        ("api-call-inf", lambda e: e["clf"](with_inf()), InputError, ["x", "inf", "finite"]),
        ("api-call-out-of-box", lambda e: e["clf"](x_ok() * 3), InputError, ["x", "1.5", "[0, 1]"]),
        ("api-certify-label-99", lambda e: e["clf"].certify(x_ok(), y_ok + 99, 0.1), InputError,
         ["y", "99", "0..9"]),
        ("api-certify-eps-negative", lambda e: e["clf"].certify(x_ok(), y_ok, -0.1), InputError,
         ["eps", "-0.1", "[0, 1]"]),
        ("api-certify-eps-nan", lambda e: e["clf"].certify(x_ok(), y_ok, float("nan")),
         InputError, ["eps", "nan", "[0, 1]"]),
        ("api-certify-eps-above-1", lambda e: e["clf"].certify(x_ok(), y_ok, 1.5), InputError,
         ["eps", "1.5", "[0, 1]"]),
        ("api-ensemble-two-widths", lambda e: load_classifier([e["run"], e["narrow"]]),
         EnsembleError, ["width=16", "one architecture"]),
        ("api-load-truncated", lambda e: load_classifier(e["truncated"]),
         config_lib.CheckpointError, ["cannot be restored"]),
        ("api-load-missing", lambda e: load_classifier(os.path.join(e["tmp"], "nothing")),
         config_lib.CheckpointError, ["not a linf-jax run"]),
        ("api-config-p-below-1",
         lambda e: config_lib.validate_config(tiny_config(**{"train.p_start": 0.5})),
         config_lib.ConfigError, ["train.p_start", "0.5"]),
        ("api-config-eps-train-above-1",
         lambda e: config_lib.validate_config(tiny_config(**{"train.eps_train": 1.5})),
         config_lib.ConfigError, ["train.eps_train", "1.5", "[0, 1]"]),
        ("api-config-depth-negative",
         lambda e: experiment.build_model(tiny_config(**{"model.depth": -2}), 10),
         config_lib.ConfigError, ["model.depth", "-2", "positive integer"]),
        ("api-config-eval-eps-above-1",
         lambda e: config_lib.validate_config(tiny_config(**{"eval.eps": (0.1, 2.0)})),
         config_lib.ConfigError, ["eval.eps", "2.0", "[0, 1]"]),
        ("api-data-npz-label-range",
         lambda e: data_lib.load(f"npz:{e['npz_neg']}", "train"),
         data_lib.DataError, ["data.labels", "-3"]),
    ]


API_CASES = [c[0] for c in _api_cases()]


@pytest.fixture(scope="module")
def api_env(env):
    from linf_jax.classifier import load_classifier

    return dict(env, clf=load_classifier(env["run"]))


@pytest.mark.parametrize("index", range(len(API_CASES)), ids=API_CASES)
def test_python_api_bad_input(index, api_env):
    name, fn, err_type, expected = _api_cases()[index]
    before = _snapshot(api_env["tmp"])
    with pytest.raises(err_type) as info:
        fn(api_env)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, f"{name}: {part!r} not in {message!r}"
    assert _snapshot(api_env["tmp"]) == before
