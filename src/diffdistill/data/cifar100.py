"""CIFAR-100 from its standard python pickles (``cifar-100-python/``: ``train``, ``test``, ``meta``).

Fine labels, class names from ``meta`` in the pickle's order. Downloading (torchvision) is opt-in and
only for online users.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from diffdistill.data import LabeledImages, check_split, find_folder, listing
from diffdistill.errors import DiffdistillError

log = logging.getLogger(__name__)

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_CLASSES = 100
_CIFAR_SIDE = 32

# Globals a CIFAR pickle may name: numpy arrays and (for pickles written by Python 3 at protocol 2)
# bytes via _codecs.encode. Anything else is refused, so a wrong file cannot run code on load.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    """A CIFAR pickle, keys as bytes (``encoding="bytes"``, as the originals were written by Python 2)."""
    if not path.is_file():
        raise DiffdistillError(f"{path}: pickle missing (expected train, test and meta in {path.parent}; "
                               f"{listing(path.parent)})")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # pickle raises many types for foreign or truncated files
        raise DiffdistillError(f"{path}: not a CIFAR python pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DiffdistillError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return obj


def _get_key(obj: dict, key: bytes, path: Path):
    if key not in obj:
        raise DiffdistillError(f"{path}: key {key!r} missing (keys: {sorted(obj)})")
    return obj[key]


def _cifar_class_names(folder: Path) -> list[str]:
    path = folder / "meta"
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _get_key(_load_pickle(path), b"fine_label_names", path)]
    if len(names) != CIFAR100_CLASSES:
        raise DiffdistillError(f"{path}: {len(names)} fine label names, expected {CIFAR100_CLASSES}")
    return names


def _cifar_arrays(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and fine labels (N,) from one CIFAR-100 split pickle."""
    batch = _load_pickle(path)
    data = np.asarray(_get_key(batch, b"data", path))
    labels = np.asarray(_get_key(batch, b"fine_labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _CIFAR_SIDE**2:
        raise DiffdistillError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DiffdistillError(f"{path}: {labels.shape[0]} fine labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= CIFAR100_CLASSES):
        raise DiffdistillError(f"{path}: fine labels span {labels.min()}..{labels.max()}, "
                               f"expected 0..{CIFAR100_CLASSES - 1}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each plane row-major.
    images = torch.from_numpy(data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).copy())  # (N, 3, 32, 32)
    return images, torch.from_numpy(labels)


def read_cifar100(root, split: str) -> LabeledImages:
    """CIFAR-100 ``train`` or ``test`` with fine labels; ``root`` contains or is ``cifar-100-python/``."""
    folder = find_folder(root, CIFAR100_FOLDER, "meta")
    classes = _cifar_class_names(folder)
    images, labels = _cifar_arrays(folder / check_split(split))
    log.info("read CIFAR-100 %s: %d images from %s", split, len(labels), folder)
    return LabeledImages(images, labels, classes, "cifar100", split, {"source": str(folder)})


def download_cifar100(root) -> Path:
    """Fetch CIFAR-100 with torchvision (needs network and torchvision); returns the pickle folder."""
    root = Path(root)
    if all((root / CIFAR100_FOLDER / n).is_file() for n in ("train", "test", "meta")):
        return root / CIFAR100_FOLDER
    try:
        from torchvision.datasets import CIFAR100
    except ImportError as err:
        raise DiffdistillError("downloading cifar100 needs torchvision (pip install torchvision), "
                               f"or place {CIFAR100_FOLDER}/ under {root} yourself") from err
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading CIFAR-100 into %s", root)
    try:
        CIFAR100(root=str(root), train=True, download=True)
    except Exception as err:  # network and checksum failures come in many types
        raise DiffdistillError(f"{root}: CIFAR-100 download failed ({type(err).__name__}: {err})") from err
    return root / CIFAR100_FOLDER
