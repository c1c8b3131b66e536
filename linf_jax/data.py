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
    0.4408) std 0.2667.  Augmentation ``'mnist'`` for mnist/fashion_mnist, ``'cifar'`` for
    cifar10/cifar100, ``'none'`` otherwise.  Other names: per-channel mean and ONE pooled std
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
"""

from __future__ import annotations

import collections.abc
import dataclasses
import gzip
import importlib.util
import os
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "AUGMENTATIONS",
    "DataError",
    "Dataset",
    "as_pixels",
    "augment",
    "crop_flip",
    "eps_to_normalized",
    "load",
    "normalize",
    "pixel_bounds",
]

AUGMENTATIONS = ("none", "mnist", "cifar")
# The crop padding of each data set kind (the v1 code's: MNIST-like 1, CIFAR-like 4).
DEFAULT_PADDING = {"none": 0, "mnist": 1, "cifar": 4}
CROP_MODES = ("zeros", "edge")

# Computed once from all 1,797 scikit-learn digits, pixel units (value / 16).
DIGITS_MEAN = 0.30526029
DIGITS_STD = 0.37604922
DIGITS_NUM_TRAIN = 1437  # the remaining 360 are 'test'

MNIST_MEAN, MNIST_STD = (0.1307,), 0.3081

# name -> (mean per channel, scalar std, augmentation).
KNOWN_TFDS = {
    "mnist": (MNIST_MEAN, MNIST_STD, "mnist"),
    "fashion_mnist": ((0.2860,), 0.3520, "mnist"),
    "cifar10": ((0.4914, 0.4822, 0.4465), 0.2009, "cifar"),
    "cifar100": ((0.5071, 0.4867, 0.4408), 0.2667, "cifar"),
}

_SOURCES_HELP = "'digits', 'tfds:NAME', 'idx:DIR' or 'npz:FILE'"


class DataError(ValueError):
    """A data set cannot be loaded as asked; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split of a data set, on the host."""

    images: np.ndarray  # [N, H, W, C], uint8 (0..255) or float32 in [0, 1] pixel units
    labels: np.ndarray  # [N] int32
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean, pixel units
    std: float  # ONE scalar std per data set
    name: str  # the source string
    augment: str  # 'none' | 'mnist' | 'cifar'

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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
        return _load_digits(split)
    kind, sep, arg = source.partition(":")
    if sep and arg:
        if kind == "tfds":
            return _load_tfds(source, arg, split, data_dir)
        if kind == "idx":
            return _load_idx(source, arg, split)
        if kind == "npz":
            return _load_npz(source, arg, split)
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


def augment(key: jax.Array, pixels: jax.Array, kind: str) -> jax.Array:
    """Random per-example augmentation of a batch ``[N, H, W, C]``; ``kind`` must be static.

    ``'mnist'``: zero-pad by 1 pixel (pixel space, so pass pixels, not normalised inputs) and
    crop back to ``H×W`` at a random offset in ``[0, 2]²``.  ``'cifar'``: the same with 4-pixel
    padding, then a horizontal flip with probability 0.5.  ``'none'``: identity.  Each example
    gets its own key from ``jax.random.split(key, N)``; derive ``key`` from (seed, step).
    :func:`crop_flip` takes the padding, its mode and the flip explicitly.
    """
    if kind not in AUGMENTATIONS:
        raise DataError(f"data.augment: got {kind!r}; allowed: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return pixels
    return crop_flip(key, pixels, DEFAULT_PADDING[kind], "zeros", kind == "cifar")


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


# ---------------------------------------------------------------------------------------------
# Splits


class _Splits(collections.abc.Mapping):
    """``{split name: info with .num_examples}``, sizes computed lazily, for ``to_absolute``."""

    def __init__(self, names, size: Callable[[str], int]):
        self._names = list(names)
        self._size = size

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return types.SimpleNamespace(num_examples=int(self._size(name)))

    def __contains__(self, name):
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _resolve_split(split: str, split_infos, source: str) -> list[tuple[str, int, int]]:
    """TFDS split spec → ``[(split name, start, stop), ...]`` (absolute, to be concatenated)."""
    from tensorflow_datasets.core import splits as tfds_splits

    allowed = ", ".join(repr(s) for s in split_infos) or "none"
    try:
        instructions = tfds_splits.ReadInstruction.from_spec(split).to_absolute(split_infos)
    except DataError:
        raise
    except (ValueError, KeyError, NotImplementedError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data.split: {split!r} is not valid for {source!r} ({reason}); "
            f"allowed: splits {allowed} with TFDS slicing, e.g. 'train[:80%]'"
        ) from None
    out = []
    for ins in instructions:
        n = split_infos[ins.splitname].num_examples
        start = 0 if ins.from_ is None else int(ins.from_)
        stop = n if ins.to is None else int(ins.to)
        out.append((ins.splitname, start, max(start, stop)))
    return out


def _select(split, names, get: Callable[[str], tuple[np.ndarray, np.ndarray]], source):
    """Resolves ``split`` over in-memory splits ``get(name) -> (images, labels)``."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def fetch(name):
        if name not in cache:
            x, y = get(name)
            if len(x) != len(y):  # else the slicing below would silently drop the extras
                raise DataError(
                    f"data.labels: {len(y)} labels for {len(x)} images in {source!r} ({name}); "
                    "allowed: one label per image"
                )
            cache[name] = (x, y)
        return cache[name]

    pieces = _resolve_split(split, _Splits(names, lambda s: len(fetch(s)[1])), source)
    xs = [fetch(s)[0][a:b] for s, a, b in pieces]
    ys = [fetch(s)[1][a:b] for s, a, b in pieces]
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# Validation and statistics


def _as_images(x, field: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{field}: shape {x.shape}; allowed: [N, H, W] or [N, H, W, C]")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        bad = int(x.size - np.isfinite(x).sum())
        if bad:
            raise DataError(
                f"{field}: {bad} NaN or inf values (the first at index "
                f"{tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])}); "
                "allowed: finite pixels in [0, 1]"
            )
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise DataError(
                f"{field}: float pixels in [{x.min():g}, {x.max():g}]; "
                "allowed: [0, 1] (or uint8 0..255)"
            )
        return x
    if np.issubdtype(x.dtype, np.integer) and (x.size == 0 or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise DataError(f"{field}: dtype {x.dtype}; allowed: uint8 0..255 or float in [0, 1]")


def _as_labels(y, field: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        if (
            y.ndim == 1
            and np.issubdtype(y.dtype, np.floating)
            and np.all(np.isfinite(y))
            and np.all(y == np.round(y))
        ):
            return y.astype(np.int32)
        raise DataError(
            f"{field}: shape {y.shape} dtype {y.dtype}; allowed: [N] integer class indices"
        )
    return y.astype(np.int32)


def _pooled_stats(images: np.ndarray) -> tuple[tuple[float, ...], float]:
    """Per-channel mean and ONE std (sqrt of the mean per-channel variance), pixel units."""
    if images.shape[0] == 0:
        raise DataError(
            "data.images: no examples to compute mean/std from; allowed: a non-empty split"
        )
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    c = images.shape[-1]
    s1 = np.zeros(c)
    s2 = np.zeros(c)
    count = 0
    for i in range(0, images.shape[0], 4096):  # chunks: no float64 copy of the whole set
        chunk = images[i : i + 4096].reshape(-1, c).astype(np.float64) / scale
        s1 += chunk.sum(0)
        s2 += np.square(chunk).sum(0)
        count += chunk.shape[0]
    mean = s1 / count
    var = np.maximum(s2 / count - np.square(mean), 0.0)
    std = float(np.sqrt(var.mean()))
    if not std > 0:
        raise DataError(
            "data.std: the images are constant (std 0); allowed: images with some variation"
        )
    return tuple(float(m) for m in mean), std


def _make(source, images, labels, num_classes, mean, std, aug) -> Dataset:
    images = _as_images(images, "data.images")
    labels = _as_labels(labels, "data.labels")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"data.labels: {labels.shape[0]} labels for {images.shape[0]} images in {source!r}; "
            "allowed: one label per image"
        )
    num_classes = int(num_classes)
    if num_classes < 1:
        raise DataError(f"data.num_classes: {num_classes} for {source!r}; allowed: >= 1")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(
            f"data.labels: label {bad} in {source!r} is out of range; allowed: 0..{num_classes - 1}"
        )
    mean = tuple(float(m) for m in np.atleast_1d(np.asarray(mean, np.float64)))
    c = images.shape[-1]
    if len(mean) == 1 and c > 1:
        mean = mean * c
    if len(mean) != c:
        raise DataError(
            f"data.mean: {len(mean)} values for {c} channels in {source!r}; allowed: 1 or {c}"
        )
    std_arr = np.asarray(std, np.float64)
    if std_arr.size != 1 or not np.isfinite(std_arr).all() or float(std_arr.ravel()[0]) <= 0:
        raise DataError(f"data.std: {std!r} for {source!r}; allowed: ONE positive scalar")
    return Dataset(
        images=images,
        labels=labels,
        num_classes=num_classes,
        mean=mean,
        std=float(std_arr.ravel()[0]),
        name=source,
        augment=aug,
    )


# ---------------------------------------------------------------------------------------------
# digits


def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:DIGITS_NUM_TRAIN], perm[DIGITS_NUM_TRAIN:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def _load_digits(split: str) -> Dataset:
    splits = _digits_splits()
    x, y = _select(split, splits, splits.__getitem__, "digits")
    return _make("digits", x, y, 10, (DIGITS_MEAN,), DIGITS_STD, "none")


# ---------------------------------------------------------------------------------------------
# IDX (MNIST format)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(
            f"data.source: cannot read IDX file {path} ({e}); "
            "allowed: an IDX file, gzipped or not"
        ) from None
    got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if got != magic:
        raise DataError(
            f"data.source: bad magic number {got} in IDX file {path}; allowed: {magic} "
            f"(uint8 IDX with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"data.source: IDX file {path} is truncated in its header; "
            "allowed: a complete IDX file"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(
            f"data.source: IDX file {path} holds {len(raw) - header} data bytes for shape {shape}; "
            f"allowed: exactly {size}"
        )
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"data.source: missing IDX file {os.path.join(directory, stem)}[.gz]; "
        f"allowed: a directory holding {stem} or {stem}.gz"
    )


def _load_idx(source: str, directory: str, split: str) -> Dataset:
    if not os.path.isdir(directory):
        raise DataError(
            f"data.source: {source!r}: no directory {directory!r}; "
            "allowed: idx:DIR with IDX files"
        )

    def get(name):
        img_stem, lab_stem = _IDX_FILES[name]
        x = _read_idx(_find(directory, img_stem), 2051, 3)
        y = _read_idx(_find(directory, lab_stem), 2049, 1)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"data.labels: {y.shape[0]} labels for {x.shape[0]} images "
                f"in {directory} ({name}); allowed: one label per image"
            )
        return x[..., None], y

    x, y = _select(split, list(_IDX_FILES), get, source)
    return _make(source, x, y, 10, MNIST_MEAN, MNIST_STD, "mnist")


# ---------------------------------------------------------------------------------------------
# npz


def _load_npz(source: str, path: str, split: str) -> Dataset:
    if not os.path.isfile(path):
        raise DataError(
            f"data.source: {source!r}: no file {path!r}; allowed: npz:FILE with an existing .npz"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error
        raise DataError(
            f"data.source: cannot read {path!r} as .npz ({type(e).__name__}: {e}); "
            "allowed: a NumPy .npz"
        ) from None

    def pick(*keys):
        for k in keys:
            if k in arrays:
                return arrays[k]
        return None

    if all(k in arrays for k in ("x_train", "y_train", "x_test", "y_test")):
        splits = {
            "train": (
                _as_images(arrays["x_train"], "data.x_train"),
                _as_labels(arrays["y_train"], "data.y_train"),
            ),
            "test": (
                _as_images(arrays["x_test"], "data.x_test"),
                _as_labels(arrays["y_test"], "data.y_test"),
            ),
        }
    else:
        x, y = pick("x", "images"), pick("y", "labels")
        if x is None or y is None:
            raise DataError(
                f"data.source: {path!r} has arrays {sorted(arrays)}; allowed: x/images + y/labels, "
                "or x_train + y_train + x_test + y_test"
            )
        whole = (_as_images(x, "data.images"), _as_labels(y, "data.labels"))
        splits = {"train": whole, "test": whole}

    train_x = splits["train"][0]
    if "mean" in arrays or "std" in arrays:
        if "mean" not in arrays or "std" not in arrays:
            raise DataError(
                f"data.mean: {path!r} has only one of mean/std; allowed: both or neither"
            )
        mean, std = arrays["mean"], arrays["std"]
    else:
        mean, std = _pooled_stats(train_x)
    if "num_classes" in arrays:
        num_classes = int(np.asarray(arrays["num_classes"]).ravel()[0])
    else:
        all_labels = np.concatenate([splits["train"][1], splits["test"][1]])
        num_classes = int(all_labels.max()) + 1 if all_labels.size else 1
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DataError(
            f"data.images: x_train is {splits['train'][0].shape[1:]} but x_test is "
            f"{splits['test'][0].shape[1:]} in {path!r}; allowed: the same [H, W, C]"
        )
    x, y = _select(split, splits, splits.__getitem__, source)
    return _make(source, x, y, num_classes, mean, std, "none")


# ---------------------------------------------------------------------------------------------
# TFDS


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def _install_hint(name: str) -> str:
    return (
        f"pip install tensorflow-cpu and rerun, or prepare it with "
        f"`tfds build {name} --file_format=array_record` "
        "(add --data_dir=DIR when you pass data_dir)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _needs_tf(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ImportError) and "tensorflow" in (
            (getattr(e, "name", None) or "") + " " + str(e)
        ).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_tfds(source: str, name: str, split: str, data_dir: str | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise DataError(
            f"data.source: {source!r} needs tensorflow-datasets ({e}); "
            "pip install tensorflow-datasets"
        ) from None

    data_dir = None if data_dir is None else os.fspath(data_dir)
    builder_kwargs = {"file_format": "array_record"}
    try:
        builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"data.source: no TFDS data set named {name!r}; "
            "allowed: a name from tfds.list_builders() "
            "or a registered tfds.core.GeneratorBasedBuilder"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"data.source: cannot open TFDS data set {name!r} ({_first_line(e)})"
        ) from None

    if not builder.is_prepared():
        stock = type(builder).__module__.startswith("tensorflow_datasets.")
        if stock and not _tensorflow_available():
            raise DataError(
                f"data.source: TFDS data set {name!r} is not prepared in "
                f"{builder.data_dir!s} and preparing it needs TensorFlow: {_install_hint(name)}"
            )
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001
            if _needs_tf(e):
                raise DataError(
                    f"data.source: preparing TFDS data set {name!r} needs TensorFlow: "
                    f"{_install_hint(name)}"
                ) from None
            raise DataError(
                f"data.source: cannot prepare TFDS data set {name!r} ({_first_line(e)})"
            ) from None

    info = builder.info
    features = info.features
    for key in ("image", "label"):
        if key not in features:
            raise DataError(
                f"data.source: TFDS data set {name!r} has features {sorted(features.keys())}; "
                "allowed: data sets with 'image' and 'label' features"
            )

    def read(spec: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            ds = tfds.data_source(
                name,
                split=spec,
                data_dir=data_dir,
                builder_kwargs=builder_kwargs,
                download=False,
            )
        except Exception as e:  # noqa: BLE001
            if _needs_tf(e):
                raise DataError(
                    f"data.source: reading TFDS data set {name!r} needs TensorFlow: "
                    f"{_install_hint(name)}"
                ) from None
            raise DataError(
                f"data.source: cannot read TFDS data set {name!r} with random access "
                f"({_first_line(e)}); "
                f"rebuild it with `tfds build {name} --file_format=array_record`"
            ) from None
        n = len(ds)
        images, labels = [], []
        for start in range(0, n, 2048):
            for ex in ds.__getitems__(list(range(start, min(n, start + 2048)))):
                images.append(np.asarray(ex["image"]))
                labels.append(np.asarray(ex["label"]))
        if not images:
            return (
                np.zeros((0,) + tuple(features["image"].shape), np.uint8),
                np.zeros((0,), np.int32),
            )
        return np.stack(images), np.stack(labels)

    # Validate the split spec (one-line DataError) before reading.
    _resolve_split(split, info.splits, source)
    x, y = read(split)
    x = _as_images(x, "data.images")
    y = _as_labels(y, "data.labels")

    label_feature = features["label"]
    num_classes = getattr(label_feature, "num_classes", None)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 1

    base = _base_name(name)
    if base in KNOWN_TFDS:
        mean, std, aug = KNOWN_TFDS[base]
    else:
        aug = "none"
        if "train" in info.splits and split.strip() != "train":
            mean, std = _pooled_stats(_as_images(read("train")[0], "data.images"))
        else:
            mean, std = _pooled_stats(x)
    return _make(source, x, y, num_classes, mean, std, aug)
