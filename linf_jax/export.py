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
linf-jax has registered. Beside the file, ``PATH.json`` (:func:`read_info`) says what it holds:
the runs, the weights, the number of members, the input shape, the platforms and the kernels
the program was traced with (:meth:`linf_jax.ops.KernelChoice.record`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from linf_jax import certify as certify_lib
from linf_jax import ops
from linf_jax.errors import ExportError

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


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
    :class:`jax.export.Exported`; ``PATH.json`` describes it (:func:`read_info`)."""
    from linf_jax import checkpoint as ckpt
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
    kernels = ops.resolve("xla", "export")
    with ops.use_kernels(kernels):
        exported = jax.export.export(jax.jit(serving_fn(clf)), platforms=platforms)(spec)
    try:
        data = exported.serialize()
    except ImportError as err:  # jax's serializer needs the flatbuffers package
        raise ExportError(f"cannot serialize the program ({err}); allowed: an environment with "
                          "the 'flatbuffers' package (pip install flatbuffers)") from None
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    runs = ([workdir_or_list] if isinstance(workdir_or_list, (str, os.PathLike))
            else list(workdir_or_list))
    info = {"workdirs": [os.fspath(d) for d in runs], "weights": weights,
            "members": clf.num_members or 1, "input_shape": list(clf.input_shape),
            "batch": batch, "platforms": list(exported.platforms), "kernels": kernels.record(),
            "returns": "(logits, certified radii in pixels)"}
    ckpt.write_atomic(path, data)
    ckpt.write_json(info_path(path), info)
    return exported


def info_path(path: str | os.PathLike) -> str:
    """Where :func:`export` describes the program it wrote to ``path``: ``PATH.json``."""
    return os.fspath(path) + ".json"


def read_info(path: str | os.PathLike) -> dict:
    """What the exported program at ``path`` holds (:func:`export` writes it beside it)."""
    with open(info_path(path)) as f:
        return json.load(f)
