"""Devices: the mesh, the shardings of the train state and of the batch (jax.sharding).

One jitted train step runs on every device of a :class:`jax.sharding.Mesh` with two axes:

* ``data``: the batch is split across it, parameters are replicated. The step is written for
  the global batch (``jnp.mean`` over it, the MeanShift batch mean included), so XLA's SPMD
  partitioner inserts the all-reduces: batch statistics and gradients are averaged across the
  data axis exactly as on one device.
* ``members``: with ``config.ensemble.shard = True`` the leading member axis of a stacked
  ensemble is split across it (``gcd(K, devices)`` devices; the rest go to ``data``).

Multi-host: every process runs the same program on the same (deterministically loaded) data;
:func:`global_array` builds global arrays from the host copy, and ``jax.distributed.initialize``
(``train.py --distributed``) connects the processes first.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MEMBERS = "data", "members"


def make_mesh(num_devices: int = 0, num_members: int | None = None, shard_members: bool = False
              ) -> Mesh:
    """A ``(members, data)`` mesh over ``num_devices`` devices (0: all devices)."""
    devices = jax.devices()
    n = len(devices) if num_devices in (0, None) else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"parallel.num_devices={num_devices} is not allowed: 0 (all) or 1.."
                         f"{len(devices)} on this machine")
    m = math.gcd(num_members, n) if (shard_members and num_members) else 1
    grid = np.asarray(devices[:n], dtype=object).reshape(m, n // m)
    return Mesh(grid, (MEMBERS, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh, num_members: int | None):
    """Per-leaf shardings: leaves with the leading member axis go on ``members`` (size 1 unless
    sharded), everything else is replicated."""
    shard = num_members is not None and mesh.shape[MEMBERS] > 1

    def one(leaf):
        if shard and leaf.ndim >= 1 and leaf.shape[0] == num_members:
            return NamedSharding(mesh, P(MEMBERS))
        return replicated(mesh)

    return jax.tree.map(one, abstract_state)


def batch_sharding(mesh: Mesh, member_axis: bool) -> NamedSharding:
    """The batch (``[B, ...]``, or ``[K, B, ...]`` for independent ensembles) on ``data``."""
    spec = P(MEMBERS, DATA) if member_axis else P(DATA)
    return NamedSharding(mesh, spec)


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from an identical host copy on every process (multi-host safe)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
