"""Labelled image sets on disk: the one container every stage passes around.

A prepared split is one ``torch.save`` file holding a plain dict (loadable with
``weights_only=True``): ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes`` (list of
class names, index = label), ``name`` (data set name) and ``split``. Real data, budgeted samples and
the synthetic pool all use it.

The readers below turn the real data sets into that container: CIFAR-100 from its standard python
pickles (``cifar-100-python/``), Tiny-ImageNet from its standard folder (``tiny-imagenet-200/``,
class order = sorted wnids, ``val`` is the test split) and the embedded default, scikit-learn's 8x8
handwritten digits with a fixed stratified split. Downloads are opt-in and only for online users.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .errors import DiffdistillError

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar100", "tinyimagenet")
SPLITS = ("train", "test")


@dataclass
class LabeledImages:
    """uint8 images (N, C, H, W) with int64 labels (N,) and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DiffdistillError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DiffdistillError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, index: torch.Tensor) -> "LabeledImages":
        return LabeledImages(self.images[index], self.labels[index], list(self.classes), self.name, self.split)

    def to_dict(self) -> dict:
        return {
            "images": self.images.contiguous(), "labels": self.labels.contiguous(), "classes": list(self.classes),
            "name": self.name, "split": self.split, **({"extra": self.extra} if self.extra else {}),
        }


def save_images(data: LabeledImages, path: str | os.PathLike) -> None:
    """Write a split atomically (temporary name, then rename)."""
    atomic.torch_save(data.to_dict(), path)


def load_images(path: str | os.PathLike) -> LabeledImages:
    """Read a file written by :func:`save_images`; errors name the file and what was expected."""
    path = Path(path)
    obj = atomic.read_torch(path, "a prepared image file written by diffdistill")
    missing = [k for k in ("images", "labels", "classes") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DiffdistillError(f"{path}: not a prepared image file, missing keys {missing}")
    try:
        return LabeledImages(obj["images"], obj["labels"], list(obj["classes"]), obj.get("name", ""),
                             obj.get("split", ""), obj.get("extra", {}))
    except DiffdistillError as err:
        raise DiffdistillError(f"{path}: {err}") from err


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the diffusion model's pixel range."""
    return images.float().div(127.5).sub(1.0)


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# --- shared checks ------------------------------------------------------------------------------


def _listing(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for error messages (a wrong folder should say what it found)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "found: " + ", ".join(names[:limit]) + more


def _require_root(root) -> Path:
    if root is None:
        raise DiffdistillError("no data root given (expected the folder holding the data set)")
    root = Path(root)
    if not root.is_dir():
        raise DiffdistillError(f"{root}: data root does not exist or is not a folder")
    return root


def _find_folder(root, folder_name: str, marker: str) -> Path:
    """``root`` itself when it is ``folder_name`` (holds ``marker``), else ``root/folder_name``."""
    root = _require_root(root)
    if root.name == folder_name or (root / marker).exists():
        return root
    if (root / folder_name).is_dir():
        return root / folder_name
    raise DiffdistillError(f"{root}: expected a {folder_name}/ folder (or to be one, with {marker}); "
                           f"{_listing(root)}")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DiffdistillError(f"split {split!r}: expected one of {SPLITS}")
    return split


# --- CIFAR-100 (python pickles) --------------------------------------------------------------------

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
                               f"{_listing(path.parent)})")
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
    folder = _find_folder(root, CIFAR100_FOLDER, "meta")
    classes = _cifar_class_names(folder)
    images, labels = _cifar_arrays(folder / _check_split(split))
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


# --- Tiny-ImageNet (JPEG folder) ---------------------------------------------------------------------

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_SIDE = 64


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DiffdistillError(f"{path}: {what} missing (expected the standard {TINY_IMAGENET_FOLDER}/ "
                               f"layout; {_listing(path.parent)})")
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
    folder = _find_folder(root, TINY_IMAGENET_FOLDER, "wnids.txt")
    wnids = _tiny_wnids(folder)
    classes = _tiny_class_names(folder, wnids)
    lister = _tiny_train_files if _check_split(split) == "train" else _tiny_val_files
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


# --- the embedded default: scikit-learn digits ------------------------------------------------------

DIGITS_MAX = 16  # sklearn's digits hold counts 0..16 per 4x4 block of the original 32x32 bitmap


def load_digits_split(split: str, test_fraction: float = 0.3, seed: int = 0) -> LabeledImages:
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8), with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
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


def prepare_dataset(name: str, root, split: str, download: bool = False) -> LabeledImages:
    """One split of a named data set (``DATASETS``); ``root`` is unused for ``digits``."""
    _check_split(split)
    if name == "digits":
        return load_digits_split(split)
    if name not in DATASETS:
        raise DiffdistillError(f"data set {name!r}: expected one of {DATASETS}")
    if download:
        (download_cifar100 if name == "cifar100" else download_tiny_imagenet)(_require_download_root(root))
    reader = read_cifar100 if name == "cifar100" else read_tiny_imagenet
    data = reader(root, split)
    data.name, data.split = name, split
    return data


def _require_download_root(root) -> Path:
    if root is None:
        raise DiffdistillError("--download needs a data root (the folder to download into)")
    return Path(root)


def concat_images(parts: list[LabeledImages], *, split: str | None = None) -> LabeledImages:
    """Join image sets of the same classes and image shape (e.g. sampling shards), in order."""
    if not parts:
        raise DiffdistillError("nothing to concatenate")
    first = parts[0]
    for i, part in enumerate(parts[1:], 1):
        if part.classes != first.classes or part.images.shape[1:] != first.images.shape[1:]:
            raise DiffdistillError(f"part {i}: classes or image shape {tuple(part.images.shape[1:])} differ from "
                                   f"part 0 {tuple(first.images.shape[1:])}")
    return LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                         list(first.classes), first.name, first.split if split is None else split)
