"""Certificates, certified radii and the PGD attack.

Nothing here knows about training or about a particular model: functions take a
``logits_fn(x) -> [B, C]`` and a ``margins_fn(lo, hi, labels) -> [B, C]`` (upper bounds of
``z_j − z_y`` over a box), both in normalised units, so a single model and a vmapped ensemble
(averaged logits, averaged margins) are certified by the same code.

Two certificates. The interval certificate (``margins_fn``: exact interval bounds through the
ℓ∞-dist layers, interval arithmetic through an MLP head) is sound for every model. The Lipschitz
rule ``margin > 2ε`` is sound only for a model whose logits are 1-Lipschitz in ℓ∞ — a pure
ℓ∞-dist net or an ensemble of them (:func:`linf_jax.models.is_1_lipschitz`); callers say so with
``lipschitz=True``, and for any other model no Lipschitz figure is computed (``None`` in the
JSON). Certified radii likewise (:func:`model_radius`, the one rule every caller uses): the
Lipschitz radius ``(margin − tol)/2`` for 1-Lipschitz models, else :func:`interval_radius`, a
bisection on ε whose answer is always a radius at which the interval certificate was actually
verified.

Soundness under float32: a certificate must survive rounding. Every certificate here demands a
safety margin ``tol`` beyond the exact condition (``margin > 2ε + tol`` for the Lipschitz rule,
``r_j < −tol`` for the interval rule). ``DEFAULT_TOL = 1e-4`` (in normalised logit units) is about
50× the accumulated float32 rounding of a 6-layer ℓ∞-dist net with activations of magnitude ~30
(each ℓ∞-dist layer adds one rounding of the subtraction, one of the mean shift).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial

Array = jax.Array
DEFAULT_TOL = 1e-4


def input_box(x: Array, eps, lo, hi) -> tuple[Array, Array]:
    """The ε-ball around x intersected with the image box: ``[max(x−ε, lo), min(x+ε, hi)]``."""
    return jnp.maximum(x - eps, lo), jnp.minimum(x + eps, hi)


def lipschitz_margin(logits: Array, labels: Array) -> Array:
    """``z_y − max_{j≠y} z_j`` per example (negative when misclassified)."""
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return z_y - others.max(axis=1)


def certified_radius(logits: Array, labels: Array, tol: float = DEFAULT_TOL) -> Array:
    """ℓ∞ radius (normalised units) certified by the 1-Lipschitz property: ``(margin − tol)/2``,
    0 for misclassified examples."""
    return jnp.maximum((lipschitz_margin(logits, labels) - tol) / 2, 0.0)


def lipschitz_certified(logits: Array, labels: Array, eps, tol: float = DEFAULT_TOL) -> Array:
    """Certified at radius ε iff ``z_y − max_{j≠y} z_j > 2ε + tol`` (pure nets, p = ∞)."""
    return lipschitz_margin(logits, labels) > 2 * eps + tol


def interval_certified(margins: Array, labels: Array, tol: float = DEFAULT_TOL) -> Array:
    """Certified iff every worst-case margin ``r_j`` (j ≠ y) is below ``−tol``."""
    others = jnp.where(jax.nn.one_hot(labels, margins.shape[-1], dtype=bool), -jnp.inf, margins)
    return others.max(axis=1) < -tol


def interval_certified_at(margins_fn: Callable[[Array, Array, Array], Array], x: Array,
                          labels: Array, eps, lo, hi, tol: float = DEFAULT_TOL) -> Array:
    """The interval certificate at radius ``eps`` (normalised units; a scalar, or one per
    example shaped to broadcast against ``x``): :func:`interval_certified` of the margins over
    :func:`input_box`. Says nothing of whether ``x`` is classified correctly."""
    b_lo, b_hi = input_box(x, eps, lo, hi)
    return interval_certified(margins_fn(b_lo, b_hi, labels), labels, tol)


def interval_radius(margins_fn: Callable[[Array, Array, Array], Array], x: Array,
                    labels: Array, lo, hi, tol: float = DEFAULT_TOL, steps: int = 20) -> Array:
    """Per-example ℓ∞ radius (normalised units) certified by the interval certificate, by
    bisection on ε: ``steps`` halvings of ``[0, hi − lo]`` (the widest box that can matter,
    the whole valid input range). Each example keeps the largest ε at which
    :func:`interval_certified` held, so the answer errs on the safe side by at most
    ``max(hi − lo) / 2^steps``; interval bounds only widen with the box, so every smaller ε is
    certified too. 0 where not even ε = 0 certifies (misclassified, or inside ``tol``)."""
    labels = jnp.asarray(labels)
    bshape = (-1,) + (1,) * (x.ndim - 1)

    def certified_at(eps):  # eps [B]
        return interval_certified_at(margins_fn, x, labels, eps.reshape(bshape), lo, hi, tol)

    top = jnp.max(jnp.asarray(hi, jnp.float32) - jnp.asarray(lo, jnp.float32))
    good = jnp.zeros(labels.shape, jnp.float32)
    bad = jnp.full(labels.shape, top, jnp.float32)
    ok_at_zero = certified_at(good)

    def step(_, carry):
        good, bad = carry
        mid = (good + bad) / 2
        ok = certified_at(mid)
        return jnp.where(ok, mid, good), jnp.where(ok, bad, mid)

    good, _ = jax.lax.fori_loop(0, steps, step, (good, bad))
    full = certified_at(jnp.full(labels.shape, top, jnp.float32))  # the whole input range
    return jnp.where(full, top, jnp.where(ok_at_zero, good, 0.0))


def _require_margins(margins_fn) -> None:
    """A model that is not 1-Lipschitz is certified by its interval bounds only."""
    if margins_fn is None:
        raise ValueError("a model that is not 1-Lipschitz needs margins_fn (interval bounds): "
                         "the Lipschitz rule would not be sound for it")


def model_radius(logits_fn: Callable[[Array], Array],
                 margins_fn: Callable[[Array, Array, Array], Array] | None, x: Array,
                 labels: Array | None, lo, hi, *, lipschitz: bool, tol: float = DEFAULT_TOL,
                 logits: Array | None = None) -> Array:
    """The per-example certified ℓ∞ radius of a model, in normalised units (multiply by the
    data's std for pixels): the one rule behind :meth:`linf_jax.Classifier.certified_radius`,
    the radii of :func:`evaluate_dataset` and those of an exported program
    (:mod:`linf_jax.export`).

    ``x`` is the normalised input, ``lo``/``hi`` the image box in network units
    (:func:`linf_jax.data.pixel_bounds`). With ``lipschitz`` (the logits are 1-Lipschitz in ℓ∞,
    :func:`linf_jax.models.is_1_lipschitz`) the Lipschitz radius :func:`certified_radius`; else
    the interval certificate's :func:`interval_radius`, 0 where ``labels`` is not the argmax of
    the logits. ``labels=None``: against the predicted class (the argmax). ``logits``:
    ``logits_fn(x)`` if the caller has it already (computed once). ``margins_fn`` is not
    called, and may be None, with ``lipschitz``."""
    logits = logits_fn(x) if logits is None else logits
    predicted = labels is None
    if predicted:
        labels = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if lipschitz:
        return certified_radius(logits, labels, tol)
    _require_margins(margins_fn)
    radius = interval_radius(margins_fn, x, labels, lo, hi, tol)
    if predicted:  # the argmax is the label: nothing to zero
        return radius
    return jnp.where(logits.argmax(-1) == labels, radius, 0.0)


def pgd_attack(
    logits_fn: Callable[[Array], Array],
    key: Array,
    x: Array,
    labels: Array,
    eps,
    lo,
    hi,
    steps: int = 100,
    restarts: int = 1,
    step_size=None,
) -> tuple[Array, Array]:
    """ℓ∞ PGD on the cross-entropy: random start N(0, ε/4) clipped to ±ε/2, ``steps``
    sign-gradient steps of ``step_size`` (default ε/4), projected onto the ε-ball and the image
    box ``[lo, hi]``; ``restarts`` independent starts. Returns ``(x_adv, fooled)``: for each
    example the first adversarial point found (else the last iterate of the last restart) and
    whether it is misclassified.
    """
    step_size = eps / 4 if step_size is None else step_size
    box_lo, box_hi = input_box(x, eps, lo, hi)
    grad_fn = jax.grad(
        lambda z: optax.softmax_cross_entropy_with_integer_labels(logits_fn(z), labels).sum())

    def one_restart(carry, rkey):
        best, fooled = carry
        noise = jnp.clip(eps / 4 * jax.random.normal(rkey, x.shape, x.dtype), -eps / 2, eps / 2)
        z = jnp.clip(x + noise, box_lo, box_hi)

        def step(z, _):
            z = z + step_size * jnp.sign(grad_fn(z))
            return jnp.clip(z, box_lo, box_hi), None

        z, _ = jax.lax.scan(step, z, None, length=steps)
        wrong = logits_fn(z).argmax(-1) != labels
        bshape = (-1,) + (1,) * (x.ndim - 1)
        best = jnp.where((wrong & ~fooled).reshape(bshape), z, best)
        return (best, fooled | wrong), None

    init = (x, logits_fn(x).argmax(-1) != labels)
    (best, fooled), _ = jax.lax.scan(one_restart, init, jax.random.split(key, restarts))
    return best, fooled


def evaluate_batch(
    logits_fn: Callable[[Array], Array],
    margins_fn: Callable[[Array, Array, Array], Array] | None,
    key: Array,
    x: Array,
    labels: Array,
    eps_list,
    lo,
    hi,
    pgd_steps: int = 100,
    pgd_restarts: int = 1,
    tol: float = DEFAULT_TOL,
    lipschitz: bool = True,
) -> dict[str, Array]:
    """Per-example results for one batch, every ε (normalised units) at once.

    ``lipschitz``: whether ``logits_fn`` is 1-Lipschitz in ℓ∞ (a pure net or an ensemble of
    them). Returns ``correct [B]``, ``radius [B]`` (normalised, :func:`model_radius`), and
    ``[len(eps), B]`` masks ``certified`` (interval certificate; the Lipschitz rule if
    ``margins_fn`` is None), ``pgd_robust`` and, only if ``lipschitz``, ``lipschitz_certified``.
    """
    if not lipschitz:
        _require_margins(margins_fn)
    logits = logits_fn(x)
    correct = logits.argmax(-1) == labels
    cert, lip, robust = [], [], []
    for i, eps in enumerate(eps_list):
        lip_i = lipschitz_certified(logits, labels, eps, tol) & correct if lipschitz else None
        if margins_fn is not None:
            cert_i = interval_certified_at(margins_fn, x, labels, eps, lo, hi, tol) & correct
        else:
            cert_i = lip_i
        if pgd_steps > 0 and pgd_restarts > 0:
            _, fooled = pgd_attack(logits_fn, jax.random.fold_in(key, i), x, labels, eps, lo, hi,
                                   pgd_steps, pgd_restarts)
            robust_i = correct & ~fooled
        else:
            robust_i = correct
        cert.append(cert_i)
        lip.append(lip_i)
        robust.append(robust_i)
    out = {
        "correct": correct,
        "radius": model_radius(logits_fn, margins_fn, x, labels, lo, hi, lipschitz=lipschitz,
                               tol=tol, logits=logits),
        "certified": jnp.stack(cert),
        "pgd_robust": jnp.stack(robust),
    }
    if lipschitz:
        out["lipschitz_certified"] = jnp.stack(lip)
    return out


def as_partial(fn: Callable) -> Partial:
    """``fn`` as a :class:`jax.tree_util.Partial` (unchanged if it is one), which a jitted
    function can take as an argument: its bound arrays are traced inputs, the function itself is
    static."""
    return fn if isinstance(fn, Partial) else Partial(fn)


@functools.partial(jax.jit, static_argnames=("std", "eps_norm", "pgd_steps", "pgd_restarts",
                                             "tol", "lipschitz", "kernels"))
def _evaluate_program(logits_fn, margins_fn, mean, lo, hi, x_raw, y, key, *, std, eps_norm,
                      pgd_steps, pgd_restarts, tol, lipschitz, kernels):
    """One batch of :func:`evaluate_dataset`, pixels in, traced under ``kernels``
    (:func:`linf_jax.ops.kernel_request` where it is called)."""
    from linf_jax import data as data_lib
    from linf_jax import ops

    with ops.use_kernels(kernels or None):
        x = data_lib.normalize(data_lib.as_pixels(x_raw), mean, std)
        return evaluate_batch(logits_fn, margins_fn, key, x, y, eps_norm, lo, hi, pgd_steps,
                              pgd_restarts, tol, lipschitz)


def evaluate_dataset(
    logits_fn: Callable[[Array], Array],
    margins_fn: Callable[[Array, Array, Array], Array] | None,
    images,
    labels,
    *,
    mean,
    std: float,
    eps_pixels,
    batch_size: int = 500,
    pgd_steps: int = 100,
    pgd_restarts: int = 1,
    key: Array | None = None,
    tol: float = DEFAULT_TOL,
    progress: bool = True,
    lipschitz: bool = True,
    per_example: bool = False,
) -> dict:
    """Evaluates a data set (pixel images, uint8 or float in [0, 1]) at every ε in pixels.

    Returns the JSON-ready summary: ``clean_accuracy``, ``num_examples``, ``seconds``,
    ``lipschitz`` (whether the model is 1-Lipschitz, see :func:`evaluate_batch`),
    ``radius_certificate`` (``'lipschitz'`` or ``'interval'``: what the radii come from),
    ``results`` (one ``{eps, certified_accuracy, lipschitz_certified_accuracy, pgd_accuracy}`` per
    ε; ``lipschitz_certified_accuracy`` is ``None`` for a model that is not 1-Lipschitz) and
    ``radii`` (per-example certified radius in pixels). ``per_example=True`` adds
    ``"per_example"``: the boolean masks (``certified``, ``pgd_robust``, ``lipschitz_certified``
    ``[len(eps), N]``; ``correct [N]``) behind the figures, for tests and analyses (not JSON).
    """
    import time

    import numpy as np
    from tqdm.auto import tqdm

    from linf_jax import data as data_lib
    from linf_jax import ops

    t0 = time.time()
    key = jax.random.PRNGKey(0) if key is None else key
    mean_arr = jnp.asarray(mean, jnp.float32)
    lo, hi = data_lib.pixel_bounds(mean, std)
    eps_norm = tuple(data_lib.eps_to_normalized(float(e), std) for e in eps_pixels)

    # The functions are arguments of one module-level program (their bound weights inputs,
    # not constants; see linf_jax.evaluation.make_eval_fns): traced and compiled once per
    # architecture and settings, not once per call.
    fns = (as_partial(logits_fn), None if margins_fn is None else as_partial(margins_fn))
    static = dict(std=float(std), eps_norm=eps_norm, pgd_steps=int(pgd_steps),
                  pgd_restarts=int(pgd_restarts), tol=float(tol), lipschitz=bool(lipschitz),
                  kernels=ops.kernel_request())

    def run(x_raw, y, bkey):
        return _evaluate_program(*fns, mean_arr, lo, hi, x_raw, y, bkey, **static)

    images = np.asarray(images)
    labels = np.asarray(labels)
    n = len(labels)
    parts = []
    bar = tqdm(total=n, disable=not progress, unit="img", desc="certify", dynamic_ncols=True)
    for i, start in enumerate(range(0, n, batch_size)):
        xb, yb = images[start:start + batch_size], labels[start:start + batch_size]
        m = len(yb)
        if m < batch_size:  # pad the last batch: one compiled shape for the whole data set
            xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - m, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], batch_size - m)])
        out = jax.device_get(run(jnp.asarray(xb), jnp.asarray(yb), jax.random.fold_in(key, i)))
        parts.append({k: (v[..., :m]) for k, v in out.items()})
        bar.update(m)
    bar.close()
    cat = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    results = [
        {"eps": float(e),
         "certified_accuracy": float(cat["certified"][i].mean()),
         "lipschitz_certified_accuracy": (float(cat["lipschitz_certified"][i].mean())
                                          if lipschitz else None),
         "pgd_accuracy": float(cat["pgd_robust"][i].mean())}
        for i, e in enumerate(eps_pixels)]
    summary = {
        "clean_accuracy": float(cat["correct"].mean()),
        "num_examples": int(n),
        "seconds": round(time.time() - t0, 3),
        "pgd_steps": int(pgd_steps),
        "pgd_restarts": int(pgd_restarts),
        "tolerance": float(tol),
        "lipschitz": bool(lipschitz),
        "radius_certificate": "lipschitz" if lipschitz else "interval",
        "results": results,
        "radii": [float(r) * std for r in cat["radius"]],
    }
    if per_example:
        summary["per_example"] = {k: np.asarray(v) for k, v in cat.items() if k != "radius"}
    return summary

