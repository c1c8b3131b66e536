"""Host arrays of a split, shared by the readers of :mod:`linf_jax.data_sources`: TFDS slicing
syntax over in-memory splits, the checks every reader's images and labels pass, the pooled
per-channel mean and scalar std, and the :class:`~linf_jax.data.Dataset` they become.

Every problem raises :class:`~linf_jax.data.DataError` with one line naming the field.
"""

from __future__ import annotations

import collections.abc
import types
from collections.abc import Callable

import numpy as np

from linf_jax.dataset import Dataset
from linf_jax.errors import DataError, first_line

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


def resolve_split(split: str, split_infos, source: str) -> list[tuple[str, int, int]]:
    """TFDS split spec → ``[(split name, start, stop), ...]`` (absolute, to be concatenated).

    A plain split name (``'train'``) is the whole split, without TFDS; slices and sums
    (``'train[:80%]'``, ``'train+test'``) are TFDS's split syntax, read by
    tensorflow-datasets (an image without it still trains on whole splits)."""
    allowed = ", ".join(repr(s) for s in split_infos) or "none"
    if split in split_infos:
        return [(split, 0, int(split_infos[split].num_examples))]
    try:
        from tensorflow_datasets.core import splits as tfds_splits
    except ImportError:
        raise DataError(
            f"data.split: {split!r} for {source!r} needs tensorflow-datasets for TFDS slicing "
            f"(pip install tensorflow-datasets); allowed without it: a whole split, one of "
            f"{allowed}") from None
    try:
        instructions = tfds_splits.ReadInstruction.from_spec(split).to_absolute(split_infos)
    except DataError:
        raise
    except (ValueError, KeyError, NotImplementedError, TypeError) as e:
        reason = first_line(e)
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


def select_rows(split, names, get: Callable[[str], tuple[np.ndarray, np.ndarray]], source):
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

    pieces = resolve_split(split, _Splits(names, lambda s: len(fetch(s)[1])), source)
    xs = [fetch(s)[0][a:b] for s, a, b in pieces]
    ys = [fetch(s)[1][a:b] for s, a, b in pieces]
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# Validation and statistics


def as_images(x, field: str) -> np.ndarray:
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


def as_labels(y, field: str) -> np.ndarray:
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


def pooled_stats(images: np.ndarray) -> tuple[tuple[float, ...], float]:
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


def make_dataset(source, images, labels, num_classes, mean, std, aug) -> Dataset:
    images = as_images(images, "data.images")
    labels = as_labels(labels, "data.labels")
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
