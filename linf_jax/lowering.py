"""How a program lowers for a platform, checked from any host.

A program traced on a CPU host can be lowered for a GPU or a TPU (``jax.jit(f).trace(...)
.lower(lowering_platforms=...)``, or ``jax.export``): every platform-dependent piece of
linf-jax (the native CPU kernels, the XLA code's tiling, the ensembles' member loop) sits in a
``lax.platform_dependent`` switch, and only the target's branch is lowered. This module answers
the questions about such a program that decide its speed and its portability, without the
device:

* :func:`loop_iterations`: how many sequential loop iterations one call runs on a platform
  (each iteration of a loop in the XLA program launches its body's kernels one after the other,
  so on a GPU or a TPU thousands of them cost more than the arithmetic);
* :func:`custom_calls`: which custom calls the lowered program makes (no CPU custom call may
  reach a GPU/TPU program; the Pallas kernels are ``__gpu$xla.gpu.triton`` on CUDA and
  ``tpu_custom_call`` on TPU).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
from jax.extend import core as jex_core

#: The names ``lax.platform_dependent`` branches may be keyed by, per lowering platform.
PLATFORM_NAMES = {"cpu": ("cpu",), "cuda": ("cuda", "gpu"), "rocm": ("rocm", "gpu"),
                  "tpu": ("tpu",)}


@dataclasses.dataclass(frozen=True)
class LoopCount:
    """Sequential loop iterations of one call of a program lowered for a platform.

    ``program``: iterations of the loops of the XLA program (``scan``/``fori_loop``/``lax.map``,
    nested loops multiplied), the worst branch of every data-dependent ``cond`` and the
    platform's branch of every ``platform_dependent`` switch; ``kernel``: iterations of the
    loops inside Pallas kernels, per kernel instance, plus the grid's steps on a TPU, where a
    kernel's grid runs one step after the other (on a GPU it runs in parallel); ``unbounded``:
    ``while`` loops whose trip count is not static (not counted)."""

    program: int = 0
    kernel: int = 0
    unbounded: int = 0

    def __add__(self, other: LoopCount) -> LoopCount:
        return LoopCount(self.program + other.program, self.kernel + other.kernel,
                         self.unbounded + other.unbounded)

    def times(self, n: int) -> LoopCount:
        return LoopCount(self.program * n, self.kernel * n, self.unbounded * n)


def _jaxprs_in(params: dict):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def _branch_for(branches_platforms, platform: str) -> int:
    names = PLATFORM_NAMES.get(platform, (platform,))
    default = None
    for i, plats in enumerate(branches_platforms):
        if plats is None:
            default = i
        elif any(p in names for p in plats):
            return i
    if default is None:
        raise ValueError(f"a platform_dependent switch has no branch for {platform!r}")
    return default


def _max(counts: list[LoopCount]) -> LoopCount:
    return max(counts, key=lambda c: (c.program, c.kernel), default=LoopCount())


def _count(jaxpr, platform: str, in_kernel: bool) -> LoopCount:
    total = LoopCount()
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "scan":
            body = _count(params["jaxpr"].jaxpr, platform, in_kernel)
            n = int(params["length"])
            # As JAX lowers a scan: length // unroll iterations of ``unroll`` bodies, the
            # remainder inlined after the loop; fully unrolled (unroll = length, or 0) is no
            # loop at all.
            unroll = int(params.get("unroll", 1))
            steps = 0 if unroll == 0 or (unroll != 1 and unroll == n) else n // unroll
            own = LoopCount(kernel=steps) if in_kernel else LoopCount(program=steps)
            total += own + body.times(n)
        elif name == "while":
            body = _count(params["body_jaxpr"].jaxpr, platform, in_kernel)
            total += LoopCount(unbounded=1) + body
        elif name == "cond":
            branches = [b.jaxpr for b in params["branches"]]
            where = params.get("branches_platforms")
            if where is not None:
                total += _count(branches[_branch_for(where, platform)], platform, in_kernel)
            else:
                total += _max([_count(b, platform, in_kernel) for b in branches])
        elif name == "pallas_call":
            kernel = params["jaxpr"]
            kernel = getattr(kernel, "jaxpr", kernel)
            inner = _count(kernel, platform, in_kernel=True)
            grid = 1
            for g in getattr(params["grid_mapping"], "grid", ()):
                grid *= int(g) if isinstance(g, int) else 1
            if platform == "tpu":  # the grid is a sequential loop on a TPU core
                inner = LoopCount(kernel=grid) + inner.times(grid)
            total += inner
        else:
            for sub in _jaxprs_in(params):
                total += _count(sub, platform, in_kernel)
    return total


def loop_iterations(fn: Callable, *args, platform: str, **kwargs) -> LoopCount:
    """The :class:`LoopCount` of ``fn(*args, **kwargs)`` (arrays or ``jax.ShapeDtypeStruct``;
    nothing is computed or allocated) lowered for ``platform`` (``'cpu'``, ``'cuda'``,
    ``'rocm'``, ``'tpu'``), traced under the kernel choice in force here."""
    return count(jax.make_jaxpr(fn)(*args, **kwargs), platform)


def count(jaxpr, platform: str) -> LoopCount:
    """The :class:`LoopCount` of a traced program (a ``ClosedJaxpr``, e.g. the ``.jaxpr`` of
    ``jax.jit(f).trace(...)``, whose ``.lower(lowering_platforms=...)`` gives its program)
    lowered for ``platform``."""
    return _count(getattr(jaxpr, "jaxpr", jaxpr), platform, in_kernel=False)


def lowered_text(fn: Callable, *args, platform: str, static_argnames=(), **kwargs) -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for ``platform`` from this host."""
    jitted = jax.jit(fn, static_argnames=static_argnames)
    return jitted.trace(*args, **kwargs).lower(lowering_platforms=(platform,)).as_text()


_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call\s*@([\w$.\-]+)|call_target_name\s*=\s*"([^"]+)"')


def custom_calls(text: str) -> set[str]:
    """The custom-call targets a lowered program (StableHLO text) makes."""
    return {a or b for a, b in _CUSTOM_CALL.findall(text)}
