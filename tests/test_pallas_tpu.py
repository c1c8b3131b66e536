"""Mosaic compiles every Pallas kernel of linf_jax/ops/pallas.py to TPU code, on this CPU host.

``jax.export`` for 'tpu' (tests/test_kernels.py) runs only the jaxpr → Mosaic step. The Mosaic
compiler proper (layout inference and relayouts, alignment proofs, VMEM limits, lowering to the
TPU's instructions) is in libtpu, which compiles ahead of time for a TPU topology without a TPU
(``jax.experimental.topologies``). This test compiles forward and backward of every pass, and
the passes under ``vmap``, at ragged shapes with the default TPU blocks, for the topologies of
``LINF_JAX_TPU_TOPOLOGIES`` (comma-separated; default ``v5e:2x2``; ``v4:2x2x1`` and
``v6e:2x2`` work too). Nothing runs: whether the kernels are right is tests/test_kernels.py's
part (interpret mode), how fast they are needs a TPU.

It runs where libtpu can be imported: installed in this environment, or from the folder named
by ``LINF_JAX_LIBTPU`` (``pip install --target DIR libtpu==0.0.42.*``, the libtpu that
``jax[tpu]`` 0.10.2 pins); elsewhere it is skipped. The compilation runs in a subprocess (this
file as a script) with ``JAX_PLATFORMS=cpu`` and the libtpu variables that keep it from looking
for TPU hosts, so libtpu never becomes a backend of the test process.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_DIR = os.environ.get("LINF_JAX_LIBTPU", "")
# Deviceless compilation: no metadata server to ask, one local worker.
LIBTPU_ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1",
              "TPU_WORKER_HOSTNAMES": "localhost"}


def _libtpu_found() -> bool:
    if LIBTPU_DIR:
        return os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu"))
    return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _libtpu_found(),
                    reason="libtpu is not installed (LINF_JAX_LIBTPU names a folder with it)")
def test_mosaic_compiles_every_kernel_for_tpu():
    path = os.pathsep.join(p for p in (REPO, LIBTPU_DIR, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **LIBTPU_ENV, "PYTHONPATH": path}
    topologies = os.environ.get("LINF_JAX_TPU_TOPOLOGIES", "v5e:2x2").split(",")
    proc = subprocess.run([sys.executable, __file__, *topologies], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    report = "\n".join(line for line in proc.stdout.splitlines() if line.strip())
    assert proc.returncode == 0, report + "\n" + proc.stderr[-3000:]
    assert report.count(": compiled") == len(topologies) * len(_cases(None))


def _cases(sharding):
    """``(name, function, argument specs, Pallas calls)`` for every pass."""
    import jax
    import jax.numpy as jnp

    from linf_jax.ops.pallas import pallas_dist, pallas_linf_dist_bounds, pallas_lp_dist

    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
    b, n, out, k = 70, 300, 130, 3

    def grads(p):
        return lambda x, w, g: jax.grad(lambda x, w: (pallas_dist(x, w, p) * g).sum(),
                                        argnums=(0, 1))(x, w)

    def traced(x, w, g, p):
        return jax.grad(lambda x, w: (pallas_lp_dist(x, w, p) * g).sum(), argnums=(0, 1))(x, w)

    def bounds(x, w, g):
        loss = lambda l, u, w: sum((a * g).sum() for a in pallas_linf_dist_bounds(l, u, w))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x - 0.5, x + 0.5, w)

    xwg = (spec(b, n), spec(out, n), spec(b, out))
    members = (spec(k, b, n), spec(k, out, n), spec(k, b, out))
    shared_x = (spec(b, n), spec(k, out, n), spec(k, b, out))
    return [
        ("linf fwd+bwd", grads(float("inf")), xwg, 1),
        ("lp p=8 fwd+bwd", grads(8.0), xwg, 3),
        ("lp p=37.5 fwd+bwd", grads(37.5), xwg, 3),
        ("lp traced p fwd+bwd", traced, (*xwg, spec()), 6),
        ("bounds fwd+bwd", bounds, xwg, 1),
        ("vmap lp p=37.5 fwd+bwd", jax.vmap(grads(37.5)), members, 3),
        ("vmap (w only) linf fwd+bwd", jax.vmap(grads(float("inf")), in_axes=(None, 0, 0)),
         shared_x, 1),
        ("vmap (w only) bounds fwd+bwd", jax.vmap(bounds, in_axes=(None, 0, 0)), shared_x, 1),
    ]


def _compile_all(topology: str) -> bool:
    import jax
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    from linf_jax.ops import pallas

    pallas._backend = lambda: "tpu"  # this process builds the TPU kernels only
    device = topologies.get_topology_desc(topology, "tpu").devices[0]
    print(f"{topology} ({device.device_kind}), blocks {pallas.default_blocks('tpu')}")
    ok = True
    for name, fn, specs, calls in _cases(SingleDeviceSharding(device)):
        try:
            lowered = jax.jit(fn).trace(*specs).lower()
            found = lowered.as_text().count("tpu_custom_call")
            assert found == calls, f"{found} Mosaic kernels, expected {calls}"
            lowered.compile()
            print(f"  {name}: compiled")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status
            ok = False
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:2000]}")
    return ok


if __name__ == "__main__":
    results = [_compile_all(t) for t in sys.argv[1:]]
    sys.exit(0 if all(results) else 1)
