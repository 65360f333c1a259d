"""Your own data set in torchvision's ImageFolder layout: ``root/train/<class>/*`` and
``root/test/<class>/*`` (or ``root/val/<class>/*``), one folder per class, classes in sorted folder
order. Every image becomes a square of ``side`` pixels with 1 or 3 channels (docs/reference.md,
"Folder data sets", for the resize and the channel rule, which are our choices).

Everything that can be checked before decoding (the layout, the class sets, the images per class
against the IPCs evaluated, the side against the networks) is checked first, so bad input fails in
seconds; the channel count, when inferred, is checked against the networks after decoding and before
anything is written.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffdistill import settings
from diffdistill.data import LabeledImages, listing, require_root
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import convnet
from diffdistill.settings import setting

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TEST_FOLDERS = ("test", "val")  # the held-out split's folder: either name, not both
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
CHUNK = 512  # images per task of the process pool: large enough that pickling the arrays is cheap


@dataclass
class FolderSettings:
    """How a folder data set is read: the square side in pixels and the channel count (0: inferred,
    3 when any image is in colour, else 1)."""

    side: int = setting(32, minimum=1, description=(
        "folder data set: images become side x side (centred square, antialiased bilinear resize)"))
    channels: int = setting(0, choices=(0, 1, 3), description=(
        "folder data set: 1 or 3 channels; 0 = inferred (3 when any image is stored in colour, else 1)"))

    def __post_init__(self):
        settings.check(self, "data")


@dataclass
class SplitFiles:
    """The image files of one split folder: per class (sorted folder names) its sorted files."""

    folder: Path
    classes: list[str]
    files: list[list[Path]]

    def paths_and_labels(self) -> tuple[list[Path], list[int]]:
        paths = [path for files in self.files for path in files]
        labels = [label for label, files in enumerate(self.files) for _ in files]
        return paths, labels


# --- layout checks (no decoding) ----------------------------------------------------------------------


def split_folders(root) -> tuple[Path, Path]:
    """``root/train`` and the held-out folder (``root/test`` or ``root/val``)."""
    root = require_root(root)
    if not any(root.iterdir()):
        raise DiffdistillError(f"{root}: the data root is empty (expected train/<class>/* and test/<class>/*)")
    held_out = [root / name for name in TEST_FOLDERS if (root / name).is_dir()]
    if not (root / "train").is_dir() or len(held_out) != 1:
        what = "both test/ and val/ (keep one)" if len(held_out) > 1 else listing(root)
        raise DiffdistillError(f"{root}: expected a train/ folder and one test/ (or val/) folder, each with one "
                               f"folder of images per class; {what}")
    return root / "train", held_out[0]


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_split(folder: Path) -> SplitFiles:
    """The class folders of a split (sorted by name, as torchvision's ImageFolder) and their image files
    (found in subfolders too, sorted); files of other types are skipped, a class without images refused."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DiffdistillError(f"{folder}: no class folders (expected one folder of images per class); "
                               f"{listing(folder)}")
    files, skipped = [], 0
    for name in classes:
        found = sorted(p for p in (folder / name).rglob("*") if not any(part.startswith(".") for part in
                                                                        p.relative_to(folder / name).parts))
        images = [p for p in found if _is_image_file(p)]
        skipped += sum(p.is_file() for p in found) - len(images)
        if not images:
            raise DiffdistillError(f"{folder / name}: class folder without images (expected files ending in "
                                   f"{', '.join(IMAGE_SUFFIXES)}); {listing(folder / name)}")
        files.append(images)
    if skipped:
        log.warning("%s: skipped %d files that are not %s images", folder, skipped, "/".join(IMAGE_SUFFIXES))
    return SplitFiles(folder, classes, files)


def check_same_classes(train: SplitFiles, test: SplitFiles) -> None:
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DiffdistillError(f"{train.folder} and {test.folder}: the class folders differ (only in train: "
                               f"{only_train[:10]}, only in {test.folder.name}: {only_test[:10]}); expected the same")


def check_images_per_class(train: SplitFiles, ipcs) -> None:
    """Every training class must hold at least the largest IPC evaluated: the random-real baseline draws
    that many real images per class (``ipcs`` is a list, as package.ipc may list several)."""
    ipcs = [int(ipc) for ipc in ([ipcs] if isinstance(ipcs, int) else ipcs)]
    if not ipcs:
        return
    needed = max(ipcs)
    for name, files in zip(train.classes, train.files):
        if len(files) < needed:
            raise DiffdistillError(f"{train.folder / name}: {len(files)} images, fewer than IPC {needed} (the largest "
                                   f"of package.ipc {ipcs}), which the random-real baseline draws per class; "
                                   f"add images or lower package.ipc")


def check_networks_fit(side: int, channels: int, models: dict[str, dict], net_depth: int = 3) -> None:
    """The U-ViTs (name -> constructor keywords) and the challenge ConvNet must take side x side images of
    ``channels`` channels (0: not yet known, checked later)."""
    for name, model in models.items():
        if model["img_size"] != side:
            raise DiffdistillError(f"model {name}: img_size {model['img_size']} but the images are {side}x{side} "
                                   f"(data.side); set model.overrides img_size: {side}")
        if side % model["patch_size"]:
            raise DiffdistillError(f"model {name}: side {side} (data.side) is not a multiple of patch_size "
                                   f"{model['patch_size']}; choose a side or a model.overrides patch_size that divides it")
        if channels and model["in_chans"] != channels:
            raise DiffdistillError(f"model {name}: in_chans {model['in_chans']} but the images have {channels} "
                                   f"channel(s) (data.channels); set model.overrides in_chans: {channels}")
    if channels:
        try:
            convnet.check_input_size(channels, (side, side), net_depth)
        except DiffdistillError as err:
            raise DiffdistillError(f"data.side {side} with data.channels {channels}: {err}") from err


# --- decoding -------------------------------------------------------------------------------------------


def to_mode(img, mode: str):
    """``L`` or ``RGB``; 16-bit grey keeps its high byte (Pillow's own conversion would clip it)."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES:
        high = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)  # (H, W)
        img = Image.fromarray(high, "L")
    return img if img.mode == mode else img.convert(mode)


def _square(img, side: int):
    """The centred square of side min(w, h), resized to side x side with antialiased bilinear filtering."""
    from PIL import Image

    width, height = img.size
    if (width, height) == (side, side):
        return img
    s = min(width, height)
    box = ((width - s) / 2, (height - s) / 2, (width + s) / 2, (height + s) / 2)
    return img.resize((side, side), Image.Resampling.BILINEAR, box=box)


def decode_image(path: Path, side: int, channels: int) -> tuple[np.ndarray, bool]:
    """One file as uint8 (side, side, C) and whether it is in colour (some pixel with R, G, B not all
    equal; always False when read as one channel); C = channels, or 3 when the channels are inferred
    (grey images repeated, so they can join colour ones)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = "L" if channels == 1 or (channels == 0 and img.mode in GREY_MODES) else "RGB"
            pixels = np.asarray(_square(to_mode(img, mode), side), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DiffdistillError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    if pixels.ndim == 2:
        return pixels[:, :, None].repeat(1 if channels == 1 else 3, axis=2), False  # (side, side, C)
    # Grey content stored as RGB (a WebP is always RGB; many exports are) is not colour.
    colour = bool((pixels[:, :, 0] != pixels[:, :, 1]).any() or (pixels[:, :, 1] != pixels[:, :, 2]).any())
    return pixels, colour


def _decode_chunk(paths: list[Path], side: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((len(paths), side, side, channels or 3), dtype=np.uint8)  # (n, H, W, C)
    colour = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        out[i], colour[i] = decode_image(path, side, channels)
    return out, colour


def decode_images(paths: list[Path], settings: FolderSettings, workers: int = 1) -> tuple[torch.Tensor, bool]:
    """All files as uint8 (N, C, side, side) and whether any is in colour; with ``workers`` > 1 in a process
    pool (benchmarks/folder_read.py measures both). Chunks land in one preallocated array, in order."""
    side, channels = settings.side, settings.channels
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    out = np.empty((len(paths), channels or 3, side, side), dtype=np.uint8)  # (N, C, H, W)
    any_colour = False
    with ProcessPoolExecutor(workers) if workers > 1 and len(chunks) > 1 else nullcontext() as pool:
        mapper = pool.map if pool else map
        for start, (pixels, colour) in zip(range(0, len(paths), CHUNK),
                                           mapper(_decode_chunk, chunks, [side] * len(chunks), [channels] * len(chunks))):
            out[start:start + len(pixels)] = pixels.transpose(0, 3, 1, 2)  # (n, H, W, C) -> (n, C, H, W)
            any_colour = any_colour or bool(colour.any())
    return torch.from_numpy(out), any_colour


# --- the whole data set ---------------------------------------------------------------------------------


def read_folder(root, settings: FolderSettings = FolderSettings(), *, ipcs=(), models: dict[str, dict] | None = None,
                workers: int = 1) -> dict[str, LabeledImages]:
    """Both splits (``train``, ``test``) of a folder data set, after every check; ``models`` are the U-ViT
    configurations (name -> constructor keywords) the images must fit, ``ipcs`` the IPCs evaluated."""
    models = models or {}
    check_networks_fit(settings.side, settings.channels, models)  # the configured shape, before any listing
    train_folder, test_folder = split_folders(root)
    listed = {"train": list_split(train_folder), "test": list_split(test_folder)}
    check_same_classes(listed["train"], listed["test"])
    check_images_per_class(listed["train"], ipcs)
    decoded, any_colour = {}, False
    for split, files in listed.items():
        paths, labels = files.paths_and_labels()
        images, colour = decode_images(paths, settings, workers)  # (N, C, side, side)
        decoded[split], any_colour = (images, labels), any_colour or colour
    channels = settings.channels or (3 if any_colour else 1)
    check_networks_fit(settings.side, channels, models)
    extra = {"side": settings.side, "channels": channels, "channels_inferred": settings.channels == 0}
    return {split: _labeled(split, listed[split], *decoded[split], channels, extra) for split in listed}


def _labeled(split: str, files: SplitFiles, images: torch.Tensor, labels: list[int], channels: int,
             extra: dict) -> LabeledImages:
    images = images[:, :channels].contiguous() if images.shape[1] != channels else images  # inferred grey: one copy
    log.info("read %s: %d images, %d classes, %d channel(s) at %dx%d", files.folder, len(labels), len(files.classes),
             channels, images.shape[2], images.shape[3])
    return LabeledImages(images, torch.tensor(labels, dtype=torch.int64), list(files.classes), "folder", split,
                         {**extra, "source": str(files.folder)})
