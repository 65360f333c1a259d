"""Labelled image sets on disk: the one container every stage passes around.

A prepared split is one ``torch.save`` file holding a plain dict (loadable with
``weights_only=True``): ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes`` (list of
class names, index = label), ``name`` (data set name) and ``split``. Real data, budgeted samples and
the synthetic pool all use it.

The readers that turn the real data sets into it live beside this module: :mod:`diffdistill.data.cifar100`,
:mod:`diffdistill.data.tinyimagenet`, :mod:`diffdistill.data.mnist` and :mod:`diffdistill.data.digits` (the embedded
default), chosen by name in :mod:`diffdistill.data.datasets`. The checks they share (split names, finding a
data set folder) are here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffdistill import atomic
from diffdistill.errors import DiffdistillError

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


# --- checks shared by the readers ------------------------------------------------------------------


def listing(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for error messages (a wrong folder should say what it found)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "found: " + ", ".join(names[:limit]) + more


def require_root(root) -> Path:
    if root is None:
        raise DiffdistillError("no data root given (expected the folder holding the data set)")
    root = Path(root)
    if not root.is_dir():
        raise DiffdistillError(f"{root}: data root does not exist or is not a folder")
    return root


def find_folder(root, folder_name: str, marker: str) -> Path:
    """``root`` itself when it is ``folder_name`` (holds ``marker``), else ``root/folder_name``."""
    root = require_root(root)
    if root.name == folder_name or (root / marker).exists():
        return root
    if (root / folder_name).is_dir():
        return root / folder_name
    raise DiffdistillError(f"{root}: expected a {folder_name}/ folder (or to be one, with {marker}); "
                           f"{listing(root)}")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DiffdistillError(f"split {split!r}: expected one of {SPLITS}")
    return split
