"""Native CPU kernels for the ℓ∞ and ℓp distances: XLA FFI custom calls built on first use.

XLA's CPU backend compiles the running max and the running arg-max of the ℓ∞ forward pass as two
sibling loop fusions that each recompute ``|x − w|`` (BENCHMARKS.md), so there the arg-max that
the backward pass needs costs about as much as the forward pass itself. The C++ sources beside
this module, one file per kernel family, keep both in one register-tiled loop and do the
backward scatter-adds in one pass (``linf.cc``), compute the interval bounds of certification
the same way (``bounds.cc``), run the sum pass of the stable ℓp form and its analytic backward
pass, computing each ``(|d|/y)^(p−1)`` once for both reductions (``lp.cc``; integer p by
repeated squaring, other p by a vector exp/log, ``powers.h``), the optimiser's ℓp weight
decay (``lp_decay.cc``), and SortNet's inference neuron and its bounds, a weighted top K of
``|x − w|`` per pair (``sort.cc``); ``common.h`` holds what they share, and ``linf_cpu.cc``,
the one translation unit that is compiled, includes them all. :mod:`linf_jax.ops` uses the
kernels on the CPU for float32 operands (``LINF_JAX_KERNELS``, see
:func:`linf_jax.ops.kernel_backend`).
Under ``jax.vmap`` (ensemble members, groups) the kernels take the vmapped axes as leading
dimensions and loop over them inside one call.

A :class:`NativeBuild` is one build of the library, made from its inputs: the CPU's feature
flags, the machine name, the cache folder, the requested instruction set, the compiler and its
flags. :meth:`NativeBuild.from_environment` reads them from this machine and process; the
module-level functions (:func:`available`, :func:`isa`, :func:`linf_fwd`, ...) use one such
build per process, :func:`default`, made from the environment the first time it is needed.

The library is compiled with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/
``clang++``; ``-O3`` and the instruction set of :func:`isa`; the time it takes: BENCHMARKS.md)
the first time it is needed and cached under ``$LINF_JAX_CACHE`` (default
``~/.cache/linf_jax``), keyed by every source and header, the compiler, the flags, jaxlib and
the CPU's feature flags, so a shared home directory never serves a library built for another
CPU.

Instruction sets. ``LINF_JAX_NATIVE_ISA`` picks the variant that is built: ``native`` (the
default: ``-march=native``, i.e. what this CPU has), ``avx512`` (``-march=x86-64-v4``), ``avx2``
(``-march=x86-64-v3``: AVX2 and FMA) or ``generic`` (the compiler's baseline for the machine).
One x86 machine with AVX-512 can so build and time the variants that other x86 CPUs would run.
The vector width and register tile follow the instruction set (``_TILES``): 16 lanes and 4x2
tiles fill AVX-512's 32 registers; AVX2 has 16 registers of 8 floats, where those tiles would
spill, so its variant uses 8 lanes and 2x2 tiles. The kernels are tuned on AVX-512 CPUs, and how
a variant compares with the XLA code depends on the machine (BENCHMARKS.md). So whether
``LINF_JAX_KERNELS`` unset or ``auto`` uses them is measured per pass on the machine itself
(:mod:`linf_jax.ops.calibration`); :func:`preferred` is the fixed rule used instead with
``LINF_JAX_CALIBRATION=off``: native only where the variant is ``avx512``.

Writes are atomic (temporary file, then rename), and concurrent processes on one machine (the
hosts of a local multi-process run, a test session's workers) take turns through a lock file
beside the library: one builds, the others wait and load its result instead of each compiling
the same library again (:func:`file_lock`). If no compiler is found or the build fails,
:func:`available` is False, :func:`unavailable_reason` says why, a warning is issued once, and
:mod:`linf_jax.ops` uses its XLA kernels, which give the same results. The build announces
itself in one INFO record of the ``linf_jax.native`` logger.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
#: The one translation unit the build compiles; it includes the kernel families' sources.
SOURCE = _HERE / "linf_cpu.cc"
#: Every source and header of the library (what the cache key hashes).
SOURCES = tuple(sorted([*_HERE.glob("*.cc"), *_HERE.glob("*.h")]))
CACHE_ENV = "LINF_JAX_CACHE"
ISA_ENV = "LINF_JAX_NATIVE_ISA"
ISA_CHOICES = ("native", "avx512", "avx2", "generic")
_MARCH = {"avx512": ("-march=x86-64-v4",), "avx2": ("-march=x86-64-v3",), "generic": ()}
# (lanes per vector, input rows and weight rows per register tile) per instruction set, passed to
# the sources as LINF_VW / LINF_TB / LINF_TO (common.h). AVX-512: 32 registers of 16 floats hold
# 4x2 tiles; AVX2 has 16 registers of 8 floats, where 16-lane 4x2 tiles spill and run many
# times slower than 8 lanes and 2x2 tiles, which fit (BENCHMARKS.md). NEON (32 registers of 4)
# and the SSE2 baseline (16 of 4): 4 lanes.
_TILES = {"avx512": (16, 4, 2), "avx2": (8, 2, 2), "neon": (4, 4, 2), "generic": (4, 2, 2)}
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
_AVX2 = ("avx2", "fma")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"LinfDistFwd": "linf_jax_linf_fwd", "LinfDistMax": "linf_jax_linf_max",
            "LinfDistBwd": "linf_jax_linf_bwd", "LinfBounds": "linf_jax_linf_bounds",
            "LpSum": "linf_jax_lp_sum", "LpBwd": "linf_jax_lp_bwd",
            "LpDecay": "linf_jax_lp_decay", "SortDistFwd": "linf_jax_sort_fwd",
            "SortDistMax": "linf_jax_sort_max", "SortDistBwd": "linf_jax_sort_bwd",
            "SortBounds": "linf_jax_sort_bounds"}


def find_compiler() -> str | None:
    """The C++ compiler a build from the environment uses: ``$CXX``, else the first of ``c++``,
    ``g++``, ``clang++`` on the ``PATH`` (its full path); None if there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_flags() -> str:
    """This CPU's feature flags: the ``flags`` (x86) or ``Features`` (ARM) line of
    ``/proc/cpuinfo``, else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    """``$LINF_JAX_CACHE``, else ``$XDG_CACHE_HOME/linf_jax`` or ``~/.cache/linf_jax``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "linf_jax")
    return Path(root)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock across processes on ``path`` (created if missing) for the ``with``
    block; where the lock cannot be taken (no ``fcntl``, as on Windows, or a read-only folder)
    the block runs unlocked, which costs only duplicate work: every write is atomic."""
    try:
        import fcntl
        handle = open(path, "a")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The FFI targets are registered with JAX once per process (JAX keeps one handler per target
# name, process-wide): the first library loaded serves them, and its ctypes handle stays here so
# that it is never unloaded.
_registry_lock = threading.Lock()
_registered: dict = {}


def _register(path: Path) -> None:
    with _registry_lock:
        if not _registered:
            lib = ctypes.cdll.LoadLibrary(str(path))
            for symbol, name in _TARGETS.items():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _registered.update(path=path, lib=lib)
        elif _registered["path"] != path:
            raise RuntimeError(f"another build of the native kernels ({_registered['path']}) "
                               "already serves this process (JAX keeps one handler per target)")


class NativeBuild:
    """One build of the native kernels, from its inputs.

    ``cpu_flags``: the CPU's feature flags (a ``/proc/cpuinfo`` flags line, :func:`cpu_flags`);
    ``machine``: the machine name (:func:`platform.machine`, e.g. ``'x86_64'``, ``'aarch64'``);
    ``cache_dir``: the folder of the built libraries; ``requested_isa``: the instruction set asked
    for, as ``LINF_JAX_NATIVE_ISA`` spells it (``''``: ``native``; checked when used, so a bad
    value is a one-line ``ValueError`` there); ``compiler``: the C++ compiler's path (None: none,
    so the kernels are unavailable); ``flags``: the compiler flags besides the target ones.

    Nothing is built before :meth:`build` or :meth:`available` needs it; :meth:`available` builds
    (once per cache key), loads and registers the library once per object."""

    def __init__(self, cpu_flags: str, machine: str, cache_dir: Path | str,
                 requested_isa: str = "native", compiler: str | None = None,
                 flags: tuple[str, ...] = FLAGS):
        self.cpu_flags = cpu_flags
        self.machine = machine
        self.cache_dir = Path(cache_dir)
        self.requested = requested_isa
        self.compiler = compiler
        self.flags = tuple(flags)
        self._lock = threading.Lock()
        self._loaded: dict | None = None  # {"ok", "path", "reason"} once load() has run

    @classmethod
    def from_environment(cls, **overrides) -> NativeBuild:
        """The build this process asks for: this CPU's flags and machine name,
        ``$LINF_JAX_CACHE``, ``$LINF_JAX_NATIVE_ISA`` and :func:`find_compiler`; keyword
        arguments of the constructor replace any of them."""
        inputs = dict(cpu_flags=cpu_flags(), machine=platform.machine(), cache_dir=cache_dir(),
                      requested_isa=os.environ.get(ISA_ENV, ""), compiler=find_compiler())
        inputs.update(overrides)
        return cls(**inputs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(machine={self.machine!r}, requested_isa="
                f"{self.requested!r}, cache_dir={str(self.cache_dir)!r}, "
                f"compiler={self.compiler!r})")

    # -- what is built ------------------------------------------------------------------------

    def cpu_has(self, *features: str) -> bool:
        """Whether every one of ``features`` is among the CPU's flags."""
        words = set(self.cpu_flags.split())
        return all(f in words for f in features)

    def _x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64")

    def requested_isa(self) -> str:
        """The requested instruction set (``'native'`` if empty); a bad value raises
        ``ValueError``."""
        choice = (self.requested or "").strip().lower() or "native"
        if choice not in ISA_CHOICES:
            raise ValueError(f"{ISA_ENV}={choice!r} is not allowed: one of "
                             f"{', '.join(ISA_CHOICES)} (or unset)")
        return choice

    def isa(self) -> str:
        """The instruction set the kernels are (or would be) built for: ``'avx512'``,
        ``'avx2'``, ``'neon'`` (aarch64) or ``'generic'``. ``native`` resolves to what this CPU
        has; an x86 variant this CPU cannot run is refused (``ValueError``)."""
        choice = self.requested_isa()
        x86 = self._x86()
        if choice == "native":
            if x86 and self.cpu_has(*_AVX512):
                return "avx512"
            if x86 and self.cpu_has(*_AVX2):
                return "avx2"
            if self.machine.lower() in ("aarch64", "arm64"):
                return "neon"
            return "generic"
        if choice in ("avx512", "avx2"):
            need = _AVX512 if choice == "avx512" else _AVX2
            if not (x86 and self.cpu_has(*need)):
                raise ValueError(f"{ISA_ENV}={choice}: this CPU cannot run it "
                                 f"({self.machine}, needs {', '.join(need)}); allowed here: "
                                 "native, generic" + (", avx2" if x86 and self.cpu_has(*_AVX2)
                                                      else ""))
        return choice

    def march(self) -> tuple[str, ...]:
        """The target flags of the build: the instruction set and its vector width and tiles."""
        requested = self.requested_isa()
        march = ("-march=native",) if requested == "native" else _MARCH[requested]
        vw, tb, to = _TILES[self.isa()]
        return (*march, f"-DLINF_VW={vw}", f"-DLINF_TB={tb}", f"-DLINF_TO={to}")

    def preferred(self) -> tuple[bool, str]:
        """``(use, why)``: the instruction-set rule (``LINF_JAX_CALIBRATION=off``): whether the
        automatic choice takes the native kernels on this CPU, and one phrase saying why.
        Decided from the instruction set alone, before any build: native only for the AVX-512
        variant, the kind the kernels are tuned for."""
        try:
            variant = self.isa()
        except ValueError as e:
            return False, str(e)
        if variant == "avx512":
            return True, "AVX-512 CPU, where they were measured faster than the XLA code"
        return False, (f"this CPU's native kernel variant is {variant}; the native kernels are "
                       "the default only on AVX-512 CPUs, where they were measured faster "
                       "(LINF_JAX_KERNELS=native forces them)")

    # -- building -----------------------------------------------------------------------------

    def build(self) -> Path:
        """Compiles the library (once per sources, compiler, flags, jaxlib and CPU: the file
        name holds the key) and returns its path; cached, it is only looked up."""
        import jaxlib

        cxx = self.compiler
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[:1]
        sources = [f"{path.name}\n{path.read_text()}" for path in SOURCES]
        key = hashlib.sha256("\n".join([
            *sources, cxx, *version, *self.flags, *self.march(), jaxlib.__version__,
            self.machine, self.cpu_flags]).encode()).hexdigest()[:16]
        target = self.cache_dir / f"linf_cpu-{self.isa()}-{key}.so"
        if target.exists():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(target.parent, os.W_OK):
                raise PermissionError(target.parent)
        except OSError:  # a read-only home: a per-user temporary directory instead
            user = os.getuid() if hasattr(os, "getuid") else "user"
            target = Path(tempfile.gettempdir()) / f"linf_jax-{user}" / target.name
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(target.with_suffix(".lock")):
            if target.exists():  # built by another process while this one waited
                return target
            self.compile(target)
        return target

    def lock(self, path: Path):
        """The lock that builders of one library take turns through: :func:`file_lock`."""
        return file_lock(path)

    def compile(self, target: Path) -> None:
        """Runs the compiler into a temporary file beside ``target``, then renames it there
        (atomic: concurrent builders each write their own temporary file)."""
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        # One line before the compiler's silence.
        _log.info("building the native CPU kernels (%s) once, about 10-60 s; cached in %s",
                  self.isa(), target.parent)
        try:
            cmd = [self.compiler, *self.flags, *self.march(), "-isystem",
                   jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
                raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {tail}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- loading ------------------------------------------------------------------------------

    def _load(self) -> dict:
        """Builds (if needed), loads and registers the kernels, once per object."""
        with self._lock:
            if self._loaded is None:
                try:
                    path = self.build()
                    _register(path)
                    self._loaded = {"ok": True, "path": path, "reason": None}
                except Exception as e:  # any failure means: use the XLA kernels
                    reason = f"{type(e).__name__}: {e}"
                    self._loaded = {"ok": False, "path": None, "reason": reason}
                    warnings.warn(f"linf_jax: the native CPU kernels are unavailable ({reason}); "
                                  "using the XLA kernels (same results, slower)", RuntimeWarning,
                                  stacklevel=3)
            return self._loaded

    def available(self) -> bool:
        """True if the kernels are built and registered (builds them on the first call)."""
        return self._load()["ok"]

    def library_path(self) -> Path | None:
        """The shared library in use (None when unavailable); its calibration sits beside it."""
        return self._load()["path"]

    def unavailable_reason(self) -> str | None:
        """Why :meth:`available` is False (``None`` if it is True)."""
        return self._load()["reason"]


_default_lock = threading.Lock()
_default: NativeBuild | None = None


def default() -> NativeBuild:
    """The process-wide build that the module-level functions use: made from the environment
    (:meth:`NativeBuild.from_environment`) the first time it is needed, unless
    :func:`set_default` gave one."""
    global _default
    with _default_lock:
        if _default is None:
            _default = NativeBuild.from_environment()
        return _default


def set_default(build: NativeBuild | None) -> NativeBuild | None:
    """Makes ``build`` the process-wide build (None: made from the environment when next
    needed) and returns the previous one (None if none was made yet). The FFI targets stay
    those of the first library loaded in the process."""
    global _default
    with _default_lock:
        previous, _default = _default, build
        return previous


def requested_isa() -> str:
    """``LINF_JAX_NATIVE_ISA`` (``'native'`` if unset); a bad value raises ``ValueError``."""
    return default().requested_isa()


def isa() -> str:
    """:meth:`NativeBuild.isa` of the process-wide build."""
    return default().isa()


def preferred() -> tuple[bool, str]:
    """:meth:`NativeBuild.preferred` of the process-wide build."""
    return default().preferred()


def available() -> bool:
    """True if the native kernels are built and registered (builds them on the first call)."""
    return default().available()


def library_path() -> Path | None:
    """The shared library in use (None when unavailable); its calibration sits beside it."""
    return default().library_path()


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (``None`` if it is True)."""
    return default().unavailable_reason()


def export_disabled_checks() -> list:
    """The ``disabled_checks`` that ``jax.export.export`` needs for a program whose CPU part
    carries the native kernels: they are this library's own custom calls, built on the machine
    that runs them, with no cross-version compatibility guarantee (an exported program is to be
    run where linf_jax registers them). Programs lowered for GPUs or TPUs never contain them
    (:func:`linf_jax.ops.on_cpu`)."""
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in _TARGETS.values()]


def _call(name: str, out_types, *args, **attrs):
    build = default()
    if not build.available():
        raise RuntimeError(f"linf_jax native kernels unavailable: {build.unavailable_reason()}")
    # Under vmap the kernels take the batch as leading dimensions (an unbatched operand gets a
    # size-1 one) and loop over it inside one call: no slicing and stacking around K calls.
    return jax.ffi.ffi_call(name, out_types, vmap_method="expand_dims")(*args, **attrs)


def _shape(x, w, dtype):
    return jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), dtype)


def linf_max(x, w):
    """``max_i |x[b, i] − w[o, i]|`` → ``[B, out]`` float32 (no arg-max: nothing to
    differentiate)."""
    return _call(_TARGETS["LinfDistMax"], _shape(x, w, jnp.float32), x, w)


def linf_fwd(x, w):
    """``(y, idx, sign)``: the max, the first arg-max (int32) and ``sign(x − w)`` there (int8)."""
    return _call(_TARGETS["LinfDistFwd"], (_shape(x, w, jnp.float32), _shape(x, w, jnp.int32),
                                           _shape(x, w, jnp.int8)), x, w)


def linf_bwd(idx, sign, g, x_shape, w_shape):
    """``(gx, gw)``: ``gx[b, idx] += g·sign``, ``gw[o, idx] −= g·sign``."""
    return _call(_TARGETS["LinfDistBwd"], (jax.ShapeDtypeStruct(x_shape, jnp.float32),
                                           jax.ShapeDtypeStruct(w_shape, jnp.float32)),
                 idx, sign, g.astype(jnp.float32))


def linf_bounds(lower, upper, w):
    """``(lo, hi)``: the exact interval of ``||z − w[o]||_∞`` over ``lower ≤ z ≤ upper``."""
    shape = _shape(lower, w, jnp.float32)
    return _call(_TARGETS["LinfBounds"], (shape, shape), lower, upper, w)


def _k_attr(k: int | None) -> np.int32:
    """The kernels' exponent switch: an integer p in 1..8 (repeated squaring), or -1 (general p,
    ``exp(p·log t)``)."""
    if k is not None and not 1 <= k <= 8:
        raise ValueError(f"k={k} is not an integer p in 1..8 (or None for a general p)")
    return np.int32(-1 if k is None else k)


def lp_sum(x, w, inv_m, p, k: int | None):
    """``s[b, o] = Σ_i (|x[b, i] − w[o, i]|·inv_m[b, o])^p`` (the stable ℓp form's sum pass)."""
    p = jnp.asarray(p, jnp.float32).reshape(1, 1)
    return _call(_TARGETS["LpSum"], _shape(x, w, jnp.float32), x, w, inv_m, p, k=_k_attr(k))


def lp_bwd(x, w, inv_y, g, p, k: int | None):
    """``(gx, gw)`` of the ℓp distance: ``G = sign(d)·max(|d|·inv_y, 1e-30)^(p−1)·g``,
    ``gx = Σ_o G``, ``gw = −Σ_b G``."""
    p = jnp.asarray(p, jnp.float32).reshape(1, 1)
    return _call(_TARGETS["LpBwd"], (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                     jax.ShapeDtypeStruct(w.shape, jnp.float32)),
                 x, w, inv_y, g.astype(jnp.float32), p, k=_k_attr(k))


def lp_decay(w, p, k: int | None):
    """``(|w|/‖w‖_p)^(p−2)·w`` (the gradient of ``½‖w‖_p²``, docs/METHOD.md §6) per row of
    ``w [out, n]`` (at p = ∞: ``w`` where ``|w|`` is the row's maximum, 0 elsewhere; 0 for a
    zero row). ``k``: ``p − 2`` as an integer in 0..8 (repeated squaring), or None (the value
    of ``p``: exp/log, or the p = ∞ select)."""
    if k is not None and not 0 <= k <= 8:
        raise ValueError(f"k={k} is not an integer p - 2 in 0..8 (or None for a general p)")
    p = jnp.asarray(p, jnp.float32).reshape(1, 1)
    return _call(_TARGETS["LpDecay"], jax.ShapeDtypeStruct(w.shape, jnp.float32), w, p,
                 k=np.int32(-1 if k is None else k))


def _omega(omega):
    """SortNet's weights as the kernels take them: float32 ``[1, K]``."""
    return jnp.asarray(omega, jnp.float32).reshape(1, -1)


def sort_max(x, w, omega):
    """SortNet's inference neuron ``Σ_j ω_j d_(j)`` over the K = ``len(omega)`` largest
    ``|x[b, i] − w[o, i]|`` (equal values: the first coordinate first) → ``[B, out]``."""
    return _call(_TARGETS["SortDistMax"], _shape(x, w, jnp.float32), x, w, _omega(omega))


def sort_fwd(x, w, omega):
    """``(y, idx, sign)``: :func:`sort_max`, the K coordinates (int32, largest first) and
    ``sign(x − w)`` there (int8), ``[B, out·K]`` each."""
    k = np.shape(omega)[-1]
    res = (x.shape[0], w.shape[0] * k)
    return _call(_TARGETS["SortDistFwd"], (_shape(x, w, jnp.float32),
                                           jax.ShapeDtypeStruct(res, jnp.int32),
                                           jax.ShapeDtypeStruct(res, jnp.int8)),
                 x, w, _omega(omega))


def sort_bwd(idx, sign, g, omega, x_shape, w_shape):
    """``(gx, gw)``: ``gx[b, i_j] += g·ω_j·sign_j``, ``gw[o, i_j] −= g·ω_j·sign_j``."""
    return _call(_TARGETS["SortDistBwd"], (jax.ShapeDtypeStruct(x_shape, jnp.float32),
                                           jax.ShapeDtypeStruct(w_shape, jnp.float32)),
                 idx, sign, g.astype(jnp.float32), _omega(omega))


def sort_bounds(lower, upper, w, omega):
    """``(lo, hi)``: :func:`sort_max`'s weighted top K of ``max(l − w, w − u, 0)`` and of
    ``max(u − w, w − l)``, the exact interval of the neuron over ``lower ≤ z ≤ upper``."""
    shape = _shape(lower, w, jnp.float32)
    return _call(_TARGETS["SortBounds"], (shape, shape), lower, upper, w, _omega(omega))
