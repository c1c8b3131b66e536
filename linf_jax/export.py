"""A trained run (or an ensemble) as one self-contained serialized program (``jax.export``).

>>> linf_jax.export.export("runs/default", "model.jax")          # EMA weights, cpu/cuda/tpu
>>> # in any process with jax installed, no linf-jax needed:
>>> fn = jax.export.deserialize(open("model.jax", "rb").read())
>>> logits, radii = fn.call(x)   # x: float32 pixels in [0, 1], (N, H, W, C), any N

The file holds StableHLO for every requested platform with the weights baked in as
constants. ``logits`` are ``[N, C]`` (the member average for an ensemble); ``radii`` ``[N]`` is
the certified ℓ∞ radius in pixels against the *predicted* class, computed as
:meth:`linf_jax.classifier.Classifier.certified_radius` computes it
(:func:`linf_jax.certify.model_radius`: the Lipschitz radius for a 1-Lipschitz model, else the
interval certificate's by bisection), with labels = the argmax of the logits. The inputs are
not checked inside the program: pixels outside [0, 1] give numbers, but the certificate assumes
the image box [0, 1].

The program is traced with the XLA kernels (:func:`linf_jax.ops.use_kernels`), so it contains
no custom call: the native CPU kernels are FFI targets that only a process that loaded
linf-jax has registered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from linf_jax import certify as certify_lib
from linf_jax import ops

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(ValueError):
    """Arguments that cannot be exported (platforms, batch), or no serializer."""


def serving_fn(clf):
    """``x -> (logits, radii)`` of a :class:`~linf_jax.classifier.Classifier`, pixels in and
    radii in pixels out, against the predicted class (so a misclassification cannot zero it)."""

    def fn(x):
        xn = clf.normalize(x)
        logits = clf.logits_fn(xn)
        radius = certify_lib.model_radius(clf.logits_fn, clf.margins_fn, xn, None,
                                          *clf.pixel_box, lipschitz=clf.lipschitz, logits=logits)
        return logits, radius * jnp.float32(clf.std)

    return fn


def _platforms(platforms) -> tuple[str, ...]:
    platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if not platforms or bad or len(set(platforms)) != len(platforms):
        raise ExportError(f"platforms={platforms!r} is not allowed: distinct names from "
                          f"{PLATFORMS}")
    return platforms


def export(workdir_or_list: str | os.PathLike | Sequence[str | os.PathLike],
           path: str | os.PathLike, weights: str = "ema",
           platforms: Sequence[str] = DEFAULT_PLATFORMS,
           batch: int | None = None) -> jax.export.Exported:
    """Writes the run ``workdir_or_list`` (a run, an ensemble run, or several runs stacked into
    one ensemble, :func:`linf_jax.classifier.load_classifier`) to ``path`` as a serialized
    ``jax.export`` program ``x -> (logits, radii)`` lowered for every one of ``platforms``.
    ``batch=None`` makes the batch dimension symbolic (any N); an int fixes it. Returns the
    :class:`jax.export.Exported`."""
    return _export(workdir_or_list, path, weights, platforms, batch)[0]


def _export(workdir_or_list, path, weights, platforms, batch):
    from linf_jax.classifier import load_classifier

    platforms = _platforms(platforms)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                              or batch < 1):
        raise ExportError(f"batch={batch!r} is not allowed: None (any N) or a positive int")
    clf = load_classifier(workdir_or_list, weights=weights)
    dims = ", ".join(map(str, clf.input_shape))
    shape = jax.export.symbolic_shape(f"b, {dims}") if batch is None else (
        (batch, *clf.input_shape))
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    # Traced with the XLA kernels: no native CPU custom call ends up in the CPU lowering.
    with ops.use_kernels("xla"):
        exported = jax.export.export(jax.jit(serving_fn(clf)), platforms=platforms)(spec)
    try:
        data = exported.serialize()
    except ImportError as err:  # jax's serializer needs the flatbuffers package
        raise ExportError(f"cannot serialize the program ({err}); allowed: an environment with "
                          "the 'flatbuffers' package (pip install flatbuffers)") from None
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return exported, clf


def export_main(workdirs, weights: str, path, platforms=DEFAULT_PLATFORMS) -> jax.export.Exported:
    """``export`` for the command line (certify.py ``--export PATH``): one line on stdout."""
    exported, clf = _export(workdirs, path, weights, platforms, None)
    dirs = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
    what = ("model" if clf.num_members is None else f"ensemble of {clf.num_members}")
    runs = ", ".join(os.fspath(d) for d in dirs)
    dims = ", ".join(map(str, clf.input_shape))
    print(f"exported {what} ({weights} weights) of {runs} to {os.fspath(path)} (platforms "
          f"{', '.join(exported.platforms)}, input (N, {dims}) float32 pixels in [0, 1]; "
          "returns (logits, radii in pixels))", flush=True)
    return exported
