"""The readers behind :func:`linf_jax.data.load`: scikit-learn's digits (shipped in the wheel),
MNIST-format IDX files, NumPy ``.npz`` files and TFDS data sets read without TensorFlow. The
``source`` strings, splits and normalisation they follow are described in :mod:`linf_jax.data`.

Each reader returns a :class:`~linf_jax.data.Dataset` checked by :mod:`linf_jax.data_arrays`, or
raises :class:`~linf_jax.data.DataError` with one line naming the field.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from linf_jax.data_arrays import (
    as_images,
    as_labels,
    make_dataset,
    pooled_stats,
    resolve_split,
    select_rows,
)
from linf_jax.dataset import (
    DIGITS_MEAN,
    DIGITS_NUM_TRAIN,
    DIGITS_STD,
    MNIST_MEAN,
    MNIST_STD,
    NAMED_SOURCES,
    Dataset,
    known_tfds,
)
from linf_jax.errors import DataError, first_line

# ---------------------------------------------------------------------------------------------
# digits


def _digits_file() -> str | None:
    """The digits file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``), found
    without importing scikit-learn; None where it is not there."""
    spec = importlib.util.find_spec("sklearn")  # a top-level package: found, not imported
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float64 in 0..16, labels [1797])``: scikit-learn's digits.

    Parsed from the file scikit-learn ships as its ``load_digits`` parses it (comma-separated,
    64 pixels then the label per row), because importing scikit-learn (and the SciPy modules it
    imports) is a noticeable cost in every train.py and certify.py process on the digits
    (BENCHMARKS.md); the values are scikit-learn's own (tests/test_data.py compares them). Where
    the file is not found (another layout of scikit-learn), ``sklearn.datasets.load_digits``."""
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, target = digits_arrays()
    x = (images.astype(np.float32) / 16.0)[..., None]
    y = target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:DIGITS_NUM_TRAIN], perm[DIGITS_NUM_TRAIN:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def load_digits(split: str) -> Dataset:
    splits = _digits_splits()
    x, y = select_rows(split, splits, splits.__getitem__, "digits")
    return make_dataset("digits", x, y, 10, (DIGITS_MEAN,), DIGITS_STD, "none")


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


def load_idx(source: str, directory: str, split: str) -> Dataset:
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

    x, y = select_rows(split, list(_IDX_FILES), get, source)
    return make_dataset(source, x, y, 10, MNIST_MEAN, MNIST_STD, "mnist")


# ---------------------------------------------------------------------------------------------
# npz


def _read_npz(source: str, path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(
            f"data.source: {source!r}: no file {path!r}; allowed: {source.partition(':')[0]}:FILE "
            "with an existing .npz"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error
        raise DataError(
            f"data.source: cannot read {path!r} as .npz ({type(e).__name__}: {e}); "
            "allowed: a NumPy .npz"
        ) from None


def _split_arrays(arrays: dict, path: str, single_ok: bool = True) -> dict:
    """``{'train': (images, labels), 'test': (...)}`` from x_train/y_train/x_test/y_test, or
    (``single_ok``) from x/images + y/labels, the whole file being both splits."""
    if all(k in arrays for k in ("x_train", "y_train", "x_test", "y_test")):
        return {
            "train": (
                as_images(arrays["x_train"], "data.x_train"),
                as_labels(arrays["y_train"], "data.y_train"),
            ),
            "test": (
                as_images(arrays["x_test"], "data.x_test"),
                as_labels(arrays["y_test"], "data.y_test"),
            ),
        }

    def pick(*keys):
        for k in keys:
            if k in arrays:
                return arrays[k]
        return None

    x, y = pick("x", "images"), pick("y", "labels")
    if not single_ok or x is None or y is None:
        allowed = ("x/images + y/labels, or " if single_ok else "") + \
            "x_train + y_train + x_test + y_test"
        raise DataError(f"data.source: {path!r} has arrays {sorted(arrays)}; allowed: {allowed}")
    whole = (as_images(x, "data.images"), as_labels(y, "data.labels"))
    return {"train": whole, "test": whole}


def load_npz(source: str, path: str, split: str) -> Dataset:
    arrays = _read_npz(source, path)
    splits = _split_arrays(arrays, path)

    train_x = splits["train"][0]
    if "mean" in arrays or "std" in arrays:
        if "mean" not in arrays or "std" not in arrays:
            raise DataError(
                f"data.mean: {path!r} has only one of mean/std; allowed: both or neither"
            )
        mean, std = arrays["mean"], arrays["std"]
    else:
        mean, std = pooled_stats(train_x)
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
    x, y = select_rows(split, splits, splits.__getitem__, source)
    return make_dataset(source, x, y, num_classes, mean, std, "none")


def load_named_npz(source: str, name: str, path: str, split: str) -> Dataset:
    """``NAME:FILE`` for a data set of :data:`linf_jax.dataset.NAMED_SOURCES` (``tinyimagenet``,
    ``imagenet64``): an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images
    uint8 ``[N, H, W, C]`` of the data set's shape, labels ``0..num_classes − 1``), normalised
    with the data set's official constants (any ``mean``/``std`` in the file are not read)."""
    spec = NAMED_SOURCES[name]
    splits = _split_arrays(_read_npz(source, path), path, single_ok=False)
    for key, (x, _) in splits.items():
        if x.shape[1:] != spec.image_shape:
            raise DataError(
                f"data.images: x_{key} of {path!r} is {x.shape[1:]}; allowed: "
                f"{spec.image_shape} ({name})"
            )
    x, y = select_rows(split, splits, splits.__getitem__, source)
    return make_dataset(source, x, y, spec.num_classes, spec.mean, spec.std, spec.augment)


def pack_tinyimagenet(folder: str, out: str) -> str:
    """Writes the Tiny ImageNet folder ``folder`` (``tiny-imagenet-200``, as downloaded) to the
    ``.npz`` the ``tinyimagenet:FILE`` source reads, and returns ``out``.

    Classes are the sorted folder names of ``train/`` (torchvision's ``ImageFolder`` order, as
    SortNet's loader); ``train`` is every image under ``train/<wnid>/``, ``test`` the 10,000
    images of ``val/``, labelled from ``val/val_annotations.txt`` (the download's layout) or by
    their folder ``val/<wnid>/`` (a validation folder already sorted into classes). Images are
    decoded with Pillow and converted to RGB (a few are grey), uint8 ``[N, 64, 64, 3]``, in
    sorted file order per class."""
    from PIL import Image

    def images_under(d):
        return sorted(os.path.join(root, f) for root, _, files in os.walk(d) for f in files
                      if f.lower().endswith((".jpeg", ".jpg", ".png")))

    def decode(paths):
        arr = np.zeros((len(paths), 64, 64, 3), np.uint8)
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                arr[i] = np.asarray(im.convert("RGB"))
        return arr

    train_dir, val_dir = os.path.join(folder, "train"), os.path.join(folder, "val")
    if not os.path.isdir(train_dir) or not os.path.isdir(val_dir):
        raise DataError(f"data.source: {folder!r} has no train/ and val/ folders; allowed: the "
                        "tiny-imagenet-200 folder")
    classes = sorted(d for d in os.listdir(train_dir)
                     if os.path.isdir(os.path.join(train_dir, d)))
    index = {c: i for i, c in enumerate(classes)}
    train = [(p, index[c]) for c in classes for p in images_under(os.path.join(train_dir, c))]
    notes = os.path.join(val_dir, "val_annotations.txt")
    if os.path.isfile(notes):
        with open(notes) as f:
            rows = [line.split("\t")[:2] for line in f if line.strip()]
        test = [(os.path.join(val_dir, "images", fname), index[wnid])
                for fname, wnid in sorted(rows)]
    else:
        test = [(p, index[c]) for c in classes for p in images_under(os.path.join(val_dir, c))]
    np.savez(out, x_train=decode([p for p, _ in train]),
             y_train=np.array([y for _, y in train], np.int32),
             x_test=decode([p for p, _ in test]), y_test=np.array([y for _, y in test], np.int32))
    return out


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


def _mock_serves(tfds, name, split, data_dir, builder_kwargs) -> bool:
    """Whether ``tfds.data_source`` serves the unprepared ``name`` (tfds.testing.mock_data)."""
    try:
        tfds.data_source(name, split=split, data_dir=data_dir, builder_kwargs=builder_kwargs,
                         download=False)
        return True
    except Exception:  # noqa: BLE001 - not prepared, not mocked
        return False


def _tfds_error(e: BaseException, verb: str, name: str, how: str = "", hint: str = ""
                ) -> DataError:
    """One line for a TFDS failure to ``verb`` ('prepare', 'read') data set ``name``: the
    TensorFlow it needs, or the library's own first line."""
    if _needs_tf(e):
        return DataError(f"data.source: {verb[:-1] if verb.endswith('e') else verb}ing TFDS "
                         f"data set {name!r} needs TensorFlow: {_install_hint(name)}")
    how = f" {how}" if how else ""
    return DataError(f"data.source: cannot {verb} TFDS data set {name!r}{how} "
                     f"({first_line(e, with_type=True)}){hint}")


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


def load_tfds(source: str, name: str, split: str, data_dir: str | None) -> Dataset:
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
            f"data.source: cannot open TFDS data set {name!r} ({first_line(e, with_type=True)})"
        ) from None

    # Under tfds.testing.mock_data (how TFDS users test their pipelines) nothing is prepared,
    # yet tfds.data_source serves generated examples: read them, as a prepared set.
    mocked = not builder.is_prepared() and _mock_serves(tfds, name, split, data_dir,
                                                         builder_kwargs)
    fmt = str(getattr(builder.info, "file_format", "") or "").lower()
    if builder.is_prepared() and "tfrecord" in fmt and not _tensorflow_available():
        raise DataError(
            f"data.source: TFDS data set {name!r} is prepared in {builder.data_dir!s} as "
            f"TFRecord files, which need TensorFlow to read; allowed: array_record data "
            f"(`tfds build {name} --file_format=array_record`) or pip install tensorflow-cpu")
    if not builder.is_prepared() and not mocked:
        stock = type(builder).__module__.startswith("tensorflow_datasets.")
        if stock and not _tensorflow_available():
            raise DataError(
                f"data.source: TFDS data set {name!r} is not prepared in "
                f"{builder.data_dir!s} and preparing it needs TensorFlow: {_install_hint(name)}"
            )
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001
            raise _tfds_error(e, "prepare", name) from None

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
            raise _tfds_error(e, "read", name, "with random access",
                              f"; rebuild it with `tfds build {name} --file_format=array_record`"
                              ) from None
        n = len(ds)
        images, labels = [], []
        for start in range(0, n, 2048):
            keys = list(range(start, min(n, start + 2048)))
            try:
                batch = ds.__getitems__(keys)
            except TypeError:  # mock_data's source reads one record at a time
                batch = [ds[i] for i in keys]
            for ex in batch:
                images.append(np.asarray(ex["image"]))
                labels.append(np.asarray(ex["label"]))
        if not images:
            return (
                np.zeros((0,) + tuple(features["image"].shape), np.uint8),
                np.zeros((0,), np.int32),
            )
        return np.stack(images), np.stack(labels)

    # Validate the split spec (one-line DataError) before reading.
    if info.splits:  # mock_data has none: tfds.data_source checks the split itself
        resolve_split(split, info.splits, source)
    x, y = read(split)
    x = as_images(x, "data.images")
    y = as_labels(y, "data.labels")

    label_feature = features["label"]
    num_classes = getattr(label_feature, "num_classes", None)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 1

    known = known_tfds(name)
    if known is not None:
        mean, std, aug = known
    else:
        aug = "none"
        if "train" in info.splits and split.strip() != "train":
            mean, std = pooled_stats(as_images(read("train")[0], "data.images"))
        else:
            mean, std = pooled_stats(x)
    return make_dataset(source, x, y, num_classes, mean, std, aug)
