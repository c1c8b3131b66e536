"""Which kernels the distance layers run: a :class:`KernelChoice`, resolved once and recorded.

The request is ``config.kernels`` (a run) or :func:`use_kernels` (code traced inside it), and
``LINF_JAX_KERNELS`` (the process default); each is one of ``auto`` (or unset), ``native``,
``xla``, ``pallas``. ``auto`` means the same wherever it is written: ``LINF_JAX_KERNELS`` when
that names a choice, else the implementation measured faster on this machine for each pass
family (:mod:`linf_jax.ops.calibration`):

* on the CPU, the native kernels or the XLA code (:class:`~linf_jax.ops.calibration.Calibration`:
  timed once per machine and native build);
* on a GPU or TPU, the Pallas kernels or the XLA code, for the families of
  :data:`PALLAS_FAMILIES` (:class:`~linf_jax.ops.calibration.DeviceCalibration`: checked
  against the XLA code and timed once per device kind, JAX version and kernel sources; a kernel
  that fails or disagrees is not used, with one warning); every other family runs the XLA code
  there, and so does every family under ``LINF_JAX_CALIBRATION=off`` or ``native``.

:func:`resolve` turns a request into a :class:`KernelChoice` — which implementation each pass
family runs, and why — once (the native build and the measurements happen there, the first time
they are needed; later resolutions in the process, and later processes through the decision
files, reuse them); a run resolves its choice at its start, traces its programs under it
(:func:`use_kernels` takes the value), writes :meth:`KernelChoice.record` to its ``meta.json``
and prints :meth:`KernelChoice.line`, which builds and times nothing. All choices compute the
same function (docs/METHOD.md §2). Every native call sits in ``jax.lax.platform_dependent``
(:func:`linf_jax.ops.native_cpu.on_cpu`), so a program traced on a CPU host carries the XLA
code for the GPU or TPU it is lowered for. Multi-device programs
(:meth:`KernelChoice.for_partitioned`) run the XLA code for every pass ``auto`` gave to a
custom call (native or Pallas), which XLA's SPMD partitioner would not split.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from linf_jax import native
from linf_jax.config import KERNEL_CHOICES
from linf_jax.ops import calibration
from linf_jax.ops.scoped import Scoped

KERNELS_ENV = "LINF_JAX_KERNELS"
#: The pass families whose implementation is chosen separately (calibration.FAMILIES).
FAMILIES = calibration.FAMILIES
#: The families the Pallas kernels cover: the others run the XLA code under ``pallas``, and
#: ``auto`` measures only these on a GPU or TPU (any subset of ``("linf", "lp", "bounds")``).
PALLAS_FAMILIES = ("linf", "lp", "bounds")

_override = Scoped()


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """A resolved kernel choice: what each pass family runs on ``platform``, and why.

    ``requested``: the request as written (``'auto'``, ``'native'``, ``'xla'``, ``'pallas'``);
    ``source``: where it came from (``'config.kernels'``, ``'LINF_JAX_KERNELS'``,
    ``'use_kernels'`` or ``'default'``); ``passes``: ``(family, implementation)`` for every
    family of :data:`FAMILIES`; ``native_isa``: the native build's instruction set where a pass
    runs native; ``reason``: one phrase saying how the choice was made. Hashable: jitted programs
    take it as a static argument."""

    requested: str
    source: str
    platform: str
    passes: tuple[tuple[str, str], ...]
    native_isa: str | None = None
    reason: str = ""

    def runs(self, family: str) -> str:
        """``'native'``, ``'xla'`` or ``'pallas'``: the implementation of pass ``family``."""
        return dict(self.passes)[family]

    @property
    def backend(self) -> str:
        """``'pallas'`` or ``'native'`` when any pass runs it, else ``'xla'``."""
        kinds = {impl for _, impl in self.passes}
        return next((k for k in ("pallas", "native") if k in kinds), "xla")

    def for_partitioned(self) -> KernelChoice:
        """The choice for a multi-device program: XLA's SPMD partitioner runs a custom call
        unpartitioned (it all-gathers the batch onto every device), so the native and Pallas
        passes chosen by ``auto`` take the XLA code; an explicit ``native`` or ``pallas`` is
        kept."""
        if self.requested in ("native", "pallas") or self.backend == "xla":
            return self
        return dataclasses.replace(
            self, passes=tuple((f, "xla") for f, _ in self.passes),
            native_isa=None, reason=self.reason + "; XLA code in multi-device programs")

    def record(self) -> dict:
        """The choice as JSON (``meta.json``, ``certify.json``, the export's side file)."""
        return {"requested": self.requested, "from": self.source, "platform": self.platform,
                "passes": dict(self.passes), "native_isa": self.native_isa,
                "reason": self.reason}

    def line(self) -> str:
        """One line for the command lines: which kernels run, and why (builds nothing)."""
        backend = self.backend
        if backend == "pallas":
            if self.requested == "pallas":
                return f"kernels: Pallas ({self.platform})"
            which = calibration.implementations_summary(dict(self.passes))
            return f"kernels: {which} ({self.platform}; {self.reason})"
        if backend == "native":
            if self.requested == "native":
                return f"kernels: native CPU ({self.native_isa})"
            which = calibration.summary({f: impl == "native" for f, impl in self.passes})
            return f"kernels: {which} (native CPU build {self.native_isa}; {self.reason})"
        if self.requested != "xla" and (self.platform == "cpu" or self.reason):
            return f"kernels: XLA ({self.platform}; {self.reason})"
        return f"kernels: XLA ({self.platform})"


def _normalized(choice: str | None) -> str:
    text = (choice or "").strip().lower()
    return text or "auto"


def _env_request() -> str:
    """``LINF_JAX_KERNELS`` as written, lower case ('' if unset)."""
    return os.environ.get(KERNELS_ENV, "").strip().lower()


def kernel_request() -> str | KernelChoice:
    """The choice asked for where this is called: the value or request text given to
    :func:`use_kernels` inside it, else ``LINF_JAX_KERNELS`` ('' if unset). Hashable: programs
    jitted once at module level (the evaluation programs of :mod:`linf_jax.certify` and
    :mod:`linf_jax.classifier`) take it as a static argument and trace under it, so another
    choice traces anew."""
    return _override.get() or _env_request()


def resolve(choice: str | None = None, source: str | None = None) -> KernelChoice:
    """The :class:`KernelChoice` of a request (``None`` or ``'auto'``: ``LINF_JAX_KERNELS`` when
    it names a choice, else the automatic one) on the default backend. Builds the native kernels
    and runs the CPU calibration, or checks and times the Pallas kernels on a GPU or TPU, where
    ``auto`` needs them (each once per process, and cached on disk by :mod:`linf_jax.native`
    and :mod:`linf_jax.ops.calibration`); a bad request, or one this platform cannot run, is a
    one-line ``ValueError``."""
    source = source or ("default" if choice is None else "use_kernels")
    if _normalized(choice) == "auto":
        env = _env_request()
        if env and env != "auto":
            choice, source = env, KERNELS_ENV
    requested = _normalized(choice)
    if requested not in KERNEL_CHOICES:
        where = KERNELS_ENV if source == KERNELS_ENV else "kernels"
        raise ValueError(f"{where}={choice!r} is not one of "
                         f"{', '.join(map(repr, KERNEL_CHOICES))} (or unset)")
    return _resolve(requested, source, jax.default_backend())


def _resolve(requested: str, source: str, platform: str) -> KernelChoice:
    cpu = platform == "cpu"

    def every(impl: str) -> tuple[tuple[str, str], ...]:
        return tuple((f, impl) for f in FAMILIES)

    if requested == "xla":
        return KernelChoice(requested, source, platform, every("xla"), reason="as requested")
    if requested == "pallas":
        passes = tuple((f, "pallas" if f in PALLAS_FAMILIES else "xla") for f in FAMILIES)
        how = "interpret mode on the CPU" if cpu else "as requested"
        return KernelChoice(requested, source, platform, passes, reason=how)
    if cpu:
        native.isa()  # a bad LINF_JAX_NATIVE_ISA is a one-line ValueError, not a fallback
    if requested == "native":
        if not cpu:
            raise ValueError(f"{KERNELS_ENV}=native needs the CPU backend, not {platform!r}; use "
                             "'auto' or 'xla'")
        if not native.available():
            raise ValueError(f"{KERNELS_ENV}=native: the native kernels are unavailable "
                             f"({native.unavailable_reason()}); use 'xla'")
        return KernelChoice(requested, source, platform, every("native"), native.isa(),
                            "as requested")
    if not cpu:
        decided = calibration.device_decision(platform, PALLAS_FAMILIES)
        return KernelChoice(requested, source, platform, tuple(decided.passes().items()),
                            reason=decided.reason)
    decided = calibration.decisions()
    how = calibration.how_decided()
    passes = tuple((f, "native" if decided[f] else "xla") for f in FAMILIES)
    if any(decided.values()):
        reason = {"measured": "measured on this machine", "cached": "measured on this machine"
                  }.get(how, how)
        return KernelChoice(requested, source, platform, passes, native.isa(), reason)
    if how == "unavailable":
        reason = f"the native kernels are unavailable: {native.unavailable_reason()}"
    elif how == "instruction-set rule":
        reason = native.preferred()[1]
    else:
        reason = (f"the native kernels ({native.isa()}) were measured slower than the XLA code "
                  "on this machine for every pass")
    return KernelChoice(requested, source, platform, passes, reason=reason)


def active() -> KernelChoice:
    """The choice in force where this is called: the value given to :func:`use_kernels`, or
    the resolution of its request text, of ``LINF_JAX_KERNELS``, or of ``auto``."""
    choice = _override.get()
    if isinstance(choice, KernelChoice):
        return choice
    return resolve(choice, "use_kernels" if choice is not None else None)


def kernel_backend() -> str:
    """``'native'``, ``'xla'`` or ``'pallas'``: :attr:`KernelChoice.backend` of :func:`active`."""
    return active().backend


def use_kernels(choice: str | KernelChoice | None):
    """Traces the code inside with ``choice``: a resolved :class:`KernelChoice`, or a request
    (``'auto'``, ``'native'``, ``'xla'``, ``'pallas'``; ``None``: ``LINF_JAX_KERNELS`` as
    set)."""
    if isinstance(choice, str) and _normalized(choice) not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r} is not one of {KERNEL_CHOICES}")
    return _override.set(choice)


def partitionable(fn):
    """``fn``, traced with :meth:`KernelChoice.for_partitioned` of the choice in force: the
    passes that ``auto`` runs native take the XLA code, which XLA's SPMD partitioner can split
    (multi-device CPU programs: ``config.parallel``, sharded ensembles)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_kernels(active().for_partitioned()):
            return fn(*args, **kwargs)

    return wrapped


def native_ok(*arrays, family: str) -> bool:
    """Whether pass ``family`` runs the native kernels on these operands (float32) under the
    choice in force."""
    return all(a.dtype == jnp.float32 for a in arrays) and active().runs(family) == "native"
