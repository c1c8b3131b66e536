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
(``*.calibration.json``: the times, the decisions, the CPU), printed once in one line, and
overridable: ``LINF_JAX_KERNELS=native`` or ``xla`` forces one for every pass, and
``LINF_JAX_CALIBRATION=off`` skips the timing and uses the instruction-set rule of
:func:`linf_jax.native.preferred` (native on AVX-512 CPUs only); ``LINF_JAX_CALIBRATION=native``
skips it and takes the native kernels for every pass wherever they build. Unlike
``LINF_JAX_KERNELS=native``, ``native`` here still falls back to the XLA code where the kernels
cannot be built and still leaves multi-device programs to the XLA code
(:func:`linf_jax.ops.partitionable`): a fixed choice for continuous integration and test suites,
whose many small programs compile faster with the native custom calls than with the XLA code's
unrolled scans, on every CPU kind (BENCHMARKS.md, "Test suite time").
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import tempfile
import threading
import time

import numpy as np

from linf_jax import native

FAMILIES = ("linf", "lp", "bounds", "decay")
CALIBRATION_ENV = "LINF_JAX_CALIBRATION"
ROUNDS = 7

_lock = threading.RLock()
_state: dict = {}


def _cases(batch: int = 256, features: int = 512):
    """``{family: (fn, args)}``: jitted-to-be functions of each pass family and their inputs
    (``batch`` rows of ``features`` inputs into as many neurons)."""
    import jax
    import jax.numpy as jnp

    from linf_jax import ops, optim

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, features)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((features, features)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, features)), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((features, 2 * features)), jnp.float32)

    def grad_of(dist):
        return jax.grad(lambda x, w: (dist(x, w) * g).sum(), argnums=(0, 1))

    def lp_both(x, w):
        return grad_of(lambda x, w: ops.lp_dist(x, w, 8.0))(x, w), \
            grad_of(lambda x, w: ops.lp_dist(x, w, 37.5))(x, w)

    return {
        "linf": (grad_of(ops.linf_dist), (x, w)),
        "lp": (lp_both, (x, w)),
        "bounds": (ops.linf_dist_bounds, (x - 0.1, x + 0.1, w)),
        "decay": (lambda w: optim.lp_decay_direction(w, 8.0), (wd,)),
    }


def measure(rounds: int = ROUNDS, batch: int = 256, features: int = 512) -> dict:
    """``{family: {"native_ms": t, "xla_ms": t}}``: the fastest of ``rounds`` alternating runs
    of each implementation on this machine, at the layer size of the decision (256 rows of 512
    inputs into 512 neurons) unless ``batch`` and ``features`` say otherwise."""
    import jax

    from linf_jax import ops

    out = {}
    for family, (fn, args) in _cases(batch, features).items():
        compiled = {}
        for choice in ("native", "xla"):
            with ops.use_kernels(choice):
                compiled[choice] = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args).compile()
            jax.block_until_ready(compiled[choice](*args))  # warm-up
        best = {"native": float("inf"), "xla": float("inf")}
        for _ in range(rounds):
            for choice in ("native", "xla"):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[choice](*args))
                best[choice] = min(best[choice], time.perf_counter() - t0)
        out[family] = {"native_ms": 1e3 * best["native"], "xla_ms": 1e3 * best["xla"]}
    return out


def _path():
    lib = native.library_path()
    return None if lib is None else lib.with_suffix(".calibration.json")


def _write_atomic(path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


CALIBRATION_MODES = ("on", "off", "native")


def calibration_mode() -> str:
    """``LINF_JAX_CALIBRATION``: ``'on'`` (unset: measure), ``'off'`` (the instruction-set rule)
    or ``'native'`` (no timing: every pass native wherever the kernels build; the XLA code
    where they do not). A value outside these is a one-line ``ValueError``."""
    mode = os.environ.get(CALIBRATION_ENV, "").strip().lower() or "on"
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"{CALIBRATION_ENV}={mode!r} is not one of "
                         f"{', '.join(map(repr, CALIBRATION_MODES))} (or unset)")
    return mode


def decisions() -> dict[str, bool]:
    """``{family: True if auto runs it native}`` on this machine and build (cached in memory,
    and on disk beside the library); all False where the native kernels are unavailable."""
    with _lock:
        if "decisions" in _state:
            return _state["decisions"]
        mode = calibration_mode()
        if mode in ("off", "native"):
            # no timing; the rule is decided from the instruction set, before any build
            use, rule = ((native.preferred()[0], "instruction-set rule") if mode == "off"
                         else (True, f"{CALIBRATION_ENV}=native"))
            how = "unavailable" if use and not native.available() else rule
            result = dict.fromkeys(FAMILIES, use and how != "unavailable")
        elif not native.available():
            result, how = dict.fromkeys(FAMILIES, False), "unavailable"
        else:
            result, how = _calibrated()
        _state.update(decisions=result, how=how)
        return result


def how_decided() -> str:
    """``'measured'``, ``'cached'`` (measured earlier), ``'instruction-set rule'``,
    ``'LINF_JAX_CALIBRATION=native'`` or ``'unavailable'``."""
    decisions()
    return _state["how"]


def _calibrated() -> tuple[dict[str, bool], str]:
    """The cached decisions, else measured and cached. Processes on one machine take turns (a
    lock file beside the calibration): one measures while the others wait and read its result,
    so no timing runs against another's load and none is repeated."""
    path = _path()
    with native.file_lock(path.with_suffix(".lock")):
        return _read_or_measure(path)


def _read_or_measure(path) -> tuple[dict[str, bool], str]:
    try:
        with open(path) as f:
            cached = json.load(f)
        if set(cached.get("decisions", {})) == set(FAMILIES):
            return {k: bool(v) for k, v in cached["decisions"].items()}, "cached"
    except (OSError, ValueError, TypeError):
        pass
    print(f"linf_jax: timing the native CPU kernels ({native.isa()}) against the XLA code once, "
          "a few seconds", flush=True)
    # In a thread of its own: the first use of a kernel is often inside a trace (jax.jit,
    # jax.eval_shape), and JAX's trace state is per thread, so the timing runs on concrete
    # arrays whatever the caller is tracing.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        times = pool.submit(measure).result()
    result = {f: times[f]["native_ms"] < times[f]["xla_ms"] for f in FAMILIES}
    payload = {"decisions": result, "times": times, "isa": native.isa(),
               "cpu": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        _write_atomic(path, payload)
    except OSError:
        pass  # a read-only cache: measured again next time
    print(f"linf_jax: {summary(result)} (measured; cached in {path})", flush=True)
    return result, "measured"


def summary(result: dict[str, bool]) -> str:
    native_f = [f for f in FAMILIES if result[f]]
    xla_f = [f for f in FAMILIES if not result[f]]
    parts = []
    if native_f:
        parts.append(f"native kernels for {', '.join(native_f)}")
    if xla_f:
        parts.append(f"XLA code for {', '.join(xla_f)}")
    return "; ".join(parts)
