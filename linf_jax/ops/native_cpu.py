"""The native CPU backend: custom VJPs over the XLA FFI custom calls of :mod:`linf_jax.native`.

The custom calls themselves (the C++ kernels, their build, their FFI signatures) are in
:mod:`linf_jax.native`; :mod:`linf_jax.ops` uses them per pass family through
:func:`linf_jax.ops.dispatch.native_ok` and :func:`linf_jax.ops.dispatch.on_cpu`. The ℓ∞
forward pass keeps the arg-max and its sign, the backward pass is one custom call doing both
scatter-adds. Under vmap (ensemble members, groups) each custom call takes the vmapped axes as
leading dimensions and runs the members one after the other inside the call.
"""

from __future__ import annotations

import jax

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
