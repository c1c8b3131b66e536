"""Data sources, normalisation and on-device augmentation.

A data set is named by ONE string, ``source``:

``digits``
    scikit-learn's ``load_digits()`` (1,797 8×8 grey digits, values 0–16, shipped inside the
    wheel, so it needs no network).  Pixels become float32 ``value / 16`` in [0, 1], shape
    ``[N, 8, 8, 1]``.  There is no official split, so one is fixed here: the 1,797 indices are
    permuted with ``np.random.default_rng(0).permutation(1797)``; the first 1,437 form ``train``
    and the last 360 form ``test`` (disjoint, together the whole set).  Normalisation uses
    constants computed once from all 1,797 images (pixel units, ``/16``):
    mean 0.30526029, std 0.37604922 — identical for both splits.  Augmentation ``'none'``.

``tfds:NAME``
    A TensorFlow-Datasets data set (``NAME`` may carry a config/version, ``mnist:3.0.1``),
    read with ``tfds.data_source`` (array_record random access).  Reading works WITHOUT
    TensorFlow once the data set is prepared in ``data_dir`` in the array_record format.
    Preparing the stock builders (mnist, fashion_mnist, cifar10, cifar100, ...) needs
    TensorFlow: if the data set is not prepared and TensorFlow is not importable, ``load``
    raises :class:`DataError` saying to ``pip install tensorflow-cpu`` and rerun, or to run
    ``tfds build NAME --file_format=array_record``; it never starts a download that cannot
    finish.  Builders of your own (registered by defining a ``tfds.core.GeneratorBasedBuilder``
    subclass) are prepared here with ``file_format='array_record'``.  Features ``'image'``
    (``[H, W]`` or ``[H, W, C]``) and ``'label'`` are read; ``num_classes`` comes from a
    ``ClassLabel`` feature, else from ``max(label) + 1`` of the loaded split.
    Known normalisation: mnist mean 0.1307 std 0.3081; fashion_mnist mean 0.2860 std
    0.3520; cifar10 mean (0.4914, 0.4822, 0.4465) std 0.2009; cifar100 mean (0.5071, 0.4867,
    0.4408) std 0.2667; ``imagenet_resized/64x64`` (ImageNet 64×64, 1,000 classes, splits
    ``train``, 1,281,167 images, and ``validation``, 50,000; prepared from the downsampled
    ImageNet files of image-net.org) mean (0.4815, 0.4578, 0.4082) std 0.2128 (SortNet's
    ``dataset.py``).
    Augmentation ``'mnist'`` for mnist/fashion_mnist, ``'cifar'`` for cifar10/cifar100 and
    imagenet_resized/64x64, ``'none'`` otherwise.  Other names: per-channel mean and ONE pooled std
    (``sqrt`` of the mean over channels of the per-channel variance) computed from the data
    set's full ``train`` split when it has one — so that every split of it is normalised
    identically — else from the loaded examples.

``idx:DIR``
    MNIST-format IDX files in ``DIR``, gzipped or not: ``train`` reads
    ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]``, ``test`` reads
    ``t10k-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]`` (the uncompressed file
    wins when both exist).  Magic numbers (2051 images, 2049 labels), shapes and lengths are
    checked.  uint8 ``[N, H, W, 1]``, 10 classes, MNIST normalisation, ``'mnist'`` augmentation.

``npz:FILE``
    A NumPy ``.npz`` with either ``x``/``images`` and ``y``/``labels`` (the whole file is both
    ``train`` and ``test``) or ``x_train``/``y_train``/``x_test``/``y_test``.  Images are
    ``[N, H, W]`` or ``[N, H, W, C]``, uint8 (0–255) or float in [0, 1].  Optional keys:
    ``mean`` (scalar or per channel), ``std`` (scalar), ``num_classes``.  Without them, mean and
    pooled std (as for unknown tfds names) are computed from the training images (the whole
    file for the single layout, ``x_train`` otherwise), and ``num_classes`` is
    ``max(label) + 1`` over every label in the file — so both splits agree.  Augmentation
    ``'none'``.

``tinyimagenet:FILE`` and ``imagenet64:FILE``
    SortNet's 64×64 data sets (``zbh2047/SortNet``, ``dataset.py``) from a NumPy ``.npz`` with
    ``x_train``, ``y_train``, ``x_test``, ``y_test``: images uint8 ``[N, 64, 64, 3]`` (0–255, or
    float in [0, 1]), labels ``[N]`` integers.  ``tinyimagenet``: Tiny ImageNet, 200 classes,
    ``train`` the 100,000 training images and ``test`` the 10,000 of the validation folder (the
    official loader's ``val``), mean (0.4802, 0.4481, 0.3975) std 0.2276;
    :func:`linf_jax.data_sources.pack_tinyimagenet` writes the file from the downloaded
    ``tiny-imagenet-200`` folder (classes in sorted folder order, as ``ImageFolder``).
    ``imagenet64``: ImageNet 64×64 (1,000 classes) for those who hold it as arrays rather than
    in TFDS (the downsampled files' ``data`` rows are CHW: reshape to ``[N, 3, 64, 64]`` and
    transpose to NHWC; their labels count from 1), mean (0.4815, 0.4578, 0.4082) std 0.2128.
    The file's own ``mean``/``std`` keys, if any, are not read: these are the official
    constants.  Augmentation ``'cifar'`` (crop and flip; SortNet pads by 5 pixels for Tiny
    ImageNet and by 4 for ImageNet 64×64, with edge replication, which its presets set in
    ``train.crop_padding`` / ``train.crop_mode``).

``data_dir`` is used by ``tfds:`` only (``None``: TFDS's default, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``).

Splits use TFDS slicing syntax for every source: ``train``, ``test``, ``test[:5000]``,
``test[5000:]``, ``train[10%:]``, ``train+test`` (parsed by ``tfds.core.ReadInstruction``).

Every problem with the inputs raises :class:`DataError` (a ``ValueError``) with one line that
names the field (``data.source``, ``data.split``, ``data.images``, ``data.labels``, ...), the
bad value and what is allowed.

Images stay in their stored dtype on the host (uint8 or float32); on the device,
:func:`as_pixels` turns them into float32 pixel units, :func:`augment` crops/flips,
:func:`normalize` maps them to network units.  The ONE scalar std keeps ℓ∞ geometry intact:
every coordinate is divided by the same number, so ε in pixel units is exactly ``ε / std`` in
network units (:func:`eps_to_normalized`), and the valid image box [0, 1] becomes
:func:`pixel_bounds` (docs/METHOD.md §9).

The readers of the sources are in :mod:`linf_jax.data_sources`; the split slicing and array
checks they share are in :mod:`linf_jax.data_arrays`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linf_jax.config import CROP_MODES
from linf_jax.data_sources import load_digits, load_idx, load_named_npz, load_npz, load_tfds
from linf_jax.dataset import (  # noqa: F401 - the data module's public names
    AUGMENTATIONS,
    DEFAULT_PADDING,
    KNOWN_TFDS,
    NAMED_SOURCES,
    Dataset,
)
from linf_jax.errors import DataError

__all__ = [
    "AUGMENTATIONS",
    "DataError",
    "Dataset",
    "as_pixels",
    "crop_flip",
    "eps_to_normalized",
    "load",
    "normalize",
    "pixel_bounds",
]

_SOURCES_HELP = ("'digits', 'tfds:NAME', 'idx:DIR', 'npz:FILE', 'tinyimagenet:FILE' or "
                 "'imagenet64:FILE'")


# ---------------------------------------------------------------------------------------------
# Public entry point


def load(source: str, split: str, data_dir: str | None = None) -> Dataset:
    """Loads split ``split`` (TFDS slicing syntax) of the data set named ``source``; a split that
    selects no example is a :class:`DataError`."""
    ds = _load_source(source, split, data_dir)
    if len(ds.labels) == 0:
        raise DataError(f"data.split: {split!r} of {source!r} selects no examples; allowed: a "
                        "split with at least one example")
    return ds


def _load_source(source: str, split: str, data_dir: str | None) -> Dataset:
    if not isinstance(source, str) or not source:
        raise DataError(f"data.source: got {source!r}; allowed: {_SOURCES_HELP}")
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"data.split: got {split!r}; allowed: a TFDS split string like 'train'")
    if source == "digits":
        return load_digits(split)
    kind, sep, arg = source.partition(":")
    if sep and arg:
        if kind == "tfds":
            return load_tfds(source, arg, split, data_dir)
        if kind == "idx":
            return load_idx(source, arg, split)
        if kind == "npz":
            return load_npz(source, arg, split)
        if kind in NAMED_SOURCES:
            return load_named_npz(source, kind, arg, split)
    raise DataError(f"data.source: unknown source {source!r}; allowed: {_SOURCES_HELP}")


# ---------------------------------------------------------------------------------------------
# On-device transforms


def as_pixels(images: jax.Array) -> jax.Array:
    """uint8 images → float32 ``/255``; float images → float32 (already pixel units)."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(pixels: jax.Array, mean, std) -> jax.Array:
    """``(pixels - mean[c]) / std`` with the channel on the last axis."""
    mean = jnp.asarray(mean, jnp.float32)
    return (jnp.asarray(pixels, jnp.float32) - mean) / jnp.asarray(std, jnp.float32)


def crop_flip(key: jax.Array, pixels: jax.Array, padding: int, mode: str = "zeros",
              flip: bool = False) -> jax.Array:
    """torchvision's ``RandomCrop(H, padding, padding_mode)`` (+ ``RandomHorizontalFlip``) on a
    batch ``[N, H, W, C]`` of pixels; ``padding``, ``mode`` and ``flip`` must be static.

    Each image is padded by ``padding`` pixels on every side, with zeros (``'zeros'``: black
    pixels, torchvision's default ``fill=0``; the official v1 code) or by repeating the border
    pixel (``'edge'``; the official v2 code), and cropped back to ``H×W`` at a random offset in
    ``[0, 2·padding]²``; then, with ``flip``, mirrored left-right with probability 0.5. Each
    example gets its own key from ``jax.random.split(key, N)``.
    """
    if mode not in CROP_MODES:
        raise DataError(f"train.crop_mode={mode!r} is not allowed: one of {CROP_MODES}")
    if padding == 0 and not flip:
        return pixels
    n, h, w, c = pixels.shape
    pad_mode = "constant" if mode == "zeros" else "edge"

    def one(k, x):
        k_crop, k_flip = jax.random.split(k)
        out = x
        if padding > 0:
            offset = jax.random.randint(k_crop, (2,), 0, 2 * padding + 1)
            padded = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
            out = lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))
        if flip:
            out = jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1, :], out)
        return out

    return jax.vmap(one)(jax.random.split(key, n), pixels)


def eps_to_normalized(eps_pixels, std) -> float:
    """ε in pixel units → ε in network units (one scalar std keeps ℓ∞ balls ℓ∞ balls,
    docs/METHOD.md §9)."""
    return eps_pixels / std


def pixel_bounds(mean, std) -> tuple[jax.Array, jax.Array]:
    """The image box [0, 1] in normalised units, per channel: ``(lo[C], hi[C])``; certification
    clips the interval-bound input box and the PGD iterates to it."""
    mean = jnp.atleast_1d(jnp.asarray(mean, jnp.float32))
    std = jnp.asarray(std, jnp.float32)
    return (0.0 - mean) / std, (1.0 - mean) / std
