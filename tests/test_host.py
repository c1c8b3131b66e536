"""linf_jax.host: the glibc allocator settings applied by train.py, certify.py and the benchmarks,
and the gradient-norm metric written so that XLA does not materialise g² (train_lib)."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linf_jax import host, train_lib

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tune_allocator_applies_once_and_can_be_turned_off():
    code = ("from linf_jax import host; a = host.tune_allocator(); b = host.tune_allocator(); "
            "import numpy as np; x = np.ones(8 << 20); print(a, b, float(x.sum()))")
    assert _run(code) == f"True True {float(8 << 20)}"
    assert _run(code, LINF_JAX_TUNE_MALLOC="0") == f"False False {float(8 << 20)}"


def test_tune_allocator_is_false_off_glibc(monkeypatch):
    monkeypatch.setattr(host, "_applied", None)
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host.tune_allocator() is False


def test_squared_norm_is_the_global_norm_squared():
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
            "b": [jnp.asarray(rng.normal(size=(3,)), jnp.float32),
                  jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)]}
    want = sum(float(np.sum(np.float64(x) ** 2)) for x in jax.tree.leaves(tree))
    got = float(jax.jit(train_lib.squared_norm)(tree))
    assert got == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(float(optax.global_norm(tree)) ** 2, rel=1e-6)


def test_the_suites_compilation_flags_are_set_only_where_jaxlib_knows_them():
    """tests/conftest.py adds its two compile-time flags to XLA_FLAGS (XLA aborts on a flag it
    does not know, so the fusion-emitter flag goes in only where jaxlib's library names it)."""
    import conftest

    assert conftest._jaxlib_knows(conftest.TEST_XLA_FLAG)
    assert not conftest._jaxlib_knows("--xla_cpu_no_such_flag_in_any_jaxlib=1")
    if os.environ.get("LINF_JAX_TEST_FAST_COMPILE", "1") != "0":
        flags = os.environ["XLA_FLAGS"].split()
        assert all(f in flags for f in conftest.TEST_XLA_FLAGS)
        assert (conftest.FUSION_EMITTERS_FLAG in conftest.TEST_XLA_FLAGS) == \
            conftest._jaxlib_knows(conftest.FUSION_EMITTERS_FLAG)
