"""Certificates survive float32 and attacks: a trained model's certified examples are attacked
with PGD (cross-entropy and margin losses, many restarts), random corners of the ε-box and random
points inside it, at the evaluation radii and at each example's own certified radius (where
rounding matters most); no attack may find a misclassified point.

The models are tiny runs trained here: a pure ℓ∞-dist net (EMA and raw weights), a net with an
MLP head, an ℓ∞-dist LeNet, a joint ensemble of each of the last two, and SortNets (pure, EMA and
raw weights; with an MLP head; a joint ensemble of pure ones). Point
``LINF_SOUNDNESS_WORKDIR`` at a trained pure-net run (e.g. ``runs/default`` after
``python train.py``) to stress that model instead of the tiny pure net, with
``LINF_SOUNDNESS_RESTARTS`` restarts (default 8); the count of attacked points is printed
(``pytest -s``)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from linf_jax import certify, data, trainer
from linf_jax import checkpoint as ckpt
from linf_jax.classifier import load_classifier

RESTARTS = int(os.environ.get("LINF_SOUNDNESS_RESTARTS", "4"))
STEPS = 50
RANDOM_DRAWS = 24  # random corners and random interior points, each
# p = 8, then the p ramp to the end, no separate ℓ∞ phase: two train-step programs per model
# instead of three, and about as many certified (example, ε) pairs to attack as with the tiny
# runs' (0, 2, 2, 4, 6) (BENCHMARKS.md, "Test suite time").
TRAIN = {"train.epochs": (0, 2, 2, 6, 6)}


# The models whose certificates are attacked: the pure net (EMA and raw weights), a net with an
# MLP head (not 1-Lipschitz: interval certificate and interval radii only), an ℓ∞-dist LeNet, and
# a 2-member joint ensemble of each of the last two.
MLP = {"model.name": "linf_dist_net_mlp", "model.depth": 2, "model.width": 32,
       "model.head": "mlp", "model.head_hidden": 16}
LENET = {"model": ml_collections.ConfigDict(dict(name="linf_lenet", channels=(4,), kernel_size=3,
                                                 dense=(32, 32), head="mlp", head_hidden=16))}
ENSEMBLE = {"ensemble.size": 2, "ensemble.mode": "joint"}
# SortNets (sort neurons over the top 5 distances, trained with random masks): pure (1-Lipschitz),
# with an MLP head, and a joint ensemble of two pure ones.
SORT = {"model": ml_collections.ConfigDict(dict(name="sort_net", depth=3, width=32, q=0.75,
                                                top_k=5, mask_block=16))}
SORT_MLP = {"model": ml_collections.ConfigDict(dict(name="sort_net_mlp", depth=4, width=32,
                                                    head_hidden=16, q=0.7, top_k=5,
                                                    mask_block=16))}
KINDS = {"pure": {}, "mlp": MLP, "mlp-ensemble": {**MLP, **ENSEMBLE}, "lenet": LENET,
         "lenet-ensemble": {**LENET, **ENSEMBLE}, "sort": SORT, "sort-mlp": SORT_MLP,
         "sort-ensemble": {**SORT, **ENSEMBLE}}
CASES = [("pure", "ema"), ("pure", "raw"), ("mlp", "ema"), ("mlp-ensemble", "ema"),
         ("lenet", "ema"), ("lenet-ensemble", "ema"), ("sort", "ema"), ("sort", "raw"),
         ("sort-mlp", "ema"), ("sort-ensemble", "ema")]
LIPSCHITZ = ("pure", "sort", "sort-ensemble")  # the kinds whose logits are 1-Lipschitz
# The pure net is attacked on up to 500 test examples (all 360 of the digits) with RESTARTS
# restarts; the other four on 240 examples with half the restarts, to keep the suite's time.
EXAMPLES = {"pure": 500}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``kind -> (workdir, config, test data)``, each run trained on first use."""
    runs = {}

    def get(kind):
        if kind in runs:
            return runs[kind]
        workdir = os.environ.get("LINF_SOUNDNESS_WORKDIR") if kind == "pure" else None
        if not workdir:
            workdir = str(tmp_path_factory.mktemp(f"sound_{kind}"))
            trainer.train_and_evaluate(tiny_config(**KINDS[kind], **TRAIN), workdir,
                                         progress=False, evaluate_at_end=False)
        config, meta, _, _ = ckpt.load_run(workdir)
        ds = data.load(meta["source"], config.data.test_split, config.data.get("data_dir"))
        runs[kind] = workdir, config, ds
        return runs[kind]

    return get


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


@pytest.mark.parametrize("kind,weights", CASES, ids=[f"{k}-{w}" for k, w in CASES])
def test_no_attack_breaks_a_certified_example(trained, kind, weights):
    """Every figure certify.py and train.py report as certified — the interval certificate and,
    for the 1-Lipschitz pure net only, the Lipschitz rule, at every evaluation ε — and every
    example's reported certified radius are attacked; nothing may break."""
    workdir, config, ds = trained(kind)
    clf = load_classifier(workdir, weights=weights)
    n = EXAMPLES.get(kind, 240)
    restarts = RESTARTS if kind == "pure" else max(1, RESTARTS // 2)
    x = jnp.asarray(data.as_pixels(ds.images[:n]))
    y = jnp.asarray(ds.labels[:n], jnp.int32)
    logits_fn = jax.jit(lambda z: clf.logits_fn(clf.normalize(z)))  # pixels in, no checks
    eval_eps = [float(e) for e in config.eval.eps]
    report = clf.evaluate(x, y, eps=eval_eps, pgd_steps=0, per_example=True)
    masks = report["per_example"]
    lipschitz = kind in LIPSCHITZ
    assert report["lipschitz"] is lipschitz and clf.lipschitz is lipschitz
    assert report["radius_certificate"] == ("lipschitz" if lipschitz else "interval")
    for row in report["results"]:
        assert (row["lipschitz_certified_accuracy"] is None) is (not lipschitz), row
    assert ("lipschitz_certified" in masks) is lipschitz
    radius = np.asarray(report["radii"], np.float32)
    np.testing.assert_allclose(radius, np.asarray(clf.certified_radius(x, y)), atol=1e-6)
    # What is attacked, all in one batch (one compilation per model): every (example, ε) pair a
    # reported mask certifies, at that ε, then every example at its own radius (the tightest
    # setting); after them the correct but uncertified examples at the largest evaluation ε,
    # which the attack must partly break (it has teeth).
    settings = [(eps, masks["certified"][i]) for i, eps in enumerate(eval_eps)]
    if lipschitz:
        settings += [(eps, masks["lipschitz_certified"][i]) for i, eps in enumerate(eval_eps)]
    settings.append((radius, radius > 0))
    rows, eps_rows, setting_of = [], [], []
    for i, (eps, cert) in enumerate(settings):
        idx = np.flatnonzero(np.asarray(cert))
        rows.append(idx)
        eps_rows.append(np.broadcast_to(np.asarray(eps, np.float32), y.shape)[idx])
        setting_of.append(np.full(len(idx), i))
    certified_total = sum(len(r) for r in rows)
    assert certified_total > 0, "nothing certified: the stress test attacked nothing"
    correct = np.asarray(logits_fn(x).argmax(-1) == y)
    open_ = np.flatnonzero(~np.asarray(settings[len(eval_eps) - 1][1]) & correct)
    rows.append(open_)
    eps_rows.append(np.full(len(open_), eval_eps[-1], np.float32))
    setting_of.append(np.full(len(open_), -1))
    idx, setting_of = np.concatenate(rows), np.concatenate(setting_of)
    xc, yc = x[idx], y[idx]
    ec = jnp.asarray(np.concatenate(eps_rows)).reshape(-1, 1, 1, 1)

    @jax.jit
    def attack(key, xc, yc, ec):
        k1, k2 = jax.random.split(key)
        _, fooled = certify.pgd_attack(logits_fn, k1, xc, yc, ec, 0.0, 1.0, steps=STEPS,
                                       restarts=restarts)
        return fooled, _margin_pgd(logits_fn, k2, xc, yc, ec, STEPS, restarts)

    fooled_ce, fooled_margin = (np.asarray(f) for f in attack(jax.random.key(0), xc, yc, ec))
    fooled = fooled_ce | fooled_margin
    rng = np.random.default_rng(0)
    b_lo, b_hi = certify.input_box(xc, ec, 0.0, 1.0)
    for _ in range(RANDOM_DRAWS):
        corner = jnp.where(jnp.asarray(rng.random(xc.shape) < 0.5), b_lo, b_hi)
        point = b_lo + (b_hi - b_lo) * jnp.asarray(rng.random(xc.shape), jnp.float32)
        for z in (corner, point):
            fooled |= np.asarray(logits_fn(z).argmax(-1) != yc)
    cert_rows = setting_of >= 0
    for i in range(len(settings)):
        broken = fooled & (setting_of == i)
        assert not broken.any(), (
            f"{int(broken.sum())} certified examples broken at eps setting {i} ({kind}, "
            f"{weights})")
    if len(open_):
        assert fooled_margin[~cert_rows].any(), (
            "PGD broke no uncertified example: a blunt attack")
    attacked = 2 * certified_total * (STEPS * restarts + RANDOM_DRAWS)
    print(f"\nsoundness ({kind}, {weights}, {workdir}): {certified_total} certified (example, ε) "
          f"pairs, {attacked} attacked points, 0 violations")
