"""Which implementation each pass family runs under ``LINF_JAX_KERNELS=auto``: measured, on the
CPU per machine and native build, on a GPU or TPU per device kind.

**The CPU.** The native kernels (:mod:`linf_jax.native`) are fast on the CPUs they are tuned
for and can be slower than the XLA code elsewhere (register tiles that do not fit a CPU's
registers spill), and no rule decided from the instruction set alone is right for every machine.
So the first time the automatic choice is needed on a machine, every pass family is timed both
ways on representative shapes, a few seconds in all, and ``auto`` takes the native kernels only
for the families where they were faster:

* ``linf``: the ℓ∞ distance, forward and backward (256 × 512 × 512);
* ``lp``: the ℓp distance, forward and backward, at p = 8 and at a general p (37.5);
* ``bounds``: the interval bounds of certification (256 × 512 × 512);
* ``decay``: the optimiser's ℓp weight-decay direction (512 × 1024 weights, p = 8).

Runs alternate between the two implementations and keep each one's fastest, so that a busy
machine slows both alike. The decision is cached next to the native library
(``*.calibration.json``: the times, the decisions, the CPU), announced in one INFO record of
the ``linf_jax.ops.calibration`` logger, and overridable: ``LINF_JAX_KERNELS=native`` or ``xla``
forces one for every pass, and ``LINF_JAX_CALIBRATION=off`` skips the timing and uses the
instruction-set rule of :func:`linf_jax.native.preferred` (native on AVX-512 CPUs only);
``LINF_JAX_CALIBRATION=native`` skips it and takes the native kernels for every pass wherever
they build. Unlike ``LINF_JAX_KERNELS=native``, ``native`` here still falls back to the XLA code
where the kernels cannot be built and still leaves multi-device programs to the XLA code
(:func:`linf_jax.ops.partitionable`): a fixed choice for continuous integration and test suites,
whose many small programs compile faster with the native custom calls than with the XLA code's
unrolled scans, on every CPU kind (BENCHMARKS.md, "Test suite time").

A :class:`Calibration` is one such decision, made from its inputs: the native build it decides
for, the mode (``LINF_JAX_CALIBRATION``), the decision file and the timing function.
:meth:`Calibration.from_environment` reads the mode from the environment; the module-level
functions (:func:`decisions`, :func:`how_decided`, :func:`calibration_mode`) use one per
process, :func:`default`, made from the environment the first time it is needed.

**A GPU or TPU.** There ``auto`` chooses between the Pallas kernels (:mod:`linf_jax.ops.pallas`)
and the XLA code, for the families the Pallas kernels cover
(:data:`linf_jax.ops.dispatch.PALLAS_FAMILIES`, any of ``linf``, ``lp``, ``bounds``; ``decay``
always runs the XLA code). The first time it is needed for a device kind, a
:class:`DeviceCalibration` runs, per family, both implementations on the device on fresh random
float32 operands (:data:`DEVICE_SIZES`, 512 rows of 1024 inputs into 1024 neurons; ``linf`` and
``lp`` forward and backward through ``jax.vjp``, ``lp`` at p = 8 and 37.5; ``bounds`` forward):

1. checks them against each other (:func:`disagreement`: the same shapes and dtypes, finite,
   within :data:`CHECK_TOLERANCE` relative and that fraction of the largest value absolute). A
   Pallas kernel that disagrees, is missing, or raises while compiled or run is not used for its
   family, and one WARNING record says so in one line (families that fail alike share it);
2. times the two where they agree (:func:`time_alternating`: alternating runs, each one's
   fastest of :data:`DEVICE_ROUNDS`, ``block_until_ready``), and takes Pallas only where it was
   faster.

The decision is written atomically to ``<cache>/device_kernels-<platform>-<key>.json`` (the
cache folder of :func:`linf_jax.native.cache_dir`: ``$LINF_JAX_CACHE``, else the user's cache
folder; ``<key>``: 16 hex digits of a hash of the platform, the device kind,
the jax and jaxlib versions and :func:`kernel_source_hash` of ``ops/pallas.py``, ``ops/xla.py``,
``ops/lp.py``), with the JSON keys ``platform``, ``device_kind``, ``versions``,
``source_hash``, ``families``, ``decisions`` (``{family: "pallas" or "xla"}``), ``times``
(``{family: {"pallas_ms", "xla_ms"}}``), ``failures`` (``{family: what failed}``) and ``date``;
processes take turns through a lock file beside it, later ones read it instead of measuring (a
file whose families differ is measured again and replaced; delete it to measure again), and a
measurement is announced in one INFO record (``kernels on <device kind> (<platform>): Pallas
for ...; XLA code for ... (measured: ...)``). ``LINF_JAX_CALIBRATION=off`` or ``native`` measures
nothing there: the XLA code for every pass. A Pallas module that cannot be imported gives the
XLA code, with one warning, and is not cached. Every input of a :class:`DeviceCalibration` is a
seam (platform, device kind, mode, cache folder, Pallas interpret mode, timing function, the
kernels' loader and source hash, sizes, tile sizes), so it runs on the CPU in the tests;
:func:`device_decision` uses one per platform, :func:`device_default`, made from the
environment the first time it is needed. Each process decides on its own first local device;
a multi-device program runs the XLA code whatever was decided
(:meth:`linf_jax.ops.KernelChoice.for_partitioned`), so processes that decided differently
still run one program.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from linf_jax import native
from linf_jax.errors import first_line

_log = logging.getLogger(__name__)

FAMILIES = ("linf", "lp", "bounds", "decay")
CALIBRATION_ENV = "LINF_JAX_CALIBRATION"
CALIBRATION_MODES = ("on", "off", "native")
ROUNDS = 7


def _cases(batch: int = 256, features: int = 512):
    """``{family: (fn, args)}``: each pass family as a function of ``use_native`` (the
    implementations themselves, not :func:`linf_jax.ops.dispatch`'s choice, which is what this
    module decides) and its inputs (``batch`` rows of ``features`` inputs into as many
    neurons)."""
    import jax
    import jax.numpy as jnp

    from linf_jax.ops import decay, lp, native_cpu, xla

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, features)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((features, features)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, features)), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((features, 2 * features)), jnp.float32)

    def grad_of(dist):
        return jax.grad(lambda x, w: (dist(x, w) * g).sum(), argnums=(0, 1))

    def linf(use_native):
        if use_native:
            return grad_of(lambda x, w: native_cpu.on_cpu(native_cpu.linf_native,
                                                          xla.linf_dist_xla, x, w))
        return grad_of(xla.linf_dist_xla)

    def lp_both(use_native):  # p = 8 (repeated squaring) and a general p
        p8, p_general = jnp.float32(8.0), jnp.float32(37.5)
        return lambda x, w: (
            grad_of(lambda x, w: lp.lp_dist_with(x, w, p8, 8, use_native))(x, w),
            grad_of(lambda x, w: lp.lp_dist_with(x, w, p_general, None, use_native))(x, w))

    def bounds(use_native):
        if use_native:
            return lambda lo, hi, w: native_cpu.on_cpu(native.linf_bounds, xla.bounds_scan,
                                                       lo, hi, w)
        return xla.bounds_scan

    return {
        "linf": (linf, (x, w)),
        "lp": (lp_both, (x, w)),
        "bounds": (bounds, (x - 0.1, x + 0.1, w)),
        "decay": (lambda use_native: lambda w: decay.lp_decay_direction_with(w, 8.0, use_native),
                  (wd,)),
    }


def measure(rounds: int = ROUNDS, batch: int = 256, features: int = 512) -> dict:
    """``{family: {"native_ms": t, "xla_ms": t}}``: the fastest of ``rounds`` alternating runs
    of each implementation on this machine, at the layer size of the decision (256 rows of 512
    inputs into 512 neurons) unless ``batch`` and ``features`` say otherwise."""
    import jax

    out = {}
    for family, (make, args) in _cases(batch, features).items():
        runs = {}
        for choice in ("native", "xla"):
            compiled = jax.jit(make(choice == "native")).lower(*args).compile()
            jax.block_until_ready(compiled(*args))  # warm-up
            runs[choice] = lambda compiled=compiled: compiled(*args)
        ms = time_alternating(family, runs, rounds)
        out[family] = {"native_ms": ms["native"], "xla_ms": ms["xla"]}
    return out


def _checked_mode(text: str | None) -> str:
    mode = (text or "").strip().lower() or "on"
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"{CALIBRATION_ENV}={mode!r} is not one of "
                         f"{', '.join(map(repr, CALIBRATION_MODES))} (or unset)")
    return mode


def _write_atomic(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def summary(result: dict[str, bool]) -> str:
    """One phrase naming the families that run native and those that run the XLA code
    (``result``: ``{family: runs native}``; :func:`implementations_summary`)."""
    return implementations_summary({f: "native" if result[f] else "xla" for f in FAMILIES})


class Calibration:
    """Which pass families ``auto`` runs native, decided for one native build.

    ``build``: the :class:`linf_jax.native.NativeBuild` decided for; ``mode``: ``'on'``
    (measure), ``'off'`` (the instruction-set rule) or ``'native'``, as ``LINF_JAX_CALIBRATION``
    spells it (``''``: ``'on'``; checked when used, so a bad value is a one-line ``ValueError``
    there); ``path``: the decision file (None: ``*.calibration.json`` beside the build's
    library); ``measure``: the timing, called with no arguments, returning what :func:`measure`
    returns. The decision is made once per object, on the first call that needs it."""

    def __init__(self, build: native.NativeBuild, mode: str = "on", path: Path | str | None = None,
                 measure=measure):
        self.build = build
        self.requested_mode = mode
        self.path = None if path is None else Path(path)
        self.measure = measure
        self._lock = threading.RLock()
        self._decided: tuple[dict[str, bool], str] | None = None

    @classmethod
    def from_environment(cls, build: native.NativeBuild | None = None, **overrides) -> Calibration:
        """The calibration this process asks for: ``$LINF_JAX_CALIBRATION`` for ``build`` (None:
        :func:`linf_jax.native.default`); keyword arguments of the constructor replace any of
        its inputs."""
        inputs = dict(mode=os.environ.get(CALIBRATION_ENV, ""))
        inputs.update(overrides)
        return cls(native.default() if build is None else build, **inputs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.build!r}, mode={self.requested_mode!r}, "
                f"path={None if self.path is None else str(self.path)!r})")

    def mode(self) -> str:
        """``'on'``, ``'off'`` or ``'native'``; a value outside these is a one-line
        ``ValueError``."""
        return _checked_mode(self.requested_mode)

    def decision_path(self) -> Path | None:
        """The decision file: ``path``, else beside the build's library (None when there is
        none)."""
        if self.path is not None:
            return self.path
        lib = self.build.library_path()
        return None if lib is None else lib.with_suffix(".calibration.json")

    def _decide(self) -> tuple[dict[str, bool], str]:
        with self._lock:
            if self._decided is None:
                mode = self.mode()
                if mode in ("off", "native"):
                    # no timing; the rule is decided from the instruction set, before any build
                    use, rule = ((self.build.preferred()[0], "instruction-set rule")
                                 if mode == "off" else (True, f"{CALIBRATION_ENV}=native"))
                    how = "unavailable" if use and not self.build.available() else rule
                    result = dict.fromkeys(FAMILIES, use and how != "unavailable")
                elif not self.build.available():
                    result, how = dict.fromkeys(FAMILIES, False), "unavailable"
                else:
                    result, how = self.calibrate()
                self._decided = (result, how)
            return self._decided

    def decisions(self) -> dict[str, bool]:
        """``{family: True if auto runs it native}`` for this build (cached in the object, and
        on disk in the decision file); all False where the native kernels are unavailable."""
        return self._decide()[0]

    def how_decided(self) -> str:
        """``'measured'``, ``'cached'`` (measured earlier), ``'instruction-set rule'``,
        ``'LINF_JAX_CALIBRATION=native'`` or ``'unavailable'``."""
        return self._decide()[1]

    def calibrate(self) -> tuple[dict[str, bool], str]:
        """``(decisions, 'cached' or 'measured')``: the decisions in the decision file, else
        measured now and written there. Processes on one machine take turns (a lock file beside
        the decision file): one measures while the others wait and read its result, so no
        timing runs against another's load and none is repeated."""
        path = self.decision_path()
        with native.file_lock(path.with_suffix(".lock")):
            return self._read_or_measure(path)

    def _read_or_measure(self, path: Path) -> tuple[dict[str, bool], str]:
        try:
            with open(path) as f:
                cached = json.load(f)
            if set(cached.get("decisions", {})) == set(FAMILIES):
                return {k: bool(v) for k, v in cached["decisions"].items()}, "cached"
        except (OSError, ValueError, TypeError):
            pass
        isa = self.build.isa()
        _log.info("timing the native CPU kernels (%s) against the XLA code once, a few seconds",
                  isa)
        # In a thread of its own: the first use of a kernel is often inside a trace (jax.jit,
        # jax.eval_shape), and JAX's trace state is per thread, so the timing runs on concrete
        # arrays whatever the caller is tracing.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            times = pool.submit(self.measure).result()
        result = {f: times[f]["native_ms"] < times[f]["xla_ms"] for f in FAMILIES}
        payload = {"decisions": result, "times": times, "isa": isa,
                   "cpu": platform.processor() or platform.machine(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            _write_atomic(path, payload)
        except OSError:
            pass  # a read-only cache: measured again next time
        _log.info("%s (measured; cached in %s)", summary(result), path)
        return result, "measured"


_default_lock = threading.Lock()
_default: Calibration | None = None


def default() -> Calibration:
    """The process-wide calibration that the module-level functions use: made from the
    environment for :func:`linf_jax.native.default` (:meth:`Calibration.from_environment`) the
    first time it is needed, unless :func:`set_default` gave one."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Calibration.from_environment()
        return _default


def set_default(calibration: Calibration | None) -> Calibration | None:
    """Makes ``calibration`` the process-wide one (None: made from the environment when next
    needed) and returns the previous one (None if none was made yet)."""
    global _default
    with _default_lock:
        previous, _default = _default, calibration
        return previous


def calibration_mode() -> str:
    """``LINF_JAX_CALIBRATION``: ``'on'`` (unset: measure), ``'off'`` (the instruction-set rule)
    or ``'native'`` (no timing: every pass native wherever the kernels build; the XLA code
    where they do not). A value outside these is a one-line ``ValueError``."""
    return default().mode()


def decisions() -> dict[str, bool]:
    """``{family: True if auto runs it native}`` on this machine and build (cached in memory,
    and on disk beside the library); all False where the native kernels are unavailable."""
    return default().decisions()


def how_decided() -> str:
    """``'measured'``, ``'cached'`` (measured earlier), ``'instruction-set rule'``,
    ``'LINF_JAX_CALIBRATION=native'`` or ``'unavailable'``."""
    return default().how_decided()


# --------------------------------------------------------------------------------------------
# The accelerator: the Pallas kernels against the XLA code
# --------------------------------------------------------------------------------------------

#: The operand sizes of the accelerator measurement: (batch rows, inputs, neurons).
DEVICE_SIZES = (512, 1024, 1024)
#: The exponents the ``lp`` family is checked and timed at: the integer path and a general p.
LP_EXPONENTS = (8.0, 37.5)
DEVICE_ROUNDS = 5
#: The float32 tolerance of the check: relative, and absolute as a fraction of the largest
#: value of the XLA code's output.
CHECK_TOLERANCE = 1e-4
#: The sources (in ``linf_jax/ops``) whose hash keys the accelerator decision.
KERNEL_SOURCES = ("pallas.py", "xla.py", "lp.py")
DEVICE_CACHE_PREFIX = "device_kernels"
_OUTPUTS = {
    "linf": ("value", "x gradient", "w gradient"),
    "lp": tuple(f"{what} at p = {p:g}" for p in LP_EXPONENTS
                for what in ("value", "x gradient", "w gradient")),
    "bounds": ("lower bound", "upper bound"),
}


def kernel_source_hash() -> str:
    """A hash of :data:`KERNEL_SOURCES` (16 hex digits): a change to a kernel re-measures."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in KERNEL_SOURCES:
        digest.update(name.encode() + b"\0")
        try:
            digest.update((here / name).read_bytes())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()[:16]


def jax_versions() -> dict[str, str]:
    """``{"jax": ..., "jaxlib": ...}``: the versions the accelerator decision is keyed by."""
    import jax

    try:
        import jaxlib

        lib = jaxlib.__version__
    except (ImportError, AttributeError):
        lib = "unknown"
    return {"jax": jax.__version__, "jaxlib": lib}


def _with_grads(dist):
    """``(x, w, g) -> (y, ∂⟨y, g⟩/∂x, ∂⟨y, g⟩/∂w)``: a distance pass forward and backward."""
    import jax

    def run(x, w, g):
        y, vjp = jax.vjp(dist, x, w)
        return (y, *vjp(g))

    return run


def _at_each_p(make):
    """The ``lp`` pass at every exponent of :data:`LP_EXPONENTS`, forward and backward, as one
    function of ``(x, w, g)``; ``make(p)`` is the distance at a Python-number p."""
    runs = [_with_grads(make(p)) for p in LP_EXPONENTS]
    return lambda x, w, g: tuple(a for run in runs for a in run(x, w, g))


def xla_pass(family: str):
    """The XLA code of pass ``family`` (``'linf'``, ``'lp'`` or ``'bounds'``) as one function of
    the operands :func:`device_operands` makes: what ``xla`` runs for that family on an
    accelerator."""
    import jax.numpy as jnp

    from linf_jax.ops import lp, xla

    if family == "linf":
        return _with_grads(xla.linf_dist_xla)
    if family == "lp":
        def at(p):
            k = int(p) if p.is_integer() and 1 <= p <= xla.MAX_INT_P else None
            return lambda x, w: lp.lp_dist_with(x, w, jnp.asarray(p, x.dtype), k, False)

        return _at_each_p(at)
    if family == "bounds":
        return xla.bounds_scan
    raise ValueError(f"no accelerator pass for family {family!r} (one of {tuple(_OUTPUTS)})")


def pallas_pass(kernels, family: str, interpret: bool = False, blocks=None):
    """The Pallas kernels of ``kernels`` (the :mod:`linf_jax.ops.pallas` module) for pass
    ``family``, as :func:`xla_pass` has it; ``blocks``: their tile sizes (None: the module's
    defaults). A kernel missing from the module is an ``AttributeError`` here."""
    kw = {"interpret": bool(interpret)}
    if blocks is not None:
        kw["blocks"] = blocks
    if family == "linf":
        linf = kernels.pallas_linf_dist
        return _with_grads(lambda x, w: linf(x, w, **kw))
    if family == "lp":
        lp_dist = kernels.pallas_lp_dist
        return _at_each_p(lambda p: lambda x, w: lp_dist(x, w, p, **kw))
    if family == "bounds":
        bounds = kernels.pallas_linf_dist_bounds
        return lambda lower, upper, w: tuple(bounds(lower, upper, w, **kw))
    raise ValueError(f"no Pallas pass for family {family!r} (one of {tuple(_OUTPUTS)})")


def device_operands(family: str, sizes=DEVICE_SIZES, rng=None) -> tuple:
    """Fresh standard-normal float32 operands of pass ``family`` on the default device:
    ``(x, w, g)`` (``g`` the cotangent of the output) for ``linf`` and ``lp``,
    ``(lower, upper, w)`` with ``upper > lower`` for ``bounds``; ``sizes``: (batch rows,
    inputs, neurons)."""
    import jax.numpy as jnp

    rng = np.random.default_rng() if rng is None else rng
    batch, features, out = sizes

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    if family == "bounds":
        lower = rng.standard_normal((batch, features))
        upper = lower + 0.05 + 0.2 * rng.random((batch, features))
        return (jnp.asarray(lower, jnp.float32), jnp.asarray(upper, jnp.float32),
                normal(out, features))
    return normal(batch, features), normal(out, features), normal(batch, out)


def disagreement(family: str, got, want, tolerance: float = CHECK_TOLERANCE) -> str | None:
    """None where the outputs ``got`` (Pallas) agree with ``want`` (the XLA code) to float32
    rounding — each the same shape and dtype, finite, within ``tolerance`` relative and
    ``tolerance`` times the largest magnitude of ``want`` absolute; else one phrase saying
    which output differs, and by how much."""
    got, want = list(got), list(want)
    names = _OUTPUTS.get(family, ())
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        name = names[i] if i < len(names) else f"output {i}"
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"the {name} is {a.dtype}{list(a.shape)}, not {b.dtype}{list(b.shape)}"
        if not np.all(np.isfinite(a)):
            return f"the {name} is not finite"
        if not b.size:
            continue
        scale = max(1.0, float(np.max(np.abs(b))))
        if not np.allclose(a, b, rtol=tolerance, atol=tolerance * scale):
            err = float(np.max(np.abs(a.astype(np.float64) - b)))
            return f"the {name} differs from the XLA code's by up to {err:.3g}"
    return None


def time_alternating(family: str, runs: dict, rounds: int = DEVICE_ROUNDS) -> dict[str, float]:
    """``{implementation: milliseconds}``: the fastest of ``rounds`` runs of each of ``runs``
    (``{implementation: a function of no arguments}``, compiled and run once already), taken in
    turn so that a busy device slows both alike, each waited for with ``block_until_ready``.
    The default timing of :class:`DeviceCalibration` (``family`` is for other timings)."""
    import jax

    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for impl, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            best[impl] = min(best[impl], time.perf_counter() - t0)
    return {impl: 1e3 * t for impl, t in best.items()}


def _load_pallas():
    from linf_jax.ops import pallas

    return pallas


def implementations_summary(passes: dict[str, str]) -> str:
    """One phrase naming the families of each implementation, e.g. ``'Pallas for linf, lp;
    XLA code for bounds, decay'`` (``passes``: ``{family: 'pallas', 'native' or 'xla'}``)."""
    names = {"pallas": "Pallas", "native": "native kernels", "xla": "XLA code"}
    parts = []
    for impl, name in names.items():
        families = [f for f in FAMILIES if passes.get(f) == impl]
        if families:
            parts.append(f"{name} for {', '.join(families)}")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class DeviceDecision:
    """Which pass families ``auto`` runs with the Pallas kernels on one accelerator.

    ``pallas``: those families; ``how``: ``'measured'``, ``'cached'`` (measured earlier),
    ``'off'`` or ``'native'`` (``LINF_JAX_CALIBRATION``: not measured), ``'unavailable'``
    (the Pallas module cannot be imported) or ``'no kernels'`` (no family to measure);
    ``reason``: one phrase for :attr:`linf_jax.ops.KernelChoice.reason`; ``times``:
    ``{family: {"pallas_ms", "xla_ms"}}`` of the families checked and timed; ``failures``:
    ``{family: what failed}``; ``path``: the decision file (None when not measured)."""

    platform: str
    device_kind: str | None
    pallas: tuple[str, ...]
    how: str
    reason: str
    times: dict = dataclasses.field(default_factory=dict)
    failures: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    def passes(self) -> dict[str, str]:
        """``{family: 'pallas' or 'xla'}`` for every family of :data:`FAMILIES`."""
        return {f: "pallas" if f in self.pallas else "xla" for f in FAMILIES}


class DeviceCalibration:
    """Which pass families ``auto`` runs with the Pallas kernels on a GPU or TPU, decided from
    its inputs (each a seam a test on the CPU replaces):

    ``platform``: the backend (``'gpu'``, ``'tpu'``); ``device_kind``: the device decided for
    (None: ``jax.local_devices()[0].device_kind``, the device the measurement runs on);
    ``mode``: as ``LINF_JAX_CALIBRATION`` spells it (``'on'`` or ``''``: measure; ``'off'``,
    ``'native'``: the XLA code, unmeasured);
    ``cache_dir``: the folder of the decision files (None: :func:`linf_jax.native.cache_dir`);
    ``interpret``: Pallas interpret mode (the CPU); ``timing``: ``timing(family, runs) ->
    {implementation: ms}`` (:func:`time_alternating`); ``load_kernels``: returns the Pallas
    module (its exception: no Pallas, one warning); ``source_hash``: the kernels' version (None:
    :func:`kernel_source_hash`); ``sizes``: the operands' (batch, inputs, neurons); ``blocks``:
    the Pallas tile sizes (None: the kernels' defaults, which the layers run).

    :meth:`decide` makes the decision once per object and set of families: from the decision
    file of this device kind, platform, JAX version and kernel sources when one holds it, else
    checked and timed now (and written there)."""

    def __init__(self, platform: str, device_kind: str | None = None, mode: str = "on",
                 cache_dir: Path | str | None = None, interpret: bool = False,
                 timing=time_alternating, load_kernels=_load_pallas,
                 source_hash: str | None = None, sizes: tuple[int, int, int] = DEVICE_SIZES,
                 blocks=None):
        self.platform = platform
        self.requested_kind = device_kind
        self.requested_mode = mode
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.interpret = interpret
        self.timing = timing
        self.load_kernels = load_kernels
        self.requested_hash = source_hash
        self.sizes = tuple(sizes)
        self.blocks = blocks
        self._lock = threading.RLock()
        self._decided: dict[tuple[str, ...], DeviceDecision] = {}

    @classmethod
    def from_environment(cls, platform: str, **overrides) -> DeviceCalibration:
        """The accelerator calibration this process asks for on ``platform``:
        ``$LINF_JAX_CALIBRATION``; keyword arguments of the constructor replace any input."""
        inputs = dict(mode=os.environ.get(CALIBRATION_ENV, ""))
        inputs.update(overrides)
        return cls(platform, **inputs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.platform!r}, device_kind={self.requested_kind!r}, "
                f"mode={self.requested_mode!r}, interpret={self.interpret!r})")

    def mode(self) -> str:
        """``'on'``, ``'off'`` or ``'native'``; another value is a one-line ``ValueError``."""
        return _checked_mode(self.requested_mode)

    def device_kind(self) -> str:
        if self.requested_kind is not None:
            return self.requested_kind
        import jax

        return jax.local_devices()[0].device_kind

    def source_hash(self) -> str:
        return self.requested_hash if self.requested_hash is not None else kernel_source_hash()

    def key(self, device_kind: str | None = None) -> dict:
        """What a decision file must match: platform, device kind, JAX versions, kernel
        sources."""
        return {"platform": self.platform,
                "device_kind": self.device_kind() if device_kind is None else device_kind,
                "versions": jax_versions(), "source_hash": self.source_hash()}

    def decision_path(self, device_kind: str | None = None) -> Path:
        """``<cache_dir>/device_kernels-<platform>-<16 hex digits of the key>.json``."""
        folder = self.cache_dir if self.cache_dir is not None else native.cache_dir()
        key = json.dumps(self.key(device_kind), sort_keys=True).encode()
        digest = hashlib.sha256(key).hexdigest()[:16]
        return folder / f"{DEVICE_CACHE_PREFIX}-{self.platform}-{digest}.json"

    def decide(self, families) -> DeviceDecision:
        """The :class:`DeviceDecision` for ``families`` (those the Pallas kernels cover; the
        others run the XLA code), made once per object and set of families."""
        families = tuple(f for f in FAMILIES if f in tuple(families))
        with self._lock:
            if families not in self._decided:
                self._decided[families] = self._decide(families)
            return self._decided[families]

    def _unmeasured(self, how: str, reason: str) -> DeviceDecision:
        return DeviceDecision(self.platform, self.requested_kind, (), how, reason)

    def _decide(self, families: tuple[str, ...]) -> DeviceDecision:
        mode = self.mode()
        if mode != "on":
            return self._unmeasured(mode, f"{CALIBRATION_ENV}={mode}: the XLA code on "
                                          f"{self.platform}, not measured")
        if not families:
            return self._unmeasured("no kernels", f"the XLA code on {self.platform}: no Pallas "
                                                  "kernel to measure")
        try:
            kernels = self.load_kernels()
        except Exception as err:  # noqa: BLE001 - any failure to import means no Pallas
            why = first_line(err, 200, with_type=True)
            _log.warning("the Pallas kernels are not used on %s: they cannot be imported (%s)",
                         self.platform, why)
            return self._unmeasured("unavailable", f"the Pallas kernels cannot be imported: "
                                                   f"{why}")
        kind = self.device_kind()
        path = self.decision_path(kind)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # file_lock runs unlocked and the write is skipped: measured each process
        with native.file_lock(path.with_suffix(".lock")):
            cached = self._read(path, kind, families)
            if cached is not None:
                return cached
            return self._measure_and_write(kernels, kind, families, path)

    def _read(self, path: Path, kind: str, families) -> DeviceDecision | None:
        try:
            with open(path) as f:
                cached = json.load(f)
            key = self.key(kind)
            if (any(cached.get(k) != v for k, v in key.items())
                    or sorted(cached.get("decisions", {})) != sorted(families)):
                return None
            pallas = tuple(f for f in families if cached["decisions"][f] == "pallas")
            failures = dict(cached.get("failures", {}))
            return DeviceDecision(self.platform, kind, pallas, "cached",
                                  _reason("cached measurement", kind, failures),
                                  dict(cached.get("times", {})), failures, path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def measure(self, kernels, families) -> tuple[dict, dict]:
        """``(times, failures)``: each family's Pallas kernels checked against the XLA code on
        fresh random operands (:func:`disagreement`) and, where they agree, both timed;
        ``failures``: ``{family: what failed}`` for the others."""
        import jax

        times, failures = {}, {}
        for family in families:
            args = device_operands(family, self.sizes)
            try:
                xla_run = jax.jit(xla_pass(family)).lower(*args).compile()
                want = jax.block_until_ready(xla_run(*args))
            except Exception as err:  # noqa: BLE001 - nothing to check Pallas against
                failures[family] = f"the XLA code failed ({first_line(err, 160, with_type=True)})"
                continue
            stage = "load"
            try:
                fn = pallas_pass(kernels, family, self.interpret, self.blocks)
                stage = "compile"
                pallas_run = jax.jit(fn).lower(*args).compile()
                stage = "run"
                got = jax.block_until_ready(pallas_run(*args))
            except Exception as err:  # noqa: BLE001 - any failure of a kernel rules it out
                failures[family] = f"failed to {stage}: {first_line(err, 160, with_type=True)}"
                continue
            wrong = disagreement(family, got, want)
            if wrong is not None:
                failures[family] = f"wrong values: {wrong}"
                continue
            try:
                ms = self.timing(family, {"pallas": lambda r=pallas_run: r(*args),
                                          "xla": lambda r=xla_run: r(*args)})
                times[family] = {"pallas_ms": float(ms["pallas"]), "xla_ms": float(ms["xla"])}
            except Exception as err:  # noqa: BLE001 - a kernel that fails when timed is out
                failures[family] = f"failed when timed: {first_line(err, 160, with_type=True)}"
        return times, failures

    def _measure_and_write(self, kernels, kind: str, families, path: Path) -> DeviceDecision:
        _log.info("checking and timing the Pallas kernels against the XLA code on %s (%s) once",
                  kind, self.platform)
        # In a thread of its own, as the CPU calibration: the first resolution is often inside
        # a trace, and JAX's trace state is per thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            times, failures = pool.submit(self.measure, kernels, families).result()
        pallas = tuple(f for f in families
                       if f in times and times[f]["pallas_ms"] < times[f]["xla_ms"])
        by_failure: dict[str, list[str]] = {}
        for family, what in failures.items():
            by_failure.setdefault(what, []).append(family)
        for what, fams in by_failure.items():
            _log.warning("Pallas kernels not used for %s on %s (%s): %s", ", ".join(fams), kind,
                         self.platform, what)
        decisions = {f: "pallas" if f in pallas else "xla" for f in families}
        payload = {**self.key(kind), "families": list(families), "decisions": decisions,
                   "times": times, "failures": failures,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            _write_atomic(path, payload)
            where = f"cached in {path}"
        except OSError:
            where = "not cached: the folder is not writable"
        decision = DeviceDecision(self.platform, kind, pallas, "measured",
                                  _reason("measured", kind, failures), times, failures, path)
        measured = ", ".join(
            f"{f} {t['pallas_ms']:.3g} ms Pallas / {t['xla_ms']:.3g} ms XLA"
            for f, t in times.items()) or "nothing timed"
        _log.info("kernels on %s (%s): %s (measured: %s; %s)", kind, self.platform,
                  implementations_summary(decision.passes()), measured, where)
        return decision


def _reason(how: str, kind: str, failures: dict) -> str:
    reason = f"{how} on {kind}"
    if failures:
        reason += f"; Pallas failed for {', '.join(failures)}"
    return reason


_device_defaults: dict[str, DeviceCalibration] = {}


def device_default(platform: str) -> DeviceCalibration:
    """The process-wide accelerator calibration of ``platform``: made from the environment
    (:meth:`DeviceCalibration.from_environment`) the first time it is needed, unless
    :func:`set_device_default` gave one."""
    with _default_lock:
        if platform not in _device_defaults:
            _device_defaults[platform] = DeviceCalibration.from_environment(platform)
        return _device_defaults[platform]


def set_device_default(calibration: DeviceCalibration | None,
                       platform: str | None = None) -> DeviceCalibration | None:
    """Makes ``calibration`` the process-wide one of its platform (None: forgets the one of
    ``platform``, made from the environment when next needed) and returns the previous one."""
    platform = calibration.platform if calibration is not None else platform
    with _default_lock:
        previous = _device_defaults.pop(platform, None)
        if calibration is not None:
            _device_defaults[platform] = calibration
        return previous


def device_decision(platform: str, families) -> DeviceDecision:
    """The :class:`DeviceDecision` of ``families`` on ``platform`` (a GPU or TPU backend)."""
    return device_default(platform).decide(families)
