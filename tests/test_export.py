"""linf_jax.export: a run or an ensemble as one serialized jax.export program, loaded and run
in a process that has only jax and numpy, against load_classifier in this one."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

PLATFORMS = ("cpu", "cuda", "tpu")
# a pure net and a joint ensemble of two (1-Lipschitz: Lipschitz radii), and a net with an MLP
# head (not 1-Lipschitz: interval radii by bisection); trained for 3 epochs of the p = ∞ phase
# alone (one train step to compile), which leaves radii of every size from 0 up
SHORT = {"train.epochs": (0, 0, 0, 0, 3), "train.checkpoint_every_epochs": 3}
RUNS = {"single": SHORT, "ensemble": {**SHORT, "ensemble.size": 2, "ensemble.mode": "joint"},
        "mlp": {**SHORT, "model.head": "mlp"}}
KINDS = tuple(RUNS)
EPS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)

# The loading process: jax and numpy only, no checkout on its path.
CHILD = r"""
import sys
import jax
import numpy as np
x = np.load("pixels.npz")["x"]
for name in sys.argv[1:]:
    exported = jax.export.deserialize(open(name + ".jax", "rb").read())
    logits, radii = exported.call(x)
    np.savez(name + "_out.npz", logits=np.asarray(logits), radii=np.asarray(radii),
             platforms=np.asarray(exported.platforms))
assert "linf_jax" not in sys.modules, sorted(m for m in sys.modules if "linf" in m)
print("child ok")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from linf_jax import trainer

    out = {}
    for kind, overrides in RUNS.items():
        workdir = str(tmp_path_factory.mktemp(f"run_{kind}"))
        trainer.train_and_evaluate(tiny_config(**overrides), workdir, progress=False,
                                   evaluate_at_end=False)
        out[kind] = workdir
    return out


@pytest.fixture(scope="module")
def pixels():
    from linf_jax import data

    ds = data.load("digits", "test")
    return np.asarray(data.as_pixels(ds.images[:64]))


@pytest.fixture(scope="module")
def exported(runs, pixels, tmp_path_factory):
    """Exports both runs, then runs them in one clean child process: ``(tmp, {kind: Exported})``
    with the child's outputs in ``tmp / f"{kind}_out.npz"``."""
    from linf_jax import export

    tmp = tmp_path_factory.mktemp("export")
    done = {kind: export.export(runs[kind], tmp / f"{kind}.jax", platforms=PLATFORMS)
            for kind in KINDS}
    np.savez(tmp / "pixels.npz", x=pixels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", CHILD, *KINDS], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child ok" in proc.stdout
    return tmp, done


def _custom_call_targets(module: str) -> set:
    """The custom-call targets of a module's operations (not its source locations)."""
    return set(re.findall(r"stablehlo\.custom_call\s*@(\w+)", module))


@pytest.mark.parametrize("kind", KINDS)
def test_exported_program_is_portable_and_has_no_native_custom_call(exported, kind):
    tmp, done = exported
    e = done[kind]
    assert e.platforms == PLATFORMS
    assert tuple(np.load(tmp / f"{kind}_out.npz")["platforms"]) == PLATFORMS
    assert len(e.in_avals) == 1 and str(e.in_avals[0].shape[0]) == "b"  # any batch size
    assert tuple(e.in_avals[0].shape[1:]) == (8, 8, 1)
    module = e.mlir_module()
    # only jax's own check of the symbolic batch dimension; no native CPU kernel
    assert _custom_call_targets(module) <= {"shape_assertion"}, _custom_call_targets(module)
    assert "linf_jax_" not in module


@pytest.mark.parametrize("kind", KINDS)
def test_exported_outputs_match_the_classifier(exported, runs, pixels, kind):
    from linf_jax import certify, data
    from linf_jax.classifier import load_classifier

    tmp, _ = exported
    out = np.load(tmp / f"{kind}_out.npz")
    clf = load_classifier(runs[kind])
    assert (clf.num_members is None) == (kind != "ensemble")
    assert clf.lipschitz == (kind != "mlp")
    logits = np.asarray(clf(pixels))
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    pred = logits.argmax(-1).astype(np.int32)
    radii = out["radii"]
    assert radii.shape == (len(pixels),) and radii.dtype == np.float32
    # the classifier's own radius, against the predicted class
    np.testing.assert_allclose(radii, np.asarray(clf.certified_radius(pixels, pred)), atol=1e-4)
    # radius > ε is the certificate behind the radius at ε: the interval certificate (clf.certify)
    # for a model that is not 1-Lipschitz, else the Lipschitz rule; for a 1-Lipschitz model the
    # interval certificate certifies at least as much (often more: the pixel box clips it).
    # They may differ only at the bisection's resolution or a float rounding from ε.
    borderline, split = 0, False
    for eps in EPS:
        interval = np.asarray(clf.certify(pixels, pred, eps))
        rule = interval if not clf.lipschitz else np.asarray(certify.lipschitz_certified(
            logits, pred, data.eps_to_normalized(eps, clf.std)))
        near = np.abs(radii - eps) < 1e-3
        differ = (radii > eps) != rule
        assert not (differ & ~near).any(), (eps, np.flatnonzero(differ & ~near))
        assert not ((radii > eps) & ~interval & ~near).any(), eps  # never beyond the interval
        borderline += int(differ.sum())
        split |= bool(rule.any() and not rule.all())
    assert borderline <= 2, borderline
    assert split  # some ε certifies some examples and not others: the comparison says something


def test_fixed_batch_export_and_its_description(runs, pixels, tmp_path):
    import jax
    import jax.numpy as jnp

    from linf_jax import export
    from linf_jax.classifier import load_classifier

    e = export.export(runs["single"], tmp_path / "sub" / "m.jax", platforms=("cpu",), batch=5)
    assert e.platforms == ("cpu",) and tuple(e.in_avals[0].shape) == (5, 8, 8, 1)
    assert _custom_call_targets(e.mlir_module()) == set()  # (the locations name this test)
    logits, _ = e.call(pixels[:5])
    np.testing.assert_allclose(logits, load_classifier(runs["single"])(pixels[:5]), rtol=1e-5,
                               atol=1e-5)
    # the control: traced with the native CPU kernels, the CPU lowering would carry them
    from linf_jax import native, ops
    from linf_jax.export import serving_fn

    if native.available():
        with ops.use_kernels("native"):
            e = jax.export.export(jax.jit(serving_fn(load_classifier(runs["single"]))),
                                  platforms=("cpu", "cuda"),
                                  disabled_checks=native.export_disabled_checks())(
                jax.ShapeDtypeStruct((5, 8, 8, 1), jnp.float32))
        assert any(t.startswith("linf_jax_") for t in _custom_call_targets(e.mlir_module()))
    with pytest.raises(export.ExportError, match="platforms"):
        export.export(runs["single"], tmp_path / "x.jax", platforms=("gpu",))
    with pytest.raises(export.ExportError, match="batch"):
        export.export(runs["single"], tmp_path / "x.jax", batch=0)
    from linf_jax.cli.certify import export_line

    export.export([runs["ensemble"]], tmp_path / "e.jax", "raw", ("cpu", "cuda"))
    info = export.read_info(tmp_path / "e.jax")
    assert info["kernels"]["passes"] == dict.fromkeys(("linf", "lp", "bounds", "decay"), "xla")
    assert (info["members"], info["weights"], info["platforms"]) == (2, "raw", ["cpu", "cuda"])
    line = export_line(info, str(tmp_path / "e.jax"))
    assert line.startswith("exported ensemble of 2 (raw weights) of ") and "\n" not in line
    assert line.endswith(f"to {tmp_path / 'e.jax'} (platforms cpu, cuda, input (N, 8, 8, 1) "
                         "float32 pixels in [0, 1]; returns (logits, radii in pixels))")
    assert os.path.getsize(tmp_path / "e.jax") > 0
