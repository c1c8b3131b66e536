"""``auto`` on a GPU or TPU: the Pallas kernels checked against the XLA code and timed on the
device, per pass family (linf_jax/ops/calibration.py, :class:`DeviceCalibration`), and the
:class:`linf_jax.ops.KernelChoice` that ``ops.dispatch`` makes of it.

Run on the CPU through the calibration's seams: the platform ``'gpu'``, a made-up device kind,
Pallas in interpret mode at tiny sizes, a timing function that counts its calls (and mostly
returns fixed times), and a cache folder of the test's own.
"""

import json
import logging

import jax
import jax.numpy as jnp
import pytest

from linf_jax import ops
from linf_jax.ops import calibration, dispatch, pallas
from linf_jax.ops.pallas import Blocks

KIND = "Fake GPU"
TINY = (8, 16, 8)  # batch rows, inputs, neurons: two input tiles of SMALL
SMALL = Blocks(b=8, out=8, n=8, unroll=2)
LOGGER = "linf_jax.ops.calibration"


class Timing:
    """The timing seam: ``{family: (pallas_ms, xla_ms)}`` (default: Pallas faster), or the real
    alternating timing at one round when ``real``; counts its calls per family."""

    def __init__(self, times=None, real=False):
        self.times = times or {}
        self.real = real
        self.calls = []

    def __call__(self, family, runs):
        self.calls.append(family)
        assert set(runs) == {"pallas", "xla"}
        if self.real:
            return calibration.time_alternating(family, runs, rounds=1)
        pallas_ms, xla_ms = self.times.get(family, (1.0, 2.0))
        return {"pallas": pallas_ms, "xla": xla_ms}


def device_calibration(tmp_path, **inputs):
    """A calibration of the fake GPU, measured on the CPU (interpret mode, tiny sizes)."""
    args = dict(device_kind=KIND, mode="on", cache_dir=tmp_path, interpret=True,
                timing=Timing(), sizes=TINY, blocks=SMALL)
    args.update(inputs)
    return calibration.DeviceCalibration("gpu", **args)


@pytest.fixture
def install():
    """``install(calibration)``: the process-wide calibration of its platform for the test."""
    platforms = set()

    def put(cal):
        platforms.add(cal.platform)
        calibration.set_device_default(cal)
        return cal

    yield put
    for platform in platforms:
        calibration.set_device_default(None, platform)


def resolve_auto():
    return dispatch._resolve("auto", "default", "gpu")


def decision_files(folder):
    return sorted(folder.glob(f"{calibration.DEVICE_CACHE_PREFIX}-gpu-*.json"))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def test_fake_gpu_measures_caches_and_records_the_choice(tmp_path, install, caplog):
    timing = Timing(real=True)
    install(device_calibration(tmp_path, timing=timing, source_hash="v1"))
    families = dispatch.PALLAS_FAMILIES
    with caplog.at_level(logging.INFO, logger=LOGGER):
        choice = resolve_auto()
    assert sorted(timing.calls) == sorted(families)  # each family timed once, with real runs
    times = calibration.device_default("gpu").decide(families).times
    assert set(times) == set(families)
    assert all(t["pallas_ms"] > 0 and t["xla_ms"] > 0 for t in times.values())
    assert not warnings_of(caplog)
    announced = [r.getMessage() for r in caplog.records
                 if r.name == LOGGER and r.getMessage().startswith(f"kernels on {KIND} (gpu): ")]
    assert len(announced) == 1 and "measured: " in announced[0], announced
    record = choice.record()
    assert record["platform"] == "gpu" and record["reason"] == f"measured on {KIND}"
    chosen = {f for f, impl in record["passes"].items() if impl == "pallas"}
    assert chosen <= set(families) and set(record["passes"]) == set(ops.FAMILIES)
    assert all(record["passes"][f] == "xla" for f in ops.FAMILIES if f not in families)
    assert resolve_auto() == choice and len(timing.calls) == len(families)  # decided once

    (path,) = decision_files(tmp_path)
    payload = json.loads(path.read_text())
    assert payload["device_kind"] == KIND and payload["platform"] == "gpu"
    assert payload["source_hash"] == "v1" and payload["versions"]["jax"] == jax.__version__
    assert payload["decisions"] == {f: record["passes"][f] for f in families}
    assert set(payload["times"]) == set(families) and payload["failures"] == {}

    # A later process: the same inputs, a fresh object; it reads the file and neither times
    # nor runs a kernel (its Pallas module here has none).
    later = Timing()
    install(device_calibration(tmp_path, timing=later, source_hash="v1",
                               load_kernels=lambda: object()))
    cached = resolve_auto()
    assert later.calls == []
    assert cached.passes == choice.passes
    assert cached.reason == f"cached measurement on {KIND}"
    assert decision_files(tmp_path) == [path]


def test_the_record_names_the_kernels_that_run(tmp_path, install):
    """Pallas faster everywhere: ``record()`` says Pallas for the Pallas families, the line
    names both kinds, and the layers traced under the choice run the Pallas kernels for them
    (interpret mode here) and the XLA code for the rest; multi-device programs take the XLA
    code, an explicit ``pallas`` is kept."""
    install(device_calibration(tmp_path))
    choice = resolve_auto()
    families = dispatch.PALLAS_FAMILIES
    want = {f: "pallas" if f in families else "xla" for f in ops.FAMILIES}
    assert choice.record()["passes"] == want
    assert choice.line() == (f"kernels: {calibration.implementations_summary(want)} "
                             f"(gpu; measured on {KIND})")
    assert choice.line().startswith(f"kernels: Pallas for {', '.join(families)}")
    x, w = jnp.ones((3, 5)), jnp.zeros((4, 5))
    with ops.use_kernels(choice):
        assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.dist(x, w, float("inf")))(x))
        bounds = str(jax.make_jaxpr(lambda x: ops.linf_dist_bounds(x, x + 1, w))(x))
        assert ("pallas_call" in bounds) == ("bounds" in families)
    split = choice.for_partitioned()
    assert set(split.record()["passes"].values()) == {"xla"}
    assert split.reason.endswith("XLA code in multi-device programs")
    asked = dispatch._resolve("pallas", "config.kernels", "gpu")
    assert asked.for_partitioned() == asked


def test_a_kernel_with_wrong_values_is_not_used(tmp_path, monkeypatch, caplog):
    right = pallas.pallas_linf_dist
    monkeypatch.setattr(pallas, "pallas_linf_dist", lambda x, w, **kw: right(x, w, **kw) + 1.0)
    timing = Timing()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        decided = device_calibration(tmp_path, timing=timing).decide(("linf", "lp"))
    assert decided.pallas == ("lp",) and timing.calls == ["lp"]
    assert decided.failures["linf"].startswith("wrong values: the value differs")
    assert decided.reason == f"measured on {KIND}; Pallas failed for linf"
    (line,) = warnings_of(caplog)
    assert line.startswith(f"Pallas kernels not used for linf on {KIND} (gpu): wrong values")
    assert "\n" not in line
    (path,) = decision_files(tmp_path)
    assert json.loads(path.read_text())["failures"] == decided.failures


def test_a_kernel_that_fails_to_compile_is_not_used(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("Triton compilation failed\n(the compiler's long log)")

    monkeypatch.setattr(pallas, "pallas_lp_dist", broken)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        decided = device_calibration(tmp_path).decide(("linf", "lp"))
    assert decided.pallas == ("linf",)
    assert decided.passes() == {"linf": "pallas", "lp": "xla", "bounds": "xla", "decay": "xla"}
    (line,) = warnings_of(caplog)
    assert line == (f"Pallas kernels not used for lp on {KIND} (gpu): failed to compile: "
                    "RuntimeError: Triton compilation failed")


def test_a_missing_bounds_kernel_is_not_used_and_a_present_one_is_measured(tmp_path,
                                                                         monkeypatch, caplog):
    """``bounds`` measured like the others: without ``pallas_linf_dist_bounds`` in the module it
    is ruled out with a warning; with one (a stand-in of the XLA code where the kernel is not
    there yet), it is checked and timed."""
    monkeypatch.delattr(pallas, "pallas_linf_dist_bounds", raising=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        missing = device_calibration(tmp_path, source_hash="a").decide(("bounds",))
    assert missing.pallas == () and "pallas_linf_dist_bounds" in missing.failures["bounds"]
    assert len(warnings_of(caplog)) == 1
    monkeypatch.undo()
    if not hasattr(pallas, "pallas_linf_dist_bounds"):
        def stand_in(lower, upper, w, *, interpret=False, blocks=None):
            return ops.xla.bounds_scan(lower, upper, w)

        monkeypatch.setattr(pallas, "pallas_linf_dist_bounds", stand_in, raising=False)
    timing = Timing()
    present = device_calibration(tmp_path, source_hash="b", timing=timing).decide(("bounds",))
    assert present.pallas == ("bounds",) and present.failures == {}
    assert timing.calls == ["bounds"]


@pytest.mark.parametrize("pallas_faster", ["linf", "lp"])
def test_the_faster_implementation_wins(tmp_path, pallas_faster):
    slow, fast = (2.0, 1.0), (1.0, 2.0)  # (pallas_ms, xla_ms)
    times = {f: fast if f == pallas_faster else slow for f in ("linf", "lp")}
    decided = device_calibration(tmp_path, timing=Timing(times)).decide(("linf", "lp"))
    assert decided.pallas == (pallas_faster,)
    assert decided.times == {f: {"pallas_ms": t[0], "xla_ms": t[1]} for f, t in times.items()}
    tie = device_calibration(tmp_path / "tie", timing=Timing({"linf": (1.0, 1.0)}))
    assert tie.decide(("linf",)).pallas == ()  # Pallas only where faster


@pytest.mark.parametrize("mode", ["off", "native"])
def test_calibration_off_gives_the_xla_code_without_timing(tmp_path, monkeypatch, install, mode):
    monkeypatch.setenv(calibration.CALIBRATION_ENV, mode)
    timing = Timing()
    install(calibration.DeviceCalibration.from_environment(
        "gpu", device_kind=KIND, cache_dir=tmp_path, interpret=True, timing=timing,
        sizes=TINY, blocks=SMALL))
    choice = resolve_auto()
    assert choice.record()["passes"] == dict.fromkeys(ops.FAMILIES, "xla")
    assert choice.reason == f"LINF_JAX_CALIBRATION={mode}: the XLA code on gpu, not measured"
    assert choice.line() == f"kernels: XLA (gpu; {choice.reason})"
    assert timing.calls == [] and decision_files(tmp_path) == []
    # LINF_JAX_KERNELS still forces a choice, and times nothing.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(ops.KERNELS_ENV, "pallas")
    forced = ops.resolve()
    assert forced.record()["passes"] == {
        f: "pallas" if f in dispatch.PALLAS_FAMILIES else "xla" for f in ops.FAMILIES}
    assert forced.reason == "as requested" and forced.line() == "kernels: Pallas (gpu)"
    monkeypatch.setenv(ops.KERNELS_ENV, "xla")
    assert ops.resolve().line() == "kernels: XLA (gpu)" and timing.calls == []
    monkeypatch.setenv(calibration.CALIBRATION_ENV, "fast")
    with pytest.raises(ValueError, match="LINF_JAX_CALIBRATION='fast'"):
        calibration.DeviceCalibration.from_environment("gpu").decide(("linf",))


def test_an_unimportable_pallas_module_gives_the_xla_code(tmp_path, install, caplog):
    def no_pallas():
        raise ImportError("cannot import name 'triton' from 'jax.experimental.pallas'")

    timing = Timing()
    install(device_calibration(tmp_path, timing=timing, load_kernels=no_pallas))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        choice = resolve_auto()
    assert choice.record()["passes"] == dict.fromkeys(ops.FAMILIES, "xla")
    assert choice.reason.startswith("the Pallas kernels cannot be imported: ImportError")
    (line,) = warnings_of(caplog)
    assert "cannot be imported" in line and "triton" in line
    assert timing.calls == [] and decision_files(tmp_path) == []


def test_another_device_kind_or_kernel_source_measures_again(tmp_path):
    def measure(**inputs):
        timing = Timing()
        decided = device_calibration(tmp_path, timing=timing, **inputs).decide(("linf",))
        return decided.how, len(timing.calls)

    assert measure(source_hash="a") == ("measured", 1)
    assert measure(source_hash="a") == ("cached", 0)
    assert measure(source_hash="a", device_kind="Fake GPU 2") == ("measured", 1)
    assert measure(source_hash="b") == ("measured", 1)
    assert measure(source_hash="a") == ("cached", 0)
    assert measure(source_hash="b", device_kind="Fake GPU 2") == ("measured", 1)
    kinds = {json.loads(p.read_text())["device_kind"] for p in decision_files(tmp_path)}
    assert len(decision_files(tmp_path)) == 4 and kinds == {KIND, "Fake GPU 2"}
    assert measure(source_hash="a", device_kind="Fake GPU 2") == ("cached", 0)
    # the default hash covers the kernel sources
    assert calibration.kernel_source_hash() == calibration.kernel_source_hash()
    assert len(calibration.kernel_source_hash()) == 16
