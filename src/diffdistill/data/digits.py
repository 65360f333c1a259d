"""The embedded default data set: scikit-learn's 8x8 handwritten digits, with a fixed stratified
train/test split (docs/reference.md, "Digits calibration")."""

from __future__ import annotations

import numpy as np
import torch

from diffdistill.data import LabeledImages, check_split
from diffdistill.errors import DiffdistillError

DIGITS_MAX = 16  # sklearn's digits hold counts 0..16 per 4x4 block of the original 32x32 bitmap


def load_digits_split(split: str, test_fraction: float = 0.3, seed: int = 0) -> LabeledImages:
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8), with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise DiffdistillError(f"test_fraction {test_fraction}: expected a value in (0, 1)")
    digits = load_digits()
    values = np.rint(digits.images * (255.0 / DIGITS_MAX)).astype(np.uint8)  # (1797, 8, 8)
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=test_fraction, stratify=digits.target, random_state=seed)
    chosen = np.sort(train if split == "train" else test)  # keep sklearn's order within the split
    images = torch.from_numpy(values[chosen]).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    classes = [str(c) for c in range(10)]
    extra = {"source": "sklearn.datasets.load_digits", "test_fraction": test_fraction, "seed": seed}
    return LabeledImages(images, labels, classes, "digits", split, extra)
