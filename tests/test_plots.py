"""Plots (issue 7): ``linf-plot curve|training|radii`` and the Python functions.

Inputs are synthetic but shaped like the real files: certify JSONs whose ``results`` agree with
their ``radii`` (as :func:`linf_jax.certify.evaluate_dataset` writes them) and a metrics.jsonl of
330 steps whose p, ε, lr and EMA decay come from the real :class:`linf_jax.schedules.Schedule`
(p = ∞ in the last phase, written as ``Infinity`` like train_lib does). Every PNG is opened and
must have the figure's pixel size, non-zero variance and the colours of the runs it shows.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from conftest import REPO

from linf_jax import certify as certify_lib
from linf_jax import plots
from linf_jax.cli import plot as plot_cli
from linf_jax.schedules import Schedule

EPS = (0.05, 0.1, 0.2)
RUNS = (("single_raw", 0.10), ("single_ema", 0.12), ("ensemble", 0.15))
# Figure sizes of linf_jax.plots at dpi 110: (height, width) in pixels.
CHART = (462, 704)
PANELS = (990, 704)
TAB = [(0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173)]  # C0, C1, C2


def fake_result(rng, scale: float, n: int = 360) -> dict:
    """A certify summary: 10% misclassified (radius 0), Lipschitz accuracy = P(radius > ε), the
    interval certificate a little above it, PGD above both."""
    radii = np.where(rng.random(n) < 0.9, rng.gamma(2.0, scale / 2, n), 0.0)
    rows = []
    for e in EPS:
        lip = float((radii > e).mean())
        cert = min(1.0, lip + 0.01)
        rows.append({"eps": e, "certified_accuracy": cert, "lipschitz_certified_accuracy": lip,
                     "pgd_accuracy": min(1.0, cert + 0.04)})
    return {"clean_accuracy": 0.9, "num_examples": n, "results": rows,
            "radii": [float(r) for r in radii], "weights": "ema", "members": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(0)
    paths = {}
    for name, scale in RUNS:
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(fake_result(rng, scale)))
    # A run folder with a metrics.jsonl as train_lib writes it (log_every=5 and the last step).
    run = root / "run"
    run.mkdir()
    sched = Schedule(epochs=(0, 5, 5, 25, 30), steps_per_epoch=11, lr=0.02, eps_train=0.15)
    steps = np.array([*range(0, sched.total_steps, 5), sched.total_steps - 1])
    p, eps = np.asarray(sched.p(steps)), np.asarray(sched.eps(steps))
    lr, ema = np.asarray(sched.lr_at(steps)), np.asarray(sched.ema_decay_at(steps))
    with open(run / "metrics.jsonl", "w") as f:
        for i, s in enumerate(steps):
            f.write(json.dumps({
                "step": int(s), "epoch": s / 11, "time": 0.05 * s, "loss": 2.0 / (1 + s / 40),
                "accuracy": 1 - 0.9 / (1 + s / 25), "grad_norm": 1.0 + rng.random(),
                "param_norm": 30.0 + s / 100, "p": float(p[i]), "eps": float(eps[i]),
                "lr": float(lr[i]), "ema_decay": float(ema[i])}) + "\n")
    paths["run"] = run
    assert "Infinity" in (run / "metrics.jsonl").read_text()  # the p = ∞ phase is in the file
    (root / "nokeys.json").write_text(json.dumps({"clean_accuracy": 0.9}))
    (root / "notjson.json").write_text("{results: [")
    paths["nokeys"], paths["notjson"] = root / "nokeys.json", root / "notjson.json"
    paths["root"] = root
    return paths


def has_colour(img, rgb, tol=0.03) -> bool:
    return bool((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).any())


def check_png(path, size, colours=()) -> np.ndarray:
    """The image has the figure's pixel size, is not blank and shows every colour in
    ``colours`` (the matplotlib cycle colours of the runs drawn)."""
    assert os.path.getsize(path) > 5000, path
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == size, (path, img.shape)
    assert img[..., :3].var() > 1e-3, f"{path} is blank"
    distinct = np.unique((img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(distinct) >= 8, f"{path}: only {len(distinct)} colours"
    for rgb in colours:
        assert has_colour(img, rgb), f"{path}: colour {rgb} not drawn"
    return img


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "linf_jax.cli.plot", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})


# ---------------------------------------------------------------------------------------------
# certified_curve


def test_certified_curve_non_increasing_and_exact(files):
    grid = np.linspace(0, 0.8, 801)
    for name, _ in RUNS:
        result = json.loads(files[name].read_text())
        curve = plots.certified_curve(result["radii"], grid)
        assert curve.shape == grid.shape
        assert np.all(np.diff(curve) <= 0), f"{name}: curve increases"
        assert curve[0] == pytest.approx(np.mean(np.asarray(result["radii"]) > 0))
        assert curve[-1] == 0.0
        # Agrees with the JSON's Lipschitz accuracy at every evaluated ε; a summary works too.
        at = plots.certified_curve(result, [row["eps"] for row in result["results"]])
        np.testing.assert_allclose(
            at, [row["lipschitz_certified_accuracy"] for row in result["results"]])
    assert plots.certified_curve([], [0.0, 0.1]).tolist() == [0.0, 0.0]


def test_certified_curve_matches_the_lipschitz_certificate():
    """curve(ε) = fraction with radius > ε is exactly the library's rule margin > 2ε + tol."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(500, 10)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 500), jnp.int32)
    radii = np.asarray(certify_lib.certified_radius(logits, labels))
    correct = np.asarray(logits.argmax(-1) == labels)
    eps = [0.0, 0.013, 0.05, 0.1, 0.31, 0.7, 1.5]
    expected = [float((np.asarray(certify_lib.lipschitz_certified(logits, labels, e))
                       & correct).mean()) for e in eps]
    np.testing.assert_allclose(plots.certified_curve(radii, eps), expected)
    assert np.all(np.diff(plots.certified_curve(radii, np.linspace(0, 3, 300))) <= 0)


# ---------------------------------------------------------------------------------------------
# The Python functions


def test_python_functions_write_pngs(files, tmp_path):
    runs = {name: json.loads(files[name].read_text()) for name, _ in RUNS}
    out = plots.plot_certified_accuracy(runs, str(tmp_path / "curve.png"))
    check_png(out, CHART, TAB)
    # One run, as certify.py --plot draws it.
    check_png(plots.plot_certified_accuracy({"model (ema)": runs["single_ema"]},
                                            str(tmp_path / "one.png")), CHART, TAB[:1])
    # Training curves from a run folder and from the records themselves.
    check_png(plots.plot_training_curves(str(files["run"]), str(tmp_path / "t1.png")), PANELS,
              TAB[:1])
    records = plots.read_metrics(str(files["run"] / "metrics.jsonl"))
    assert len(records) == 67 and records[-1]["step"] == 329 and records[-1]["p"] == float("inf")
    check_png(plots.plot_training_curves(records, str(tmp_path / "t2.png")), PANELS, TAB[:1])
    # Radii: summaries or plain lists.
    check_png(plots.plot_radius_histogram(runs, str(tmp_path / "r1.png")), CHART, TAB)
    check_png(plots.plot_radius_histogram({"a": runs["ensemble"]["radii"]},
                                          str(tmp_path / "r2.png"), bins=10), CHART, TAB[:1])


def test_python_functions_reject_bad_input(tmp_path):
    png = str(tmp_path / "x.png")
    bad = [
        (plots.plot_certified_accuracy, {"a": {"clean_accuracy": 1.0}}, "neither 'results'"),
        (plots.plot_certified_accuracy, {"a": {"results": [{"eps": 0.1}]}},
         "certified_accuracy"),
        (plots.plot_certified_accuracy,
         {"a": {"results": [{"eps": 0.1, "certified_accuracy": 1.5}]}}, "[0, 1]"),
        (plots.plot_certified_accuracy, {"a": {"radii": [0.1, -1.0]}}, "'radii'"),
        (plots.plot_radius_histogram, {"a": {"results": []}}, "no key 'radii'"),
        (plots.plot_training_curves, [], "no records"),
        (plots.plot_training_curves, [{"step": 1, "foo": 2}], "no record has any of"),
    ]
    for fn, arg, needle in bad:
        with pytest.raises(plots.PlotInputError, match=None) as info:
            fn(arg, png)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, msg
    assert not os.path.exists(png)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_subcommands(files, tmp_path):
    r = [files[name] for name, _ in RUNS]
    proc = run_cli("curve", tmp_path / "curve.png", *r, "--labels", "raw,EMA,ensemble",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and proc.stderr == ""
    check_png(tmp_path / "curve.png", CHART, TAB)

    proc = run_cli("training", tmp_path / "train.png", files["run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_png(tmp_path / "train.png", PANELS, TAB[:1])

    proc = run_cli("radii", tmp_path / "radii.png", r[0], r[2], "--bins", "30", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_png(tmp_path / "radii.png", CHART, TAB[:2])


def test_cli_bad_input_is_one_line(files, tmp_path):
    """Through a real subprocess: one ``error:`` line naming the argument and value, exit 2."""
    missing = tmp_path / "missing.json"
    for args, needles in [
        (("curve", tmp_path / "a.png", files["single_ema"], missing),
         ["RESULT.json", "missing.json", "no such file", "allowed"]),
        (("radii", tmp_path / "a.png", files["nokeys"]),
         ["RESULT.json", "nokeys.json", "no key 'radii'", "allowed"]),
    ]:
        proc = run_cli(*args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("case", [
    "no-subcommand", "unknown-subcommand", "curve-no-result", "not-json", "training-no-metrics",
    "training-bad-line", "labels-count", "labels-repeat", "bins-zero", "eps-max-2", "out-ext",
    "out-folder-missing", "results-not-a-list"])
def test_cli_bad_input_in_process(case, files, tmp_path, capsys):
    import logging
    root, png = files["root"], str(tmp_path / "o.png")
    ema, raw = str(files["single_ema"]), str(files["single_raw"])
    (tmp_path / "bad.jsonl").write_text('{"step": 0, "loss": 1}\n{"loss": 2}\n')
    (tmp_path / "rows.json").write_text('{"results": {"eps": 0.1}}')
    args, needles = {
        "no-subcommand": ([], ["required", "curve,training,radii"]),
        "unknown-subcommand": (["plot", png], ["invalid choice", "'plot'", "curve"]),
        "curve-no-result": (["curve", png], ["required", "RESULT.json"]),
        "not-json": (["curve", png, str(files["notjson"])], ["RESULT.json", "notjson.json",
                                                            "not JSON", "allowed"]),
        "training-no-metrics": (["training", png, str(root)],
                                ["WORKDIR_or_metrics.jsonl", str(root), "no metrics.jsonl"]),
        "training-bad-line": (["training", png, str(tmp_path / "bad.jsonl")],
                              ["bad.jsonl", "line 2", "'step'", "allowed"]),
        "labels-count": (["curve", png, ema, raw, "--labels", "a,b,c"],
                         ["--labels='a,b,c'", "3 label(s) for 2", "allowed"]),
        "labels-repeat": (["radii", png, ema, raw, "--labels", "a,a"], ["--labels", "repeat"]),
        "bins-zero": (["radii", png, ema, "--bins", "0"], ["--bins", "'0'", "1..1000"]),
        "eps-max-2": (["curve", png, ema, "--eps-max", "2"], ["--eps-max", "'2'", "(0, 1]"]),
        "out-ext": (["curve", str(tmp_path / "o.txt"), ema], ["OUT.png", "o.txt", ".png"]),
        "out-folder-missing": (["curve", str(tmp_path / "no" / "o.png"), ema],
                               ["OUT.png", "does not exist", "allowed"]),
        "results-not-a-list": (["curve", png, str(tmp_path / "rows.json")],
                               ["RESULT.json", "rows.json", "'results' is a dict", "allowed"]),
    }[case]
    try:
        with pytest.raises(SystemExit) as info:
            plot_cli.main(args)
    finally:
        logging.disable(logging.NOTSET)  # linf_jax.cli.fail silences logging for its exit
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not os.listdir(tmp_path) or not any(p.endswith((".png", ".txt"))
                                               for p in os.listdir(tmp_path))


def test_plots_leave_the_session_backend_alone(tmp_path):
    """Plotting draws on a pyplot-free Figure: a notebook's backend (here 'svg', standing in for
    the inline one) is the same afterwards, and no figure is left registered in pyplot."""
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        import matplotlib.pyplot as plt

        before = plt.get_fignums()
        out = plots.plot_certified_accuracy(
            {"a": {"results": [{"eps": 0.1, "certified_accuracy": 0.5, "pgd_accuracy": 0.6}],
                   "radii": [0.0, 0.2, 0.3]}}, str(tmp_path / "c.png"))
        assert os.path.getsize(out) > 1000
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == before
    finally:
        matplotlib.use(previous)
