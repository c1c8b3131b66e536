"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/test_ensemble.py).

Trains tiny configs on 1 device and on 4 devices (data parallel; an independent ensemble with
its member axis sharded; a SortNet, data parallel), and resumes a 4-device checkpoint on 2
devices (first phase); prints one JSON line with the largest parameter difference of each case
against the 1-device run.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402

from linf_jax import (
    parallel,  # noqa: E402
    trainer,
)


def run(cfg, workdir, **kw):
    return trainer.train_and_evaluate(cfg, workdir, progress=False, evaluate_at_end=False,
                                        **kw)


def diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params),
                               strict=True))


def main(root):
    # Adam with eps = 1e-10 turns rounding noise in tiny gradients into differences of order lr
    # (it is nearly lr·sign(g)); eps = 1e-3 keeps the update smooth in g, so the comparison
    # measures the sharding, not that amplification. A few steps at p = 8 and at p = ∞.
    phases = {"p8": (0, 2, 0, 2, 2), "pinf": (0, 0, 0, 0, 2)}
    out = {"devices": jax.device_count(), "max_abs_diff": {}}

    def cfg(epochs, **kw):
        return tiny_config(**{"train.epochs": epochs, "train.adam_eps": 1e-3, **kw})

    for name, epochs in phases.items():
        one = run(cfg(epochs, **{"parallel.num_devices": 1}), f"{root}/{name}1", max_steps=6)
        four = run(cfg(epochs, **{"parallel.num_devices": 4}), f"{root}/{name}4", max_steps=6)
        out["max_abs_diff"][f"data_parallel_4_{name}"] = diff(one, four)
        if name != "p8":
            continue
        # a checkpoint written from 4 devices resumes on 2 (restoring and resharding do not
        # depend on the p phase: checked in the first one only)
        run(cfg(epochs, **{"parallel.num_devices": 4}), f"{root}/{name}m", max_steps=3)
        moved = run(cfg(epochs, **{"parallel.num_devices": 2}), f"{root}/{name}m", max_steps=3)
        assert int(moved.state.step) == 6
        out["max_abs_diff"][f"resumed_4_to_2_{name}"] = diff(one, moved)
    ens = {"ensemble.size": 4, "ensemble.mode": "independent"}
    epochs = phases["p8"]
    e1 = run(cfg(epochs, **ens, **{"parallel.num_devices": 1}), f"{root}/e1", max_steps=6)
    e4 = run(cfg(epochs, **ens, **{"parallel.num_devices": 4, "ensemble.shard": True}),
             f"{root}/e4", max_steps=6)
    out["max_abs_diff"]["ensemble_members_sharded_4"] = diff(e1, e4)
    leaf = e4.state.params["dists_0"]["linf_weight"]
    out["sharded_member_axis"] = (leaf.sharding.spec[0] == parallel.MEMBERS
                                  and len(leaf.sharding.device_set) == 4)
    # a SortNet: the masks are drawn for blocks of the global batch, so data parallelism gives
    # the same masks and parameters; the running means re-estimated at the save as well
    sort = {"model": {"name": "sort_net", "depth": 3, "width": 32, "q": 0.75, "top_k": 5,
                      "mask_block": 16}}
    s1 = run(cfg(epochs, **sort, **{"parallel.num_devices": 1}), f"{root}/s1", max_steps=6)
    s4 = run(cfg(epochs, **sort, **{"parallel.num_devices": 4}), f"{root}/s4", max_steps=6)
    out["max_abs_diff"]["sortnet_data_parallel_4"] = diff(s1, s4)
    out["max_abs_diff"]["sortnet_recalibrated_4"] = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(s1.state.recalibrated),
                        jax.tree.leaves(s4.state.recalibrated), strict=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
