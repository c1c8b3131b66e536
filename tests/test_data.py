"""Data sources (digits, idx, npz, tfds), TFDS split syntax, normalisation and augmentation."""

import collections
import gzip
import importlib.util
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO

from linf_jax import data, dataset
from linf_jax.errors import DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The MNIST test split as IDX files: the folder $LINF_JAX_MNIST_DIR names, else a folder named
# shared/data/mnist beside the checkout, where this project's CI keeps the real MNIST test set;
# tests that need it skip when it is absent.
MNIST_DIR = os.environ.get("LINF_JAX_MNIST_DIR",
                           os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def _one_line_error(excinfo, field):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert msg.startswith(field + ":"), msg
    return msg


def _np_pooled(x):
    """Per-channel mean and sqrt(mean per-channel variance), float64, pixel units."""
    x = np.asarray(x, np.float64)
    if x.ndim == 3:
        x = x[..., None]
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(0), float(np.sqrt(flat.var(0).mean()))


# ---------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


def test_digits_shapes_dtype_range(digits):
    train, test = digits
    assert train.images.shape == (1437, 8, 8, 1)
    assert test.images.shape == (360, 8, 8, 1)
    for d in (train, test):
        assert d.images.dtype == np.float32
        assert d.labels.dtype == np.int32
        assert d.images.min() >= 0.0 and d.images.max() <= 1.0
        assert d.images.max() == 1.0  # value 16 / 16 occurs
        assert d.num_classes == 10
        assert d.input_shape == (8, 8, 1)
        assert d.augment == "none"
        assert d.name == "digits"
        assert len(d) == d.images.shape[0]
    assert set(np.unique(train.labels)) == set(range(10))
    assert set(np.unique(test.labels)) == set(range(10))


def _pairs(d):
    return collections.Counter(
        (x.tobytes(), int(y)) for x, y in zip(d.images, d.labels, strict=True)
    )


def test_digits_disjoint_and_whole_set(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    whole = collections.Counter(
        ((img.astype(np.float32) / 16.0)[..., None].tobytes(), int(t))
        for img, t in zip(raw.images, raw.target, strict=True)
    )
    train, test = digits
    tr = _pairs(train)
    te = _pairs(test)
    assert not set(tr) & set(te)
    assert len(train) + len(test) == 1797
    assert tr + te == whole
    # the documented split: rng(0) permutation, first 1,437 are train
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(train.labels, raw.target[perm[:1437]])
    np.testing.assert_array_equal(test.images[..., 0], raw.images[perm[1437:]] / 16.0)


def test_digits_are_scikit_learns_without_importing_it(monkeypatch):
    """The digits file is parsed to exactly what ``sklearn.datasets.load_digits`` returns, in a
    process that never imports scikit-learn (or SciPy); without the file, scikit-learn's loader
    gives the same arrays."""
    from sklearn.datasets import load_digits

    from linf_jax import data_sources

    raw = load_digits()
    for path in (data_sources._digits_file(), None):
        assert path is None or path.endswith("digits.csv.gz")
        monkeypatch.setattr(data_sources, "_digits_file", lambda p=path: p)
        images, target = data_sources.digits_arrays()
        np.testing.assert_array_equal(images, raw.images)
        np.testing.assert_array_equal(target, raw.target)
        assert images.dtype == raw.images.dtype and images.shape == (1797, 8, 8)
    code = ("import sys; from linf_jax import data; d = data.load('digits', 'train[:10]'); "
            "print(len(d), [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["10", "[]"], out.stderr[-2000:]


def test_digits_split_is_fixed(digits):
    again = data.load("digits", "train"), data.load("digits", "test")
    for a, b in zip(digits, again, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_digits_mean_std_constants(digits):
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float64) / 16.0
    assert abs(dataset.DIGITS_MEAN - x.mean()) < 1e-8
    assert abs(dataset.DIGITS_STD - x.std()) < 1e-8  # population std (ddof=0)
    for d in digits:
        assert d.mean == pytest.approx((x.mean(),), abs=1e-8)
        assert d.std == pytest.approx(x.std(), abs=1e-8)


def test_digits_split_syntax(digits):
    train, test = digits
    d = data.load("digits", "train[10%:]")
    start = int(round(0.1 * 1437))
    assert len(d) == 1437 - start
    np.testing.assert_array_equal(d.images, train.images[start:])
    both = data.load("digits", "train+test")
    assert len(both) == 1797
    np.testing.assert_array_equal(both.labels, np.concatenate([train.labels, test.labels]))
    np.testing.assert_array_equal(data.load("digits", "test[-10:]").labels, test.labels[-10:])


@pytest.mark.parametrize("split", ["validation", "train[", "train[:200%]", "foo+test", " "])
def test_bad_split_is_one_line_error(split):
    with pytest.raises(DataError) as e:
        data.load("digits", split)
    _one_line_error(e, "data.split")


@pytest.mark.parametrize("source", ["", "nope", "idx:", "csv:foo"])
def test_bad_source(source):
    with pytest.raises(DataError) as e:
        data.load(source, "train")
    _one_line_error(e, "data.source")


# ---------------------------------------------------------------------------------------------
# idx


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason=f"no MNIST IDX files in {MNIST_DIR}")
def test_idx_real_mnist_test_halves():
    src = "idx:" + MNIST_DIR
    a = data.load(src, "test[:5000]")
    b = data.load(src, "test[5000:]")
    for d in (a, b):
        assert d.images.shape == (5000, 28, 28, 1)
        assert d.images.dtype == np.uint8
        assert d.labels.dtype == np.int32
        assert set(np.unique(d.labels)) == set(range(10))
        assert d.num_classes == 10
        assert d.mean == (0.1307,) and d.std == 0.3081
        assert d.augment == "mnist"
    assert not {x.tobytes() for x in a.images} & {x.tobytes() for x in b.images}
    whole = data.load(src, "test[:5000]+test[5000:]")
    assert len(whole) == 10000
    np.testing.assert_array_equal(whole.images[5000:], b.images)
    np.testing.assert_array_equal(whole.labels[:5000], a.labels)


def _idx_bytes(arr, magic):
    arr = np.ascontiguousarray(arr, np.uint8)
    return struct.pack(">i", magic) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


def _write_idx(directory, stem, arr, magic, gz):
    payload = _idx_bytes(arr, magic)
    path = os.path.join(directory, stem + (".gz" if gz else ""))
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    return path


def _make_idx_dir(directory, gz, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 6, 5), dtype=np.uint8),
                  rng.integers(0, 10, n_train).astype(np.uint8)),
        "test": (rng.integers(0, 256, (n_test, 6, 5), dtype=np.uint8),
                 rng.integers(0, 10, n_test).astype(np.uint8)),
    }
    prefix = {"train": "train", "test": "t10k"}
    for name, (x, y) in arrays.items():
        _write_idx(directory, f"{prefix[name]}-images-idx3-ubyte", x, 2051, gz)
        _write_idx(directory, f"{prefix[name]}-labels-idx1-ubyte", y, 2049, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_small_set(tmp_path, gz):
    arrays = _make_idx_dir(tmp_path, gz)
    src = f"idx:{tmp_path}"
    for name in ("train", "test"):
        d = data.load(src, name)
        x, y = arrays[name]
        assert d.images.shape == x.shape + (1,) and d.images.dtype == np.uint8
        np.testing.assert_array_equal(d.images[..., 0], x)
        np.testing.assert_array_equal(d.labels, y.astype(np.int32))
        assert d.num_classes == 10 and d.augment == "mnist"
    both = data.load(src, "train+test")
    assert len(both) == 17
    np.testing.assert_array_equal(both.labels[12:], arrays["test"][1])
    part = data.load(src, "train[25%:50%]")
    np.testing.assert_array_equal(part.images[..., 0], arrays["train"][0][3:6])


def test_idx_plain_file_wins_over_gz(tmp_path):
    arrays = _make_idx_dir(tmp_path, gz=True, seed=0)
    plain = _make_idx_dir(tmp_path, gz=False, seed=1)
    d = data.load(f"idx:{tmp_path}", "test")
    np.testing.assert_array_equal(d.images[..., 0], plain["test"][0])
    assert not np.array_equal(plain["test"][0], arrays["test"][0])


@pytest.mark.parametrize("gz", [True, False])
def test_idx_bad_magic(tmp_path, gz):
    _make_idx_dir(tmp_path, gz)
    stem = "t10k-images-idx3-ubyte"
    _write_idx(tmp_path, stem, np.zeros((5, 6, 5), np.uint8), 2049, gz)  # labels' magic
    with pytest.raises(DataError) as e:
        data.load(f"idx:{tmp_path}", "test")
    msg = _one_line_error(e, "data.source")
    assert "magic" in msg and "2049" in msg and "2051" in msg and stem in msg
    data.load(f"idx:{tmp_path}", "train")  # the other split is still fine


def test_idx_other_errors(tmp_path):
    _make_idx_dir(tmp_path, gz=False)
    # 4 labels for 5 images
    _write_idx(tmp_path, "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), 2049, False)
    with pytest.raises(DataError) as e:
        data.load(f"idx:{tmp_path}", "test")
    _one_line_error(e, "data.labels")
    # truncated data
    path = os.path.join(tmp_path, "train-images-idx3-ubyte")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:-3])
    with pytest.raises(DataError) as e:
        data.load(f"idx:{tmp_path}", "train")
    assert "data bytes" in _one_line_error(e, "data.source")
    with pytest.raises(DataError) as e:
        data.load(f"idx:{tmp_path / 'missing'}", "train")
    _one_line_error(e, "data.source")
    os.remove(path)
    with pytest.raises(DataError) as e:
        data.load(f"idx:{tmp_path}", "train")
    assert "train-images-idx3-ubyte" in _one_line_error(e, "data.source")


# ---------------------------------------------------------------------------------------------
# npz


def test_npz_single_layout_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 7, 6), dtype=np.uint8)
    y = rng.integers(0, 4, 20)
    y[3] = 4
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    src = f"npz:{path}"
    train, test = data.load(src, "train"), data.load(src, "test")
    for d in (train, test):
        assert d.images.shape == (20, 7, 6, 1) and d.images.dtype == np.uint8
        np.testing.assert_array_equal(d.images[..., 0], x)
        np.testing.assert_array_equal(d.labels, y)
        assert d.labels.dtype == np.int32
        assert d.num_classes == 5 and d.augment == "none"
    mean, std = _np_pooled(x / 255.0)
    assert train.mean == pytest.approx(tuple(mean), rel=1e-9)
    assert train.std == pytest.approx(std, rel=1e-9)
    assert (test.mean, test.std) == (train.mean, train.std)
    part = data.load(src, "train[10%:]")
    np.testing.assert_array_equal(part.labels, y[2:])
    # 'images'/'labels' aliases
    np.savez(path, images=x, labels=y)
    np.testing.assert_array_equal(data.load(src, "test").images[..., 0], x)


def test_npz_train_test_layout_float(tmp_path):
    rng = np.random.default_rng(1)
    xtr = rng.random((16, 5, 5, 3))  # float64 in [0, 1)
    xte = rng.random((6, 5, 5, 3)).astype(np.float32)
    ytr, yte = rng.integers(0, 3, 16), np.array([0, 1, 2, 6, 1, 0])
    path = tmp_path / "d.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    src = f"npz:{path}"
    train, test = data.load(src, "train"), data.load(src, "test")
    assert train.images.dtype == np.float32 and train.images.shape == (16, 5, 5, 3)
    np.testing.assert_allclose(train.images, xtr, rtol=1e-7)
    np.testing.assert_array_equal(test.images, xte)
    np.testing.assert_array_equal(test.labels, yte)
    assert train.num_classes == test.num_classes == 7  # max over both splits + 1
    mean, std = _np_pooled(xtr)  # from x_train only, identical for every split
    for d in (train, test):
        assert d.mean == pytest.approx(tuple(mean), rel=1e-6)
        assert d.std == pytest.approx(std, rel=1e-6)
    assert len(set(train.mean)) == 3
    both = data.load(src, "train+test")
    assert len(both) == 22


def test_npz_explicit_mean_std_num_classes(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(8) % 2, mean=np.array([0.1, 0.2, 0.3]), std=np.array(0.25),
             num_classes=np.array(10))
    d = data.load(f"npz:{path}", "train")
    assert d.mean == pytest.approx((0.1, 0.2, 0.3)) and d.std == 0.25 and d.num_classes == 10
    np.savez(path, x=x, y=np.arange(8) % 2, mean=np.array(0.5), std=np.array(0.2))
    d = data.load(f"npz:{path}", "train")
    assert d.mean == pytest.approx((0.5, 0.5, 0.5)) and d.std == pytest.approx(0.2)
    np.savez(path, x=x, y=np.arange(8) % 2, mean=np.array(0.5))
    with pytest.raises(DataError) as e:
        data.load(f"npz:{path}", "train")
    _one_line_error(e, "data.mean")
    np.savez(path, x=x, y=np.arange(8) % 2, mean=np.array(0.5), std=np.array([0.2, 0.3, 0.4]))
    with pytest.raises(DataError) as e:
        data.load(f"npz:{path}", "train")
    _one_line_error(e, "data.std")


def _rand(shape, dtype=np.float64):
    x = np.random.default_rng(3).random(shape)
    return (x * 255).astype(np.uint8) if dtype == np.uint8 else x.astype(dtype)


@pytest.mark.parametrize(
    "arrays, field",
    [
        (dict(x=_rand((5, 4, 4), np.uint8), y=np.zeros(4, int)), "data.labels"),  # lengths
        (dict(x_train=_rand((3, 2, 2)), y_train=np.zeros(2, int),
              x_test=_rand((1, 2, 2)), y_test=np.zeros(1, int)), "data.labels"),
        (dict(x=_rand((5, 16), np.uint8), y=np.zeros(5, int)), "data.images"),  # ndim 2
        (dict(x=_rand((5, 2, 2, 1, 1), np.uint8), y=np.zeros(5, int)), "data.images"),
        (dict(x=_rand((5, 4, 4), np.uint8), y=np.zeros((5, 2), int)), "data.labels"),
        (dict(x=_rand((3, 4, 4), np.uint8), y=np.array([0, -1, 1])), "data.labels"),
        (dict(x_train=_rand((3, 4, 4)), y_train=np.array([0, 1, -2]),
              x_test=_rand((1, 4, 4)), y_test=np.zeros(1, int)), "data.labels"),
        (dict(x=_rand((3, 4, 4)) + 0.6, y=np.zeros(3, int)), "data.images"),  # float > 1
        (dict(x=_rand((3, 4, 4)) * 300, y=np.zeros(3, int)), "data.images"),
        (dict(x=(_rand((3, 4, 4)) * 300).astype(int), y=np.zeros(3, int)), "data.images"),
        (dict(x=_rand((3, 4, 4), np.uint8), y=np.array([0.5, 1, 1])), "data.labels"),
        (dict(x_train=_rand((3, 4, 4)), y_train=np.zeros(3, int),
              x_test=_rand((1, 5, 5)), y_test=np.zeros(1, int)), "data.images"),
        (dict(a=_rand((3, 4, 4)), b=np.zeros(3)), "data.source"),  # unknown keys
        (dict(x=np.zeros((3, 4, 4)), y=np.array([0, 1, 1])), "data.std"),  # constant images
    ],
)
def test_npz_errors(tmp_path, arrays, field):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as e:
        data.load(f"npz:{path}", "train")
    _one_line_error(e, field)


def test_npz_missing_or_unreadable(tmp_path):
    with pytest.raises(DataError) as e:
        data.load(f"npz:{tmp_path / 'nope.npz'}", "train")
    _one_line_error(e, "data.source")
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError) as e:
        data.load(f"npz:{path}", "train")
    _one_line_error(e, "data.source")


# ---------------------------------------------------------------------------------------------
# tfds on a data set made here (no download, no TensorFlow needed)

_TINY_TRAIN, _TINY_TEST = 6, 4


def _tiny_image(value):
    img = np.full((8, 8, 1), value, np.uint8)
    img[0, 0, 0] = 200
    return img


def _tiny_label(value):
    """3 classes, but the test split (values 100..103) only uses labels 0 and 1."""
    return value % 3 if value < 100 else value % 2


class LinfJaxTinyLocal(tfds.core.GeneratorBasedBuilder):
    """8×8×1 uint8 images, 3 classes; image value v has label _tiny_label(v).

    Images are yielded as PIL images: TFDS encodes those to PNG with Pillow, whereas a NumPy
    image would be PNG-encoded with TensorFlow (which the TF-less install does not have).
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs() would read README/CITATION
        # metadata from the defining module's folder.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(_TINY_TRAIN, 0),
            "test": self._generate_examples(_TINY_TEST, 100),
        }

    def _generate_examples(self, n, offset):
        from PIL import Image

        for i in range(n):
            img = _tiny_image(offset + i)
            label = _tiny_label(offset + i)
            yield i, {"image": Image.fromarray(img[..., 0], mode="L"), "label": label}


class LinfJaxTinyNumpyImages(LinfJaxTinyLocal):
    """The same, but yields NumPy images: preparing them needs TensorFlow."""

    def _generate_examples(self, n, offset):
        for i in range(n):
            yield i, {"image": _tiny_image(offset + i), "label": _tiny_label(offset + i)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _check_tiny(d, values):
    assert d.images.dtype == np.uint8 and d.images.shape == (len(values), 8, 8, 1)
    assert d.labels.dtype == np.int32
    assert sorted(int(v) for v in d.images[:, 1, 1, 0]) == sorted(values)
    for img, label in zip(d.images, d.labels, strict=True):
        np.testing.assert_array_equal(img, _tiny_image(img[1, 1, 0]))
        assert label == _tiny_label(int(img[1, 1, 0]))
    assert d.num_classes == 3  # from the ClassLabel, not max(label) + 1
    assert d.augment == "none"


def test_tfds_local_builder(tiny_dir):
    name = LinfJaxTinyLocal.name
    assert name == "linf_jax_tiny_local"
    d = data.load(f"tfds:{name}", "train[:4]", data_dir=tiny_dir)
    assert len(d) == 4
    assert set(d.images[:, 1, 1, 0]) <= set(range(_TINY_TRAIN))
    _check_tiny(d, list(d.images[:, 1, 1, 0]))
    assert d.name == f"tfds:{name}"
    assert os.path.isdir(os.path.join(tiny_dir, name, "1.0.0"))
    # unknown name: mean and pooled std from the WHOLE train split, for every split
    pixels = np.stack([_tiny_image(v) for v in range(_TINY_TRAIN)]) / 255.0
    mean, std = _np_pooled(pixels)
    assert d.mean == pytest.approx(tuple(mean), rel=1e-9)
    assert d.std == pytest.approx(std, rel=1e-9)
    # now prepared: read again without preparing, other splits and slicing
    full = data.load(f"tfds:{name}", "train", data_dir=tiny_dir)
    _check_tiny(full, list(range(_TINY_TRAIN)))
    assert full.mean == pytest.approx(d.mean) and full.std == pytest.approx(d.std)
    test = data.load(f"tfds:{name}", "test", data_dir=tiny_dir)
    _check_tiny(test, [100, 101, 102, 103])
    assert test.labels.max() == 1  # so num_classes 3 came from the ClassLabel
    assert test.mean == pytest.approx(d.mean) and test.std == pytest.approx(d.std)
    both = data.load(f"tfds:{name}", "train+test", data_dir=tiny_dir)
    _check_tiny(both, list(range(_TINY_TRAIN)) + [100, 101, 102, 103])
    tail = data.load(f"tfds:{name}", "train[50%:]", data_dir=tiny_dir)
    np.testing.assert_array_equal(tail.images, full.images[3:])
    with pytest.raises(DataError) as e:
        data.load(f"tfds:{name}", "validation", data_dir=tiny_dir)
    _one_line_error(e, "data.split")


@pytest.mark.skipif(HAVE_TF, reason="TensorFlow is installed, so NumPy images can be encoded")
def test_tfds_local_builder_needing_tf_says_so(tmp_path):
    with pytest.raises(DataError) as e:
        data.load(f"tfds:{LinfJaxTinyNumpyImages.name}", "train", data_dir=str(tmp_path))
    msg = _one_line_error(e, "data.source")
    assert "TensorFlow" in msg and "pip install tensorflow-cpu" in msg


@pytest.mark.skipif(HAVE_TF, reason="with TensorFlow installed, tfds:mnist would try to download")
def test_tfds_stock_unprepared_without_tf(tmp_path):
    with pytest.raises(DataError) as e:
        data.load("tfds:mnist", "test", data_dir=str(tmp_path))
    msg = _one_line_error(e, "data.source")
    assert "not prepared" in msg
    assert "pip install tensorflow-cpu" in msg
    assert "tfds build mnist --file_format=array_record" in msg
    assert not any("array_record" in f for _, _, fs in os.walk(tmp_path) for f in fs)


def test_tfds_unknown_name(tmp_path):
    with pytest.raises(DataError) as e:
        data.load("tfds:no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    assert "no_such_dataset_xyz" in _one_line_error(e, "data.source")


# ---------------------------------------------------------------------------------------------
# on-device transforms


def test_as_pixels():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    out = data.as_pixels(u8)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), u8 / 255.0, rtol=1e-6, atol=0)
    assert float(data.as_pixels(np.array([255], np.uint8))[0]) == 1.0
    f64 = rng.random((3, 4, 4, 1))
    out = data.as_pixels(f64)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), f64, rtol=1e-7)
    f32 = f64.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(data.as_pixels(f32)), f32)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_and_bounds(channels):
    rng = np.random.default_rng(channels)
    x = rng.random((5, 6, 6, channels)).astype(np.float32)
    mean = rng.uniform(0.1, 0.9, channels)
    std = float(rng.uniform(0.1, 0.5))
    out = np.asarray(data.normalize(x, mean, std))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, (x - mean) / std, rtol=1e-5, atol=1e-6)
    lo, hi = data.pixel_bounds(mean, std)
    assert lo.shape == hi.shape == (channels,)
    np.testing.assert_allclose(np.asarray(lo), (0 - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hi), (1 - mean) / std, rtol=1e-5)
    # the box [0, 1] maps onto [lo, hi]
    np.testing.assert_allclose(np.asarray(data.normalize(np.zeros((1, 1, 1, channels)), mean, std))
                               .ravel(), np.asarray(lo), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(data.normalize(np.ones((1, 1, 1, channels)), mean, std))
                               .ravel(), np.asarray(hi), rtol=1e-6)
    # ε in pixels is ε / std in network units, in every channel
    eps = 8 / 255
    assert data.eps_to_normalized(eps, std) == pytest.approx(eps / std)
    shifted = np.asarray(data.normalize(x + eps, mean, std))
    np.testing.assert_allclose(shifted - out, data.eps_to_normalized(eps, std), rtol=1e-4)


def test_pixel_bounds_scalar_mean():
    lo, hi = data.pixel_bounds(0.1307, 0.3081)
    assert lo.shape == hi.shape == (1,)
    np.testing.assert_allclose(np.asarray(lo), [-0.1307 / 0.3081], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hi), [(1 - 0.1307) / 0.3081], rtol=1e-6)
    assert data.eps_to_normalized(0.3, 0.3081) == pytest.approx(0.3 / 0.3081)


def _crop_candidates(x, pad, flip):
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[:2]
    for i in range(2 * pad + 1):
        for j in range(2 * pad + 1):
            crop = padded[i:i + h, j:j + w]
            yield (i, j, False), crop
            if flip:
                yield (i, j, True), crop[:, ::-1]


def _matches(inp, out, pad, flip):
    found = []
    for x, y in zip(inp, out, strict=True):
        hits = [k for k, c in _crop_candidates(x, pad, flip) if np.array_equal(c, y)]
        assert hits, "augmented image is not a padded crop (or flipped crop) of its input"
        found.append(hits[0])
    return found


@pytest.mark.parametrize("kind, shape", [("none", (5, 8, 8, 1)), ("mnist", (128, 10, 9, 1)),
                                         ("cifar", (256, 12, 12, 3))])
def test_crop_flip_with_the_data_sets_defaults(kind, shape):
    """The crop and flip a data set kind gets by default (``DEFAULT_PADDING`` zero-padded crops,
    flips for CIFAR-like sets, as :func:`linf_jax.experiment.augmentation` picks them): every
    output is a padded crop (or flipped crop) of its input, over the whole offset range."""
    x = np.random.default_rng(0).random(shape).astype(np.float32) + 0.01  # no zeros
    key = jax.random.key(0)
    pad, flip = data.DEFAULT_PADDING[kind], kind == "cifar"
    augment = lambda key, x: data.crop_flip(key, x, pad, "zeros", flip)
    out = np.asarray(augment(key, jnp.asarray(x)))
    assert out.shape == x.shape and out.dtype == np.float32
    if kind == "none":
        np.testing.assert_array_equal(out, x)
        return
    found = _matches(x, out, pad, flip)
    # random per example, over the whole range [0, 2 * pad] in both axes
    assert {i for i, _, _ in found} == {j for _, j, _ in found} == set(range(2 * pad + 1))
    if kind == "mnist":
        assert {(i, j) for i, j, _ in found} == {(i, j) for i in range(3) for j in range(3)}
    if flip:
        assert {f for _, _, f in found} == {False, True}
    # same key, same result; another key, another result
    np.testing.assert_array_equal(np.asarray(augment(key, jnp.asarray(x))), out)
    other = np.asarray(augment(jax.random.key(1), jnp.asarray(x)))
    assert not np.array_equal(other, out)
    _matches(x, other, pad, flip)
    # jit gives the same result
    np.testing.assert_array_equal(np.asarray(jax.jit(augment)(key, jnp.asarray(x))), out)


def test_crop_flip_bad_mode():
    with pytest.raises(DataError) as e:
        data.crop_flip(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), 1, "reflect")
    assert str(e.value) == "train.crop_mode='reflect' is not allowed: one of ('zeros', 'edge')"


def test_tfds_mock_data_trains_one_tiny_epoch_from_tfds_mnist(tmp_path):
    """Under ``tfds.testing.mock_data`` (how TFDS users test pipelines) ``tfds:mnist`` is read
    from the generated examples and a run trains an epoch and certifies."""
    import tensorflow_datasets as tfds
    from conftest import tiny_config

    from linf_jax import trainer

    cfg = tiny_config(**{"data.source": "tfds:mnist", "data.train_split": "train",
                         "data.test_split": "test", "train.epochs": (0, 0, 0, 0, 1),
                         "model.width": 16, "eval.pgd_steps": 1, "eval.batch_size": 32})
    with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path / "tfds")):
        result = trainer.train_and_evaluate(cfg, str(tmp_path / "run"), progress=False)
    assert int(result.state.step) == 1 and result.meta["input_shape"] == [28, 28, 1]
    assert result.meta["std"] == pytest.approx(0.3081) and result.results["num_examples"] == 64
