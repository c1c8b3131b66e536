"""Ensembles as one stacked pytree.

K members of the same architecture are one variables pytree whose every leaf has a leading axis
of size K; ``jax.vmap`` over the single-model function evaluates (or trains) all of them in one
program. The ensemble's logits are the mean of the members' logits, and its worst-case margins
the mean of the members' margins: an average of 1-Lipschitz maps is 1-Lipschitz and an average
of upper bounds bounds the average, so both certificates stay sound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linf_jax.config import EXECUTIONS
from linf_jax.errors import EnsembleError


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or "<root>"


def stack(members: Sequence[Any]) -> Any:
    """Stacks K variable pytrees into one with a leading member axis.

    Raises :class:`EnsembleError` naming the first leaf whose structure, shape or dtype differs.
    """
    if not members:
        raise EnsembleError("ensemble: no members to stack")
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(members[0])
    ref_paths = [_path_str(p) for p, _ in ref_leaves]
    for i, member in enumerate(members[1:], start=1):
        leaves, _ = jax.tree_util.tree_flatten_with_path(member)
        paths = [_path_str(p) for p, _ in leaves]
        if paths != ref_paths:
            differ = next((a for a, b in zip(ref_paths, paths, strict=False) if a != b),
                          ref_paths[len(paths)] if len(paths) < len(ref_paths)
                          else paths[len(ref_paths)])
            raise EnsembleError(
                f"ensemble member {i}: parameter {differ!r} differs from member 0 "
                "(members must share one architecture)")
        for path, (_, a), (_, b) in zip(ref_paths, ref_leaves, leaves, strict=True):
            if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                raise EnsembleError(
                    f"ensemble member {i}: parameter {path!r} has shape {np.shape(b)} "
                    f"{jnp.result_type(b)}, member 0 has {np.shape(a)} {jnp.result_type(a)}")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def size(stacked: Any) -> int:
    """The number of members K of a stacked pytree."""
    return int(jax.tree.leaves(stacked)[0].shape[0])


def unstack(stacked: Any) -> list[Any]:
    """Inverse of :func:`stack`."""
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(size(stacked))]


def resolve_execution(execution: str = "auto", sharded: bool = False,
                      training: bool = False, platform: str | None = None) -> str:
    """``'batched'`` or ``'sequential'``: how :func:`members_map` runs the member axis on
    ``platform`` (None: the default backend).

    ``'auto'`` is ``'batched'`` (``jax.vmap``) on accelerators, where one small member leaves the
    device idle, and whenever the member axis is sharded over devices. On the CPU it is what
    was measured fastest there (benchmarks/ensemble_bench.py, BENCHMARKS.md): ``'sequential'``
    for evaluation and certification (batched, the interval bounds' running carries grow K-fold
    and fall out of cache) and ``'batched'`` for training steps (there the sequential program
    paid for slicing the stacked state in and out, 5-10% at K = 5). :func:`members_map` makes
    the evaluation's choice per lowering platform, so a program traced on a CPU host runs its
    members batched on a GPU.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"ensemble.execution={execution!r} is not allowed: one of {EXECUTIONS}")
    if execution == "auto":
        cpu = (platform or jax.default_backend()) == "cpu"
        return "sequential" if cpu and not sharded and not training else "batched"
    return execution


def members_map(fn, in_axes=0, execution: str = "auto"):
    """``jax.vmap(fn, in_axes)`` over the member axis, as one traced program either way.

    ``execution``: ``'batched'`` is ``jax.vmap``; ``'sequential'`` is ``lax.map`` over the
    members (a loop inside the compiled program, still jit-able and differentiable), with the
    same outputs up to float rounding; ``'auto'`` is the evaluation's choice of
    :func:`resolve_execution` for the platform the program is lowered for
    (``lax.platform_dependent``: sequential in a CPU program, batched in a GPU/TPU one). Callers
    that resolve ``'auto'`` otherwise (training steps, sharded members) pass the result.
    ``in_axes`` is 0, or a tuple of 0/None per positional argument (None: shared by every
    member).
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"ensemble.execution={execution!r} is not allowed: one of {EXECUTIONS}")
    batched = jax.vmap(fn, in_axes=in_axes)
    if execution == "batched":
        return batched

    def mapped(*args):
        where = _member_args(in_axes, args)
        return lax.map(lambda member_args: fn(*_with(args, where, member_args)),
                       tuple(args[i] for i in where))

    if execution == "sequential":
        return mapped

    def per_platform(*args):
        where = _member_args(in_axes, args)

        def branch(run):  # shared arguments stay closed over (static where static)
            return lambda *member_args: run(*_with(args, where, member_args))

        return lax.platform_dependent(*(args[i] for i in where), cpu=branch(mapped),
                                      default=branch(batched))

    return per_platform


def _member_args(in_axes, args) -> list[int]:
    """The positions of the arguments with a member axis."""
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(axes) != len(args) or any(a not in (0, None) for a in axes):
        raise ValueError(f"members_map: in_axes={in_axes!r} must be 0 or a tuple of 0/None "
                         f"per argument ({len(args)} given)")
    return [i for i, a in enumerate(axes) if a == 0]


def _with(args, where, values) -> list:
    """``args`` with the arguments at positions ``where`` replaced by ``values``."""
    full = list(args)
    for i, a in zip(where, values, strict=True):
        full[i] = a
    return full


def vmap_members(fn, stacked: Any, *args, execution: str = "auto", **kwargs):
    """``[fn(member, *args, **kwargs) for member in members]`` as one call over the stacked
    pytree (:func:`members_map`); outputs gain a leading member axis. Positional/keyword args
    are shared by all members."""
    return members_map(lambda v: fn(v, *args, **kwargs), execution=execution)(stacked)


def mean_over_members(fn, stacked: Any, *args, execution: str = "auto", **kwargs):
    """The member-average of ``fn``'s outputs (any pytree), one call over the members."""
    out = vmap_members(fn, stacked, *args, execution=execution, **kwargs)
    return jax.tree.map(lambda a: a.mean(axis=0), out)


def apply(model, stacked_variables: Any, *args, execution: str = "auto", **kwargs):
    """Averaged ``model.apply`` over the members: the ensemble's logits (or ``(logits, margins)``
    with ``eps=``, or its certified margins with ``method='certify_margins'``)."""
    return mean_over_members(model.apply, stacked_variables, *args, execution=execution,
                             **kwargs)
