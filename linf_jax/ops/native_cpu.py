"""The native CPU backend: custom VJPs over the XLA FFI custom calls of :mod:`linf_jax.native`.

The custom calls themselves (the C++ kernels, their build, their FFI signatures) are in
:mod:`linf_jax.native`; :mod:`linf_jax.ops` uses them per pass family
(:func:`linf_jax.ops.dispatch.native_ok`), each inside :func:`on_cpu`. The ℓ∞ forward pass
keeps the arg-max and its sign, the backward pass is one custom call doing both scatter-adds.
Under vmap (ensemble members, groups) each custom call takes the vmapped axes as leading
dimensions and runs the members one after the other inside the call.
"""

from __future__ import annotations

import jax
from jax import lax

from linf_jax import native

Array = jax.Array


@jax.custom_vjp
def linf_native(x: Array, w: Array) -> Array:
    return native.linf_max(x, w)


def _linf_native_fwd(x, w):
    y, idx, sign = native.linf_fwd(x, w)
    return y, (x, w, idx, sign)


def _linf_native_bwd(res, g):
    x, w, idx, sign = res
    return native.linf_bwd(idx, sign, g, x.shape, w.shape)

linf_native.defvjp(_linf_native_fwd, _linf_native_bwd)


def on_cpu(cpu_fn, other_fn, *args):
    """``cpu_fn(*args)`` in the program lowered for the CPU, ``other_fn(*args)`` for every other
    platform (``jax.lax.platform_dependent``). The native kernels are CPU custom calls: a program
    traced on a CPU host and lowered (or exported) for a GPU or TPU must carry the XLA code
    there. Lowered for the CPU alone, only ``cpu_fn`` is compiled."""
    return lax.platform_dependent(*args, cpu=cpu_fn, default=other_fn)
