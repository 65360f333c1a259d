"""Tiny-ImageNet from its standard folder (``tiny-imagenet-200/``): class order = sorted wnids,
the labelled ``val`` folder is the test split, every image RGB 64x64. Downloading the official zip
is opt-in and only for online users.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from diffdistill.data import LabeledImages, check_split, find_folder, listing
from diffdistill.errors import DiffdistillError

log = logging.getLogger(__name__)

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_SIDE = 64


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DiffdistillError(f"{path}: {what} missing (expected the standard {TINY_IMAGENET_FOLDER}/ "
                               f"layout; {listing(path.parent)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DiffdistillError(f"{path}: not a UTF-8 text file ({err})") from err
    return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


def _tiny_wnids(folder: Path) -> list[str]:
    """The class ids in label order: sorted wnids (wnids.txt itself is not sorted)."""
    wnids = [w.strip() for w in _read_lines(folder / "wnids.txt", "wnids.txt (class ids)")]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DiffdistillError(f"{folder / 'wnids.txt'}: expected one distinct wnid per line, "
                               f"got {len(wnids)} lines with {len(set(wnids))} distinct")
    return sorted(wnids)


def _tiny_class_names(folder: Path, wnids: list[str]) -> list[str]:
    path = folder / "words.txt"
    words = dict(line.split("\t", 1) for line in _read_lines(path, "words.txt (class names)") if "\t" in line)
    missing = [w for w in wnids if w not in words]
    if missing:
        raise DiffdistillError(f"{path}: no name for wnids {missing[:5]} (expected 'wnid<TAB>name' lines)")
    return [words[w].strip() for w in wnids]


def _read_rgb64(path: Path) -> np.ndarray:
    """One JPEG as (64, 64, 3) uint8 RGB; greyscale files are converted (a few exist in the set)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DiffdistillError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    if rgb.size != (_TINY_SIDE, _TINY_SIDE):
        raise DiffdistillError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, expected {_TINY_SIDE}x{_TINY_SIDE}")
    return np.asarray(rgb, dtype=np.uint8)  # (64, 64, 3)


def _decode_all(paths: list[Path]) -> torch.Tensor:
    """Decode into one preallocated array (the train split is 100,000 images, 1.2 GB)."""
    out = np.empty((len(paths), _TINY_SIDE, _TINY_SIDE, 3), dtype=np.uint8)  # (N, H, W, C)
    for i, path in enumerate(paths):
        out[i] = _read_rgb64(path)
        if (i + 1) % 20000 == 0:
            log.info("decoded %d / %d images", i + 1, len(paths))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, 64, 64)


def _tiny_train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DiffdistillError(f"{images}: class folder missing (expected train/<wnid>/images/*.JPEG "
                                   f"for every wnid in wnids.txt)")
        files = sorted(images.glob("*.JPEG"))
        if not files:
            raise DiffdistillError(f"{images}: no *.JPEG images (expected the class's training images)")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _tiny_val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    ann = folder / "val" / "val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for n, line in enumerate(_read_lines(ann, "val annotations"), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DiffdistillError(f"{ann}, line {n}: expected 'file<TAB>wnid<TAB>box' with a wnid "
                                   f"from wnids.txt, got {line!r}")
        paths.append(folder / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    return paths, labels


def read_tiny_imagenet(root, split: str) -> LabeledImages:
    """Tiny-ImageNet ``train`` or ``test`` (= the labelled ``val`` folder) as RGB 64x64 images."""
    folder = find_folder(root, TINY_IMAGENET_FOLDER, "wnids.txt")
    wnids = _tiny_wnids(folder)
    classes = _tiny_class_names(folder, wnids)
    lister = _tiny_train_files if check_split(split) == "train" else _tiny_val_files
    paths, labels = lister(folder, wnids)
    images = _decode_all(paths)  # (N, 3, 64, 64)
    log.info("read Tiny-ImageNet %s: %d images, %d classes from %s", split, len(labels), len(wnids), folder)
    extra = {"source": str(folder), "wnids": wnids}
    return LabeledImages(images, torch.tensor(labels, dtype=torch.int64), classes, "tinyimagenet", split, extra)


def download_tiny_imagenet(root, url: str = TINY_IMAGENET_URL) -> Path:
    """Fetch and unpack the official zip (needs network); returns the ``tiny-imagenet-200`` folder."""
    import urllib.request

    root = Path(root)
    target = root / TINY_IMAGENET_FOLDER
    if (target / "wnids.txt").is_file():
        return target
    if target.exists():
        raise DiffdistillError(f"{target}: exists but has no wnids.txt (a partial copy?); remove it and retry")
    root.mkdir(parents=True, exist_ok=True)
    # Download and unpack under temporary names so an interrupted run leaves no partial folder.
    with tempfile.TemporaryDirectory(dir=root, prefix=".tiny-imagenet-") as tmp:
        archive = Path(tmp) / "tiny-imagenet-200.zip"
        log.info("downloading %s into %s", url, root)
        try:
            with urllib.request.urlopen(url) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except (OSError, zipfile.BadZipFile) as err:  # URLError is an OSError
            raise DiffdistillError(f"{url}: Tiny-ImageNet download failed ({type(err).__name__}: {err})") from err
        unpacked = Path(tmp) / TINY_IMAGENET_FOLDER
        if not unpacked.is_dir():
            raise DiffdistillError(f"{url}: archive has no {TINY_IMAGENET_FOLDER}/ folder")
        os.replace(unpacked, target)
    return target
