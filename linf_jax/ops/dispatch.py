"""Which kernels the distance layers run: the choice, per lowering platform and per pass.

``LINF_JAX_KERNELS`` (library default) or ``config.kernels`` (a run): unset or ``auto`` (on the
CPU the native kernels for the pass families measured faster on this machine,
:mod:`linf_jax.calibration`; elsewhere the XLA code, except that an explicit ``auto`` takes
Pallas on a GPU), ``native``, ``xla`` or ``pallas``. All of them compute the same function
(docs/METHOD.md §2). :func:`use_kernels` sets the choice
for the code traced inside it; :func:`on_cpu` puts a native call in ``jax.lax.platform_dependent``
so a program traced on a CPU host carries the XLA code for the GPU or TPU it is lowered for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import jax
import jax.numpy as jnp
from jax import lax

from linf_jax import calibration, native
from linf_jax.config import KERNEL_CHOICES

KERNELS_ENV = "LINF_JAX_KERNELS"

_override = threading.local()


def kernel_request() -> str:
    """The choice asked for: :func:`use_kernels` inside it, else ``LINF_JAX_KERNELS`` ('' if
    unset: the default, fixed for the process once decided). Programs jitted once at module
    level and reused across calls (the evaluation programs of :mod:`linf_jax.certify` and
    :mod:`linf_jax.classifier`) take it as a static argument, so another choice traces anew
    instead of reusing a program traced with other kernels."""
    return getattr(_override, "choice", None) or os.environ.get(KERNELS_ENV, "").strip().lower()


def kernel_backend() -> str:
    """``'native'``, ``'xla'`` or ``'pallas'``: the implementation :func:`linf_dist` /
    :func:`lp_dist` use.

    Unset (or ``auto``) on the CPU: ``'native'`` when the native kernels build (linf_jax/native:
    C++ XLA custom calls compiled on first use) and were measured faster than the XLA code on
    this machine for at least one pass family; :func:`native_ok` then picks per family
    (:mod:`linf_jax.calibration`: timed once per machine and build, a few seconds, cached).
    ``'xla'`` otherwise. ``LINF_JAX_KERNELS=native|xla|pallas`` forces one
    (``native`` needs the CPU backend and a C++ compiler; Pallas runs in interpret mode on the
    CPU, slowly); ``=auto`` is Pallas on GPU and the unset default elsewhere. The Pallas kernels
    are opt-in: they are checked in interpret mode and by cross-lowering, and have not been
    compiled or timed on a GPU (BENCHMARKS.md). :func:`use_kernels` overrides the
    variable for the code traced inside it. Read at trace time: set it before the first call of
    a jitted function.
    """
    choice = kernel_request()
    if choice in ("xla", "pallas"):
        return choice
    cpu = jax.default_backend() == "cpu"
    if cpu and choice in ("", "auto", "native"):
        native.isa()  # a bad LINF_JAX_NATIVE_ISA is a one-line ValueError, not a fallback
    if choice == "native":
        if not cpu:
            raise ValueError(f"{KERNELS_ENV}=native needs the CPU backend, not "
                             f"{jax.default_backend()!r}; use 'auto' or 'xla'")
        if not native.available():
            raise ValueError(f"{KERNELS_ENV}=native: the native kernels are unavailable "
                             f"({native.unavailable_reason()}); use 'xla'")
        return choice
    if choice == "auto" and jax.default_backend() == "gpu":
        return "pallas"
    if choice in ("", "auto"):
        return "native" if cpu and any(calibration.decisions().values()) else "xla"
    raise ValueError(f"{KERNELS_ENV}={choice!r} is not one of "
                     f"{', '.join(map(repr, KERNEL_CHOICES))} (or unset)")


def kernels_line() -> str:
    """One line for the command lines' output: which kernels the distance layers run, and why."""
    backend = kernel_backend()
    platform = jax.default_backend()
    if backend == "native":
        if kernel_request() == "native":
            return f"kernels: native CPU ({native.isa()})"
        d = calibration.decisions()
        how = {"measured": "measured on this machine", "cached": "measured on this machine",
               }.get(calibration.how_decided(), calibration.how_decided())
        return f"kernels: {calibration.summary(d)} (native CPU build {native.isa()}; {how})"
    if backend == "pallas":
        return f"kernels: Pallas ({platform})"
    if platform != "cpu" or kernel_request() == "xla":
        return f"kernels: XLA ({platform})"
    how = calibration.how_decided()
    if how == "unavailable":
        why = f"the native kernels are unavailable: {native.unavailable_reason()}"
    elif how == "instruction-set rule":
        why = native.preferred()[1]
    else:
        why = (f"the native kernels ({native.isa()}) were measured slower than the XLA code "
               "on this machine for every pass")
    return f"kernels: XLA (cpu; {why})"


@contextlib.contextmanager
def use_kernels(choice: str | None):
    """Traces the code inside with ``LINF_JAX_KERNELS=choice`` (``None``: the variable as set).
    Sharded programs use it to keep custom calls, which XLA's SPMD partitioner would run
    unpartitioned, out of multi-device CPU programs."""
    if choice is not None and choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r} is not one of {KERNEL_CHOICES}")
    previous = getattr(_override, "choice", None)
    _override.choice = choice
    try:
        yield
    finally:
        _override.choice = previous


def partitionable(fn):
    """``fn``, traced with kernels that XLA's SPMD partitioner can split: with the native CPU
    kernels chosen by default, the XLA kernels instead. The partitioner runs a custom call
    unpartitioned (it all-gathers the batch onto every device), so multi-device CPU programs
    (``--config.parallel``, sharded ensembles) would lose their data parallelism. An explicit
    ``native`` (``LINF_JAX_KERNELS`` or :func:`use_kernels`) is kept."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        explicit = kernel_request() == "native"
        choice = "xla" if kernel_backend() == "native" and not explicit else None
        with use_kernels(choice):
            return fn(*args, **kwargs)

    return wrapped


def native_ok(*arrays, family: str | None = None) -> bool:
    """Whether the native kernels take these operands (float32) under the current choice: for
    ``auto``, where the pass ``family`` (:data:`linf_jax.calibration.FAMILIES`) was measured
    faster native on this machine; always with an explicit ``native``."""
    if not all(a.dtype == jnp.float32 for a in arrays) or kernel_backend() != "native":
        return False
    if family is None or kernel_request() == "native":
        return True
    return calibration.decisions()[family]


def on_cpu(cpu_fn, other_fn, *args):
    """``cpu_fn(*args)`` in the program lowered for the CPU, ``other_fn(*args)`` for every other
    platform (``jax.lax.platform_dependent``). The native kernels are CPU custom calls: a program
    traced on a CPU host and lowered (or exported) for a GPU or TPU must carry the XLA code
    there. Lowered for the CPU alone, only ``cpu_fn`` is compiled."""
    return lax.platform_dependent(*args, cpu=cpu_fn, default=other_fn)


def pallas_module():
    """The Pallas kernels module and the interpret flag for this backend (lazy import)."""
    from linf_jax.ops import pallas

    return pallas, jax.default_backend() == "cpu"
