"""Per-block weight submatrices for SortNet's masked training, with a gather-only gradient.

Block s of a masked layer (docs/METHOD.md §10) uses the rows ``out_index[s]`` and the columns
``in_index[s]`` of the weight matrix: ``wb[s] = w[out_index[s]][:, in_index[s]]``. Written with
``jnp.take``, its gradient is XLA's scatter-add of every block's ``[m_out, m_in]`` cotangent into
``[out, n]``, which on the CPU costs several times the masked distance itself
(benchmarks/sortnet_train_bench.py). Each block's index arrays hold distinct indices, so the
transpose is also a gather: with ``pos_s(o)`` the position of unit o in ``out_index[s]`` (or a
zero row where the block does not keep it), ``∂w[o, i] = Σ_s g[s, pos_s(o), pos_s(i)]``, which
:func:`block_weights` computes one block at a time (memory ``out · n``, no scatter of the
large arrays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _positions(index: Array, size: int) -> Array:
    """``[S, size]``: the position of each unit in ``index[s]``, ``m`` (a zero slot) where the
    block does not keep it."""
    s, m = index.shape
    base = jnp.full((s, size), m, jnp.int32)
    return base.at[jnp.arange(s)[:, None], index].set(jnp.arange(m, dtype=jnp.int32)[None, :])


@jax.custom_vjp
def block_weights(w: Array, out_index: Array, in_index: Array) -> Array:
    """``[S, m_out, m_in]``: ``w[out_index[s]][:, in_index[s]]`` for each block s (each row of
    ``out_index`` and of ``in_index`` distinct indices)."""
    n = w.shape[1]
    flat = out_index[:, :, None] * n + in_index[:, None, :]
    return jnp.take(w.reshape(-1), flat, axis=0)


def _fwd(w, out_index, in_index):
    return block_weights(w, out_index, in_index), (w.shape, out_index, in_index)


def _bwd(res, g):
    (out, n), out_index, in_index = res
    pos_out = _positions(out_index, out)
    pos_in = _positions(in_index, n)
    padded = jnp.pad(g, ((0, 0), (0, 1), (0, 1)))  # the zero slot at [m_out, m_in]

    def add(acc, xs):
        gs, po, pi = xs
        return acc + gs[po[:, None], pi[None, :]], None

    gw, _ = lax.scan(add, jnp.zeros((out, n), g.dtype), (padded, pos_out, pos_in))
    return gw, None, None


block_weights.defvjp(_fwd, _bwd)
