"""One split of a data set on the host (:class:`Dataset`) and the facts of the stock data sets.

The readers (:mod:`linf_jax.data_sources`, :mod:`linf_jax.data_arrays`) build a :class:`Dataset`
and :mod:`linf_jax.data` loads and transforms them; both import this module, which imports
neither of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

AUGMENTATIONS = ("none", "mnist", "cifar")  # Dataset.augment: the data set's crop/flip kind
# The crop padding of each data set kind (the v1 code's: MNIST-like 1, CIFAR-like 4).
DEFAULT_PADDING = {"none": 0, "mnist": 1, "cifar": 4}

# Computed once from all 1,797 scikit-learn digits, pixel units (value / 16).
DIGITS_MEAN = 0.30526029
DIGITS_STD = 0.37604922
DIGITS_NUM_TRAIN = 1437  # the remaining 360 are 'test'

MNIST_MEAN, MNIST_STD = (0.1307,), 0.3081

# The 64×64 data sets of SortNet's dataset.py (zbh2047/SortNet): per-channel mean, ONE std.
TINYIMAGENET_MEAN, TINYIMAGENET_STD = (0.4802, 0.4481, 0.3975), 0.2276
IMAGENET64_MEAN, IMAGENET64_STD = (0.4815, 0.4578, 0.4082), 0.2128

# name -> (mean per channel, scalar std, augmentation). A name with a builder config
# ('imagenet_resized/64x64') applies to that config only; a bare name to every config.
KNOWN_TFDS = {
    "mnist": (MNIST_MEAN, MNIST_STD, "mnist"),
    "fashion_mnist": ((0.2860,), 0.3520, "mnist"),
    "cifar10": ((0.4914, 0.4822, 0.4465), 0.2009, "cifar"),
    "cifar100": ((0.5071, 0.4867, 0.4408), 0.2667, "cifar"),
    "imagenet_resized/64x64": (IMAGENET64_MEAN, IMAGENET64_STD, "cifar"),
}


def known_tfds(name: str):
    """The :data:`KNOWN_TFDS` entry of TFDS name ``name`` (``'cifar10:3.0.2'``,
    ``'imagenet_resized/64x64'``): its own config's entry, else the bare name's; None when
    neither is known."""
    versionless = name.split(":")[0]
    return KNOWN_TFDS.get(versionless, KNOWN_TFDS.get(versionless.split("/")[0]))


@dataclasses.dataclass(frozen=True)
class NamedSource:
    """A data set read from an ``.npz`` file of a fixed layout (``NAME:FILE``, linf_jax.data):
    its official normalisation, augmentation kind, classes, image shape and training-set
    size."""

    mean: tuple[float, ...]
    std: float
    augment: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_size: int


# SortNet's 64×64 data sets as .npz files (linf_jax.data describes the layout).
NAMED_SOURCES = {
    "tinyimagenet": NamedSource(TINYIMAGENET_MEAN, TINYIMAGENET_STD, "cifar", 200, (64, 64, 3),
                                100_000),
    "imagenet64": NamedSource(IMAGENET64_MEAN, IMAGENET64_STD, "cifar", 1000, (64, 64, 3),
                              1_281_167),
}

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

# The size of the 'train' split of the stock TFDS data sets: the schedule preview of a paper
# preset needs no download.
TFDS_TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000,
                    "imagenet_resized/64x64": 1_281_167}
