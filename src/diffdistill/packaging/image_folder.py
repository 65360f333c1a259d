"""A package as an image folder: ``<out>/train/<class>/<index>.png``, de-normalised to 8-bit pixels.

The layout torchvision's ``ImageFolder`` reads (its labels follow the sorted folder names, which are
the data set's class order when the class names sort in it, as the digits' and MNIST's do), that our
folder reader reads, and that the evaluation of a set you bring reads by class name. Our packages come
from 8-bit images, so the PNGs hold their pixels exactly and reading them back and normalising gives
the package's tensor again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from diffdistill import atomic
from diffdistill.data.normalize import denormalize
from diffdistill.errors import DiffdistillError


def export_image_folder(package: torch.Tensor, classes: Sequence[str], mean, std, out: str | os.PathLike) -> int:
    """Write the class-major package (N, C, H, W) under ``out/train``; returns the number of images.
    The folder is built under a temporary name beside ``out`` and renamed into place when complete."""
    from PIL import Image

    out = Path(out)
    if len(package) == 0 or len(package) % len(classes):
        raise DiffdistillError(f"a package of {len(package)} images is not class-major over {len(classes)} classes")
    ipc = len(package) // len(classes)
    pixels = denormalize(package, mean, std)  # uint8 (N, C, H, W)
    width = len(str(ipc - 1))  # zero-padded, so that sorted file names keep the package's order
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(building, 0o777 & ~atomic.umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        for label, name in enumerate(classes):
            folder = building / "train" / name
            folder.mkdir(parents=True)
            for index in range(ipc):
                image = pixels[label * ipc + index].permute(1, 2, 0).numpy()  # (H, W, C)
                picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
                picture.save(folder / f"{index:0{width}d}.png")
        if out.exists():
            shutil.rmtree(out)
        os.replace(building, out)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return len(package)
