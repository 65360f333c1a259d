"""A distilled set the user brings, read and checked against the data set before any training.

Two forms (docs/reference.md, "Evaluating a set you bring"):

- a **package**: one file in the challenge layout, a bare float tensor (N, C, H, W) already normalised
  with the data set's statistics, class-major (class i in rows i*IPC .. (i+1)*IPC - 1), IPC = N / classes;
  read with ``torch.load(weights_only=True)``, so a pickle that would run code is refused;
- a **folder**: one subfolder of images per class, named like the data set's classes (the layout of
  :func:`diffdistill.packaging.image_folder.export_image_folder`, and of torchvision's ImageFolder),
  either the folder itself or one holding it as ``train/``. Every class holds the same number of
  images (the IPC), each exactly the data set's side and channel count: a set is evaluated as it is,
  never resized.

Either becomes the same normalised, class-major tensor the evaluation trains on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffdistill import atomic
from diffdistill.data import LabeledImages
from diffdistill.data.folder import GREY_MODES, list_split, to_mode
from diffdistill.data.normalize import normalize
from diffdistill.errors import DiffdistillError


def set_form(path: str | os.PathLike) -> str:
    """``folder`` for a directory, ``package`` for a file; a missing path is refused, named."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "package"
    raise DiffdistillError(f"{path}: no such file or folder (config key external: a package file or a folder "
                           "of class folders expected)")


def read_external_set(path: str | os.PathLike, test: LabeledImages, mean, std) -> tuple[torch.Tensor, int, str]:
    """(normalised class-major images (N, C, H, W), IPC, form) of the set at ``path``, checked against the
    test split's classes and image shape."""
    form = set_form(path)
    if form == "package":
        x = read_package_set(Path(path), test)
    else:
        x = read_folder_set(Path(path), test, mean, std)
    return x, len(x) // test.num_classes, form


def read_package_set(path: Path, test: LabeledImages) -> torch.Tensor:
    """A challenge-layout file: a bare finite float tensor with the test split's image shape and a
    multiple of its class count in rows."""
    x = atomic.read_torch(path, "a package: a bare float tensor (N, C, H, W) in the challenge layout")
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        found = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"
        raise DiffdistillError(f"{path}: {found}; expected a bare float tensor (N, C, H, W) in the challenge layout")
    _check_shape(path, tuple(x.shape[1:]), tuple(test.images.shape[1:]))
    classes = test.num_classes
    if len(x) == 0 or len(x) % classes:
        raise DiffdistillError(f"{path}: {len(x)} images, not a positive multiple of the data set's {classes} "
                               f"classes (the challenge layout holds IPC images of each class, class-major)")
    if not torch.isfinite(x).all():
        raise DiffdistillError(f"{path}: holds NaN or infinite values")
    return x.float()


def _check_shape(where, found: tuple, expected: tuple) -> None:
    if found[0] != expected[0]:
        raise DiffdistillError(f"{where}: {found[0]} channel(s); the data set's images have {expected[0]}")
    if found[1:] != expected[1:]:
        raise DiffdistillError(f"{where}: images of {found[1]}x{found[2]} pixels; the data set's are "
                               f"{expected[1]}x{expected[2]} (a set is evaluated as it is, never resized)")


def class_folder(path: Path) -> Path:
    """The folder holding the class folders: ``path/train`` when there is one, else ``path``."""
    return path / "train" if (path / "train").is_dir() else path


def read_folder_set(path: Path, test: LabeledImages, mean, std) -> torch.Tensor:
    """A folder of class folders named like the test split's classes, the same number of images in each."""
    listed = list_split(class_folder(path))
    if sorted(listed.classes) != sorted(test.classes):
        extra = sorted(set(listed.classes) - set(test.classes))
        missing = sorted(set(test.classes) - set(listed.classes))
        raise DiffdistillError(f"{listed.folder}: its class folders differ from the data set's classes (not classes "
                               f"of it: {extra[:10]}, missing: {missing[:10]}); expected one folder per class, "
                               f"named {test.classes[:10]}{' ...' if test.num_classes > 10 else ''}")
    files = dict(zip(listed.classes, listed.files))
    counts = {name: len(files[name]) for name in test.classes}
    if len(set(counts.values())) != 1:
        raise DiffdistillError(f"{listed.folder}: the classes hold different numbers of images "
                               f"({dict(list(counts.items())[:10])}); a distilled set has the same IPC in every class")
    channels, height, width = test.images.shape[1:]
    images = [read_exact(file, channels, height, width) for name in test.classes for file in files[name]]
    return normalize(torch.stack(images), mean, std)  # (N, C, H, W), class-major in the data set's order


def read_exact(path: Path, channels: int, height: int, width: int) -> torch.Tensor:
    """One image file as uint8 (C, H, W), refused unless it has exactly this size and channel count."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            _check_shape(path, (1 if img.mode in GREY_MODES else 3, img.height, img.width), (channels, height, width))
            pixels = np.asarray(to_mode(img, "L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise DiffdistillError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    return torch.from_numpy(pixels.reshape(height, width, channels).copy()).permute(2, 0, 1).contiguous()  # (C, H, W)
