"""Labelled image sets on disk: the one container every stage passes around.

A prepared split is one ``torch.save`` file holding a plain dict (loadable with
``weights_only=True``): ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes`` (list of
class names, index = label), ``name`` (data set name) and ``split``. Real data, budgeted samples and
the synthetic pool all use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import atomic
from .errors import DiffdistillError


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
    if not path.is_file():
        raise DiffdistillError(f"{path}: no such file (expected a prepared image file written by diffdistill)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise DiffdistillError(f"{path}: cannot be read as a torch file ({type(err).__name__}: {err})") from err
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
