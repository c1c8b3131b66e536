"""Programs traced on this CPU host and lowered for a GPU (``cuda``) or a TPU carry the shape of
that platform: the XLA code's few wide steps (checked against the CPU shape and float64 here,
where both can run), no project CPU custom call, the members of an ensemble batched, and a
bounded number of sequential loop iterations (:mod:`linf_jax.lowering`)."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from linf_jax import evaluation, experiment, lowering, ops, train_lib
from linf_jax.models import build_model
from linf_jax.ops import xla

_spec = importlib.util.spec_from_file_location(
    "loop_count", os.path.join(REPO, "benchmarks", "loop_count.py"))
loop_count = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop_count)  # the programs the benchmark counts

INF = float("inf")
ACCEL = ("cuda", "tpu")


def _inputs(seed, b=5, n=37, out=7, scale=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=(b, n)).astype(np.float32)
    w = rng.normal(scale=scale, size=(out, n)).astype(np.float32)
    w[2] = x[1]  # one zero distance
    g = rng.normal(size=(b, out)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _np_lp(x, w, p):
    d = np.abs(np.float64(x)[:, None, :] - np.float64(w)[None, :, :])
    m = d.max(-1)
    return m * ((d / np.where(m > 0, m, 1.0)[..., None]) ** p).sum(-1) ** (1.0 / p)


def _np_lp_grads(x, w, g, p):
    d = np.float64(x)[:, None, :] - np.float64(w)[None, :, :]
    y = _np_lp(x, w, p)
    t = np.abs(d) / np.where(y > 0, y, 1.0)[..., None]
    big_g = np.sign(d) * t ** (p - 1) * np.float64(g)[..., None]
    return big_g.sum(1), -big_g.sum(0)


# Budgets that give several chunks (a ragged last one), and one step for everything.
@pytest.mark.parametrize("elements", [5 * 7 * 4, 5 * 7 * 11, 1 << 28], ids=["c4", "c11", "one"])
def test_accelerator_shape_equals_cpu_shape_and_float64(monkeypatch, elements):
    """The GPU/TPU passes, run here directly: ℓ∞ bit-identical to the CPU shape with the same
    first arg-max, the bounds bit-identical, ℓp and its gradients equal to float64."""
    monkeypatch.setattr(xla, "ACCEL_ELEMENTS", elements)
    x, w, g = _inputs(seed=elements % 97)
    np.testing.assert_array_equal(xla._max_abs_diff_accel(x, w), xla._max_abs_diff_cpu(x, w))
    for a, b in zip(xla._max_abs_diff_argmax_accel(x, w), xla._max_abs_diff_argmax_cpu(x, w),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # ties: |d| = 1 at every coordinate, so the first coordinate is the arg-max
    ones = jnp.ones((2, 37)), jnp.zeros((3, 37))
    assert not np.asarray(xla._max_abs_diff_argmax_accel(*ones)[1]).any()
    lo, hi = x - 0.3, x + 0.2
    for a, b in zip(xla._bounds_accel(lo, hi, w), xla._bounds_cpu(lo, hi, w), strict=True):
        np.testing.assert_array_equal(a, b)
    for p, k in [(8.0, 8), (1.0, 1), (37.5, None), (1000.0, None)]:
        m, s = xla._lp_parts_accel(x, w, jnp.float32(p), k)
        y = jnp.where(m > 0, m * jnp.exp(jnp.log(s) / p), 0.0)
        np.testing.assert_allclose(y, _np_lp(x, w, p), rtol=2e-6, atol=1e-6)
        gx, gw = xla._lp_backward_accel(x, w, y, g, jnp.float32(p), k)
        want = _np_lp_grads(x, w, g, p)
        np.testing.assert_allclose(gx, want[0], rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(gw, want[1], rtol=1e-4, atol=2e-5)
        assert float(y[1, 2]) == 0.0 and np.isfinite(gx).all()


@pytest.mark.parametrize("platform", ACCEL)
@pytest.mark.parametrize("p", [INF, 8.0, "traced"], ids=["inf", "p8", "traced"])
def test_one_wide_layer_takes_few_sequential_steps_on_accelerators(platform, p):
    x = jax.ShapeDtypeStruct((512, 5120), jnp.float32)
    w = jax.ShapeDtypeStruct((5120, 5120), jnp.float32)
    count = lowering.loop_iterations(loop_count.layer(p), x, w, platform=platform)
    assert count.program <= 160 and count.unbounded == 0, count
    # the CPU program keeps its many short cache-sized steps (the XLA code's CPU shape)
    with ops.use_kernels("xla"):
        assert lowering.loop_iterations(loop_count.layer(p), x, w, platform="cpu").program > 10_000


def _step(cfg, shape, batch=512, members=None):
    return loop_count.abstract_step(cfg, shape, batch, members)


@pytest.mark.parametrize("platform", ACCEL)
def test_cifar10_6x5120_train_step_is_under_1000_sequential_steps(platform):
    step, args = loop_count.cifar_step()
    for phase in ("start", "ramp", "inf"):
        count = lowering.loop_iterations(functools.partial(step, p_phase=phase), *args,
                                         platform=platform)
        assert count.program <= 1000 and count.unbounded == 0, (phase, count)


def _project_cpu_calls(text):
    return {c for c in lowering.custom_calls(text) if c.startswith("linf_jax")}


@pytest.mark.parametrize("platform", ACCEL)
def test_default_train_step_lowers_for_accelerators_without_cpu_kernels(platform):
    """The default run's train step, each p phase, traced here under the choice ``auto`` makes
    on this CPU (native kernels where measured faster), lowered for a GPU or a TPU: no native
    custom call, and the same step lowered for the CPU does carry them when chosen."""
    from conftest import tiny_config

    step, args = _step(tiny_config(), (8, 8, 1), batch=32)
    choice = ops.resolve("auto")
    with ops.use_kernels(choice):
        for phase in ("start", "ramp", "inf"):
            fn = functools.partial(step, p_phase=phase)
            assert not _project_cpu_calls(lowering.lowered_text(fn, *args, platform=platform))
        if choice.backend == "native":
            cpu = lowering.lowered_text(functools.partial(step, p_phase="inf"), *args,
                                        platform="cpu")
            assert _project_cpu_calls(cpu)


def test_ensemble_members_are_batched_on_accelerators_and_mapped_on_the_cpu():
    """A K = 3 ensemble's train step, its certification program and its exported program,
    traced here: lowered for a GPU or a TPU they take exactly the loop steps of one member (the
    member axis batched, no member loop); the certification program lowered for the CPU runs
    its members one after the other (the CPU's measured choice)."""
    from conftest import tiny_config

    # width 512 and a batch of 4096 (abstract: nothing is allocated) so that the GPU/TPU program
    # has loops too
    wide = functools.partial(tiny_config, **{"model.width": 512})
    single, s_args = _step(wide(), (8, 8, 1), batch=4096)
    ens, e_args = _step(wide(), (8, 8, 1), batch=4096, members=3)
    with ops.use_kernels("xla"):
        for platform in ACCEL:
            for phase in ("start", "inf"):
                one = lowering.loop_iterations(functools.partial(single, p_phase=phase),
                                               *s_args, platform=platform)
                three = lowering.loop_iterations(functools.partial(ens, p_phase=phase),
                                                 *e_args, platform=platform)
                assert three == one and one.program > 0, (platform, phase, one, three)

        cfg = wide()
        model = build_model(cfg.model, 10)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 8, 8, 1))))
        stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((3, *a.shape), a.dtype), variables)
        x = jax.ShapeDtypeStruct((4096, 8, 8, 1), jnp.float32)
        y = jax.ShapeDtypeStruct((4096,), jnp.int32)

        def certify(k, variables, x, y):
            _, margins_fn = evaluation.make_eval_fns(model, variables, k)
            return margins_fn(x - 0.1, x + 0.1, y)

        for platform, factor in [("cuda", 1), ("tpu", 1), ("cpu", 3)]:
            one = lowering.loop_iterations(functools.partial(certify, None), variables, x, y,
                                           platform=platform)
            three = lowering.loop_iterations(functools.partial(certify, 3), stacked, x, y,
                                             platform=platform)
            assert one.program > 0, one
            want = one.program * factor + (3 if factor > 1 else 0)  # + the member loop's own
            assert three.program == want, (platform, one, three)

        # the program linf_jax.export writes (traced with the XLA code, as export() does)
        from linf_jax import export
        from linf_jax.classifier import Classifier

        meta = {"mean": [0.5], "std": 0.25, "input_shape": [8, 8, 1], "num_classes": 10}
        zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
        programs = {k: jax.jit(export.serving_fn(Classifier(model, zeros(v), meta,
                                                            num_members=k))).trace(x).jaxpr
                    for k, v in ((None, variables), (3, stacked))}
        for platform in ACCEL:
            one, three = (lowering.count(programs[k], platform) for k in (None, 3))
            assert three == one and one.program > 0, (platform, one, three)


def _loss_grads(cfg, members, shape_name):
    """``{p: (loss, grads)}`` of the tiny model on a random batch at p = 8, a traced p and ∞
    (jitted here, traced in ``shape_name``); a stacked K-member ensemble is vmapped."""
    shape = (8, 8, 1)
    model = build_model(cfg.model, 10)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(64, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(1), members or 1)
    variables = [model.init(k, x[:1]) for k in keys]
    loss = functools.partial(train_lib.member_loss, apply_fn=model.apply,
                             loss_fn=experiment.make_loss_fn(cfg))

    def grads(params, bs, p):
        (value, _), g = jax.value_and_grad(loss, has_aux=True)(params, bs, x, y, p, 0.3, 0.0)
        return value, g

    if members:
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *variables)
        fn = jax.vmap(grads, in_axes=(0, 0, None))
        args = (stacked["params"], stacked.get("batch_stats", {}))
    else:
        fn, args = grads, (variables[0]["params"], variables[0].get("batch_stats", {}))
    out = {}
    with ops.use_kernels("xla"), xla.traced_in_shape(shape_name):
        for p in (8.0, "traced", INF):
            if p == "traced":
                out[p] = jax.jit(fn)(*args, jnp.float32(37.5))
            else:
                out[p] = jax.jit(lambda *a, p=p: fn(*a, p))(*args)
    return out


@pytest.mark.parametrize("members", [None, 3], ids=["single", "ensemble3"])
def test_loss_and_gradients_in_the_accelerator_shape_equal_the_cpu_shape(monkeypatch, members):
    """The tiny model's loss and gradients at p = 8, a traced p and ∞ (a K = 3 ensemble vmapped
    through the members' batching rule, which batches them in the GPU/TPU shape) traced in the
    GPU/TPU shape with several chunks per pass equal those of the CPU shape."""
    from conftest import tiny_config

    monkeypatch.setattr(xla, "ACCEL_ELEMENTS", 64 * 32 * 8)
    accel = _loss_grads(tiny_config(), members, "accel")
    cpu = _loss_grads(tiny_config(), members, "cpu")
    for p in accel:
        # the sums run in another order: float32 rounding, relative to the largest gradient
        scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(cpu[p][1]))
        for a, b in zip(jax.tree.leaves(accel[p]), jax.tree.leaves(cpu[p]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=str(p))


KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def test_pallas_forced_programs_carry_the_platforms_kernels():
    """With Pallas chosen, the tiny run's train step in the ramp (a traced p: the ℓ∞ and the ℓp
    kernels, forward and backward), a K = 3 ensemble's step and the certification program (the
    bounds kernel), each traced once on this CPU host, carry Triton kernels when lowered for
    CUDA and Mosaic ones for a TPU (not interpret mode, no CPU custom call), and the ensemble's
    members are batched into the kernels' grid: no member loop in the program (on a TPU the
    grid, a sequential loop there, grows by the member axis)."""
    from conftest import tiny_config

    single, s_args = _step(tiny_config(), (8, 8, 1), batch=32)
    ens, e_args = _step(tiny_config(), (8, 8, 1), batch=32, members=3)
    cfg = tiny_config()
    model = build_model(cfg.model, 10)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
    _, margins_fn = evaluation.make_eval_fns(model, variables, None)
    x = jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.float32)
    with ops.use_kernels("pallas"):
        step = jax.jit(functools.partial(single, p_phase="ramp")).trace(*s_args)
        ens_step = jax.jit(functools.partial(ens, p_phase="ramp")).trace(*e_args)
        certify = jax.jit(lambda v, x: margins_fn.func(v, x - 0.1, x + 0.1,
                                                       jnp.zeros(16, jnp.int32))).trace(
            variables, x)
    for platform, kernel_call in KERNEL_CALLS.items():
        for traced in (step, ens_step, certify):
            calls = lowering.custom_calls(traced.lower(lowering_platforms=(platform,)).as_text())
            assert kernel_call in calls and not _project_cpu_calls("\n".join(calls)), calls
        one, three = lowering.count(step.jaxpr, platform), lowering.count(ens_step.jaxpr,
                                                                          platform)
        assert one.kernel > 0 and three.program == one.program, (one, three)
        assert three.kernel == (3 * one.kernel if platform == "tpu" else one.kernel)
