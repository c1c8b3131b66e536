"""SortNet's 64×64 data sets (``zbh2047/SortNet``, ``dataset.py``): the ``tinyimagenet:FILE`` and
``imagenet64:FILE`` npz sources, the Tiny ImageNet packer, and TFDS ``imagenet_resized/64x64``
with the official normalisation; all on tiny synthetic data."""

import os

import numpy as np
import pytest

from linf_jax import data, experiment
from linf_jax.data_sources import pack_tinyimagenet
from linf_jax.dataset import NAMED_SOURCES, known_tfds
from linf_jax.errors import DataError

# SortNet's dataset.py: per-channel mean and ONE std.
OFFICIAL = {"tinyimagenet": ((0.4802, 0.4481, 0.3975), 0.2276, 200),
            "imagenet64": ((0.4815, 0.4578, 0.4082), 0.2128, 1000)}


def _npz(path, n_train=6, n_test=4, shape=(64, 64, 3), classes=200, **extra):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=np.arange(n_train) % classes,
             x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=(np.arange(n_test) + 3) % classes, **extra)
    return str(path)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_named_npz_source_has_the_official_normalisation(name, tmp_path):
    mean, std, classes = OFFICIAL[name]
    spec = NAMED_SOURCES[name]
    assert (spec.mean, spec.std, spec.num_classes) == (mean, std, classes)
    path = _npz(tmp_path / "d.npz", classes=classes, mean=np.float32(0.5), std=np.float32(0.1))
    train = data.load(f"{name}:{path}", "train")
    test = data.load(f"{name}:{path}", "test")
    with np.load(path) as f:
        np.testing.assert_array_equal(train.images, f["x_train"])
        np.testing.assert_array_equal(test.labels, f["y_test"])
    for d in (train, test):
        assert d.mean == mean and d.std == std and d.num_classes == classes  # not the file's
        assert d.input_shape == (64, 64, 3) and d.augment == "cifar"
    assert len(data.load(f"{name}:{path}", "train+test")) == 10
    # the augmentation the SortNet presets ask for: pad by 5 (4) with edge replication + flip
    cfg = _aug_config(5)
    assert experiment.augmentation(cfg, {"augment": train.augment}) == (5, "edge", True)
    cfg.train.crop_padding = None  # the data set's default: the CIFAR-like crop by 4 + flip
    assert experiment.augmentation(cfg, {"augment": train.augment}) == (4, "edge", True)


def _aug_config(pad):
    from linf_jax.config import base_config

    c = base_config()
    c.train.update(augment=True, crop_padding=pad, crop_mode="edge")
    return c


@pytest.mark.parametrize("arrays, field", [
    (dict(x=np.zeros((2, 64, 64, 3), np.uint8), y=np.zeros(2)), "data.source"),  # one split only
    (dict(x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.zeros(2),
          x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.zeros(2)), "data.images"),
    (dict(x_train=np.zeros((2, 64, 64, 3), np.uint8), y_train=np.array([0, 200]),
          x_test=np.zeros((2, 64, 64, 3), np.uint8), y_test=np.zeros(2)), "data.labels"),
])
def test_named_npz_source_errors_are_one_line(arrays, field, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        data.load(f"tinyimagenet:{path}", "train")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(field), msg
    with pytest.raises(DataError, match="tinyimagenet:FILE"):
        data.load(f"tinyimagenet:{tmp_path / 'none.npz'}", "train")


def test_pack_tinyimagenet_from_the_download_layout(tmp_path):
    """train/<wnid>/images/*.JPEG and val/images + val_annotations.txt (the download), and a
    val/ folder sorted into classes: the same arrays; classes in sorted wnid order; grey images
    become RGB."""
    from PIL import Image

    rng = np.random.default_rng(1)
    wnids = ["n02", "n01", "n03"]  # sorted: n01 -> 0, n02 -> 1, n03 -> 2
    root = tmp_path / "tiny-imagenet-200"
    pixels = {}
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{w}_{i}.png")
            pixels[f"{w}_{i}"] = img
    (root / "val" / "images").mkdir(parents=True)
    notes = []
    for i, w in enumerate(["n03", "n01", "n02", "n01"]):
        grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(grey, mode="L").save(root / "val" / "images" / f"val_{i}.png")
        pixels[f"val_{i}"] = np.repeat(grey[..., None], 3, axis=-1)
        notes.append(f"val_{i}.png\t{w}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(notes))
    out = pack_tinyimagenet(str(root), str(tmp_path / "tiny.npz"))
    with np.load(out) as f:
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test",
                                                            "y_test"))
    assert x_train.shape == (6, 64, 64, 3) and x_train.dtype == np.uint8
    np.testing.assert_array_equal(y_train, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(x_train[0], pixels["n01_0"])
    np.testing.assert_array_equal(x_train[5], pixels["n03_1"])
    np.testing.assert_array_equal(y_test, [2, 0, 1, 0])
    np.testing.assert_array_equal(x_test[0], pixels["val_0"])
    d = data.load(f"tinyimagenet:{out}", "test")
    assert d.num_classes == 200 and len(d) == 4
    # a val/ folder already sorted into class folders
    sorted_root = tmp_path / "sorted"
    os.rename(root, sorted_root)
    for i, w in enumerate(["n03", "n01", "n02", "n01"]):
        (sorted_root / "val" / w).mkdir(exist_ok=True)
        os.rename(sorted_root / "val" / "images" / f"val_{i}.png",
                  sorted_root / "val" / w / f"val_{i}.png")
    os.remove(sorted_root / "val" / "val_annotations.txt")
    with np.load(pack_tinyimagenet(str(sorted_root), str(tmp_path / "t2.npz"))) as f:
        np.testing.assert_array_equal(f["y_test"], [0, 0, 1, 2])
        np.testing.assert_array_equal(f["x_test"][0], pixels["val_1"])
        np.testing.assert_array_equal(f["x_train"], x_train)
    with pytest.raises(DataError, match="train/ and val/"):
        pack_tinyimagenet(str(tmp_path / "nowhere"), str(tmp_path / "x.npz"))


def test_imagenet_resized_64_from_tfds_has_the_official_normalisation(tmp_path):
    """``tfds:imagenet_resized/64x64`` under ``tfds.testing.mock_data`` (no download): 64×64×3,
    1,000 classes, SortNet's ImageNet64 mean and std, CIFAR-like augmentation; another
    resolution of the same builder is not given these constants."""
    import tensorflow_datasets as tfds

    mean, std, classes = OFFICIAL["imagenet64"]
    assert known_tfds("imagenet_resized/64x64") == (mean, std, "cifar")
    assert known_tfds("imagenet_resized/64x64:0.1.1") == (mean, std, "cifar")
    assert known_tfds("imagenet_resized/32x32") is None
    assert known_tfds("cifar10:3.0.2") == data.KNOWN_TFDS["cifar10"]
    with tfds.testing.mock_data(num_examples=4, data_dir=str(tmp_path / "tfds")):
        d = data.load("tfds:imagenet_resized/64x64", "validation")
    assert d.input_shape == (64, 64, 3) and d.num_classes == classes and len(d) == 4
    assert d.mean == mean and d.std == std and d.augment == "cifar"
