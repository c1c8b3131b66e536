"""Certificates survive float32 and attacks: a trained model's certified examples are attacked
with PGD (cross-entropy and margin losses, many restarts), random corners of the ε-box and random
points inside it, at the evaluation radii and at each example's own certified radius (where
rounding matters most); no attack may find a misclassified point.

By default the model is a tiny run trained here (~20 s). Point ``LINF_SOUNDNESS_WORKDIR`` at a
trained run (e.g. ``runs/default`` after ``python train.py``) to stress that model instead, with
``LINF_SOUNDNESS_RESTARTS`` restarts (default 8); the count of attacked points is printed
(``pytest -s``)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from linf_jax import certify, data, train_lib
from linf_jax.classifier import load_classifier

RESTARTS = int(os.environ.get("LINF_SOUNDNESS_RESTARTS", "8"))
STEPS = 50
RANDOM_DRAWS = 64  # random corners and random interior points, each


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = os.environ.get("LINF_SOUNDNESS_WORKDIR")
    if not workdir:
        workdir = str(tmp_path_factory.mktemp("sound"))
        train_lib.train_and_evaluate(tiny_config(), workdir, progress=False,
                                     evaluate_at_end=False)
    config, meta, _, _ = train_lib.load_run(workdir)
    ds = data.load(meta["source"], config.data.test_split, config.data.get("data_dir"))
    return workdir, config, ds


def _margin_pgd(logits_fn, key, x, y, eps, steps, restarts):
    """PGD on the logit margin ``z_y − max_{j≠y} z_j`` (stronger than cross-entropy next to the
    decision boundary). Returns whether each example was fooled by any restart."""
    box_lo, box_hi = certify.input_box(x, eps, 0.0, 1.0)
    grad = jax.grad(lambda z: certify.lipschitz_margin(logits_fn(z), y).sum())

    def restart(fooled, k):
        z = box_lo + (box_hi - box_lo) * jax.random.uniform(k, x.shape)

        def step(z, _):
            return jnp.clip(z - eps / 4 * jnp.sign(grad(z)), box_lo, box_hi), None

        z, _ = jax.lax.scan(step, z, None, length=steps)
        return fooled | (logits_fn(z).argmax(-1) != y), None

    fooled, _ = jax.lax.scan(restart, jnp.zeros(len(y), bool), jax.random.split(key, restarts))
    return fooled


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_no_attack_breaks_a_certified_example(trained, weights):
    workdir, config, ds = trained
    clf = load_classifier(workdir, weights=weights)
    x = jnp.asarray(data.as_pixels(ds.images[:1000]))
    y = jnp.asarray(ds.labels[:1000], jnp.int32)
    logits_fn = jax.jit(lambda z: clf._logits_fn(clf._normalize(z)))  # pixels in, no checks
    # the evaluation radii, then each example's own certified (Lipschitz) radius: the tightest
    radius = np.asarray(clf.certified_radius(x, y))
    settings = [(float(e), clf.certify(x, y, float(e))) for e in config.eval.eps]
    settings.append((jnp.asarray(radius).reshape(-1, 1, 1, 1), jnp.asarray(radius > 0)))
    rng = np.random.default_rng(0)
    attacked, certified_total = 0, 0
    for i, (eps, cert) in enumerate(settings):
        cert = np.asarray(cert)
        if not cert.any():
            continue
        idx = np.flatnonzero(cert)
        xc, yc = x[idx], y[idx]
        ec = eps if isinstance(eps, float) else eps[idx]
        certified_total += len(idx)
        _, fooled = certify.pgd_attack(logits_fn, jax.random.key(i), xc, yc, ec, 0.0, 1.0,
                                       steps=STEPS, restarts=RESTARTS)
        fooled = np.asarray(fooled) | np.asarray(
            _margin_pgd(logits_fn, jax.random.key(100 + i), xc, yc, ec, STEPS, RESTARTS))
        attacked += 2 * len(idx) * STEPS * RESTARTS
        b_lo, b_hi = certify.input_box(xc, ec, 0.0, 1.0)
        for _ in range(RANDOM_DRAWS):
            corner = jnp.where(jnp.asarray(rng.random(xc.shape) < 0.5), b_lo, b_hi)
            point = b_lo + (b_hi - b_lo) * jnp.asarray(rng.random(xc.shape), jnp.float32)
            for z in (corner, point):
                fooled |= np.asarray(logits_fn(z).argmax(-1) != yc)
            attacked += 2 * len(idx)
        assert not fooled.any(), (
            f"{int(fooled.sum())} certified examples broken at eps setting {i} ({weights})")
    assert certified_total > 0, "nothing certified: the stress test attacked nothing"
    # the attack has teeth: at the largest radius it breaks correct but uncertified examples
    eps, cert = settings[len(config.eval.eps) - 1]
    open_ = np.flatnonzero(~np.asarray(cert) & np.asarray(logits_fn(x).argmax(-1) == y))
    if len(open_):
        broken = _margin_pgd(logits_fn, jax.random.key(7), x[open_], y[open_], eps, STEPS,
                             RESTARTS)
        assert np.asarray(broken).any(), "PGD broke no uncertified example: a blunt attack"
    print(f"\nsoundness ({weights}, {workdir}): {certified_total} certified (example, ε) pairs, "
          f"{attacked} attacked points, 0 violations")
