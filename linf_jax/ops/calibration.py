"""Which passes run the native CPU kernels under ``LINF_JAX_KERNELS=auto``: measured, per
machine and build.

The native kernels (:mod:`linf_jax.native`) are fast on the CPUs they are tuned for and can be
slower than the XLA code elsewhere (register tiles that do not fit a CPU's registers spill), and
no rule decided from the instruction set alone is right for every machine. So the first time the
automatic choice is needed on a machine, every pass family is timed both ways on
representative shapes, a few seconds in all, and ``auto`` takes the native kernels only for the
families where they were faster:

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
"""

from __future__ import annotations

import concurrent.futures
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
        compiled = {}
        for choice in ("native", "xla"):
            compiled[choice] = jax.jit(make(choice == "native")).lower(*args).compile()
            jax.block_until_ready(compiled[choice](*args))  # warm-up
        best = {"native": float("inf"), "xla": float("inf")}
        for _ in range(rounds):
            for choice in ("native", "xla"):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[choice](*args))
                best[choice] = min(best[choice], time.perf_counter() - t0)
        out[family] = {"native_ms": 1e3 * best["native"], "xla_ms": 1e3 * best["xla"]}
    return out


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
    """One phrase naming the families that run native and those that run the XLA code."""
    native_f = [f for f in FAMILIES if result[f]]
    xla_f = [f for f in FAMILIES if not result[f]]
    parts = []
    if native_f:
        parts.append(f"native kernels for {', '.join(native_f)}")
    if xla_f:
        parts.append(f"XLA code for {', '.join(xla_f)}")
    return "; ".join(parts)


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
        mode = (self.requested_mode or "").strip().lower() or "on"
        if mode not in CALIBRATION_MODES:
            raise ValueError(f"{CALIBRATION_ENV}={mode!r} is not one of "
                             f"{', '.join(map(repr, CALIBRATION_MODES))} (or unset)")
        return mode

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
