"""Miniature CIFAR-100 and Tiny-ImageNet folders in the real on-disk formats, for any test.

Import from a test module (pytest puts ``tests/`` on the path)::

    from datasets_fixtures import make_cifar100, make_tiny_imagenet

Both helpers write into ``root`` and return the data set folder. The pixel content encodes the
class so a test can check label order without decoding anything else:

* CIFAR-100: red plane constant = label, green plane constant = ``cifar_green(split, k)`` for the
  k-th image of its class, blue plane a horizontal ramp ``8 * column`` (checks channel-major and
  row-major decoding). Class names ``fine000`` .. (alphabetical, as the real fine label names are),
  samples shuffled across classes as in the real files.
* Tiny-ImageNet: every pixel of an image of class index i (in sorted wnid order) is
  ``tiny_colour(i)``; JPEG is lossy, so compare with a tolerance (flat colours survive to +-3).
  wnids.txt is written unsorted; the first validation image is greyscale (JPEG mode "L") with value
  ``tiny_grey(i)`` (its R, G, B come back equal).

* Folder data set (``make_image_folder``, the ImageFolder layout): image k of class i is PNG when k
  is even, else JPEG; grey (mode "L", value ``folder_grey(i)``) when k % 3 == 0, else RGB
  (``folder_colour(i)``); class folders are created in unsorted order. With ``noise`` every pixel
  gets a seeded random offset (for runs that need images to differ).

``make_public_uvit_weights`` writes a stand-in for a public U-ViT checkpoint (randomly initialised,
official flat state_dict layout).

The signatures are stable: several test modules use them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_SIDE = 32
TINY_SIDE = 64


def cifar_class_name(label: int) -> str:
    return f"fine{label:03d}"


def cifar_green(split: str, k: int) -> int:
    """Green value of the k-th image of a class in ``split`` (train 100 + k, test 200 + k)."""
    return (100 if split == "train" else 200) + k


def _cifar_batch(split: str, per_class: int, num_classes: int, rng) -> dict:
    labels = np.repeat(np.arange(num_classes), per_class)
    within = np.tile(np.arange(per_class), num_classes)
    order = rng.permutation(len(labels))  # the real files are shuffled across classes
    labels, within = labels[order], within[order]
    data = np.empty((len(labels), 3, CIFAR_SIDE, CIFAR_SIDE), dtype=np.uint8)
    data[:, 0] = labels[:, None, None]
    data[:, 1] = np.array([cifar_green(split, int(k)) for k in within], dtype=np.uint8)[:, None, None]
    data[:, 2] = (8 * np.arange(CIFAR_SIDE, dtype=np.uint8))[None, None, :]
    return {
        b"filenames": [f"{cifar_class_name(int(c))}_s_{i:06d}.png".encode() for i, c in enumerate(labels)],
        b"batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1".encode(),
        b"fine_labels": [int(c) for c in labels],
        b"coarse_labels": [int(c) // 5 for c in labels],
        b"data": data.reshape(len(labels), 3 * CIFAR_SIDE * CIFAR_SIDE),  # channel-major rows
    }


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # binary protocol 2, as the original (Python 2) files


def make_cifar100(root, n_train_per_class: int = 2, n_test_per_class: int = 1, num_classes: int = 100) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` and return that folder.

    ``num_classes`` other than 100 makes a (deliberately) wrong data set for error tests.
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _dump(_cifar_batch("train", n_train_per_class, num_classes, rng), folder / "train")
    _dump(_cifar_batch("test", n_test_per_class, num_classes, rng), folder / "test")
    meta = {
        b"fine_label_names": [cifar_class_name(c).encode() for c in range(num_classes)],
        b"coarse_label_names": [f"coarse{c:02d}".encode() for c in range((num_classes + 4) // 5)],
    }
    _dump(meta, folder / "meta")
    return folder


def tiny_wnid(i: int) -> str:
    """wnid of class index i; sorted order of the wnids = index order."""
    return f"n{1000000 + 7 * i:08d}"


def tiny_class_name(i: int) -> str:
    return f"thing {i}, object {i}"


def tiny_colour(i: int) -> tuple[int, int, int]:
    return (40 + 50 * i) % 256, 200 - (30 * i) % 200, 120


def tiny_grey(i: int) -> int:
    return 60 + 40 * i % 180


def _jpeg(path: Path, colour, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (TINY_SIDE, TINY_SIDE), colour).save(path, "JPEG", quality=95)


def _tiny_words(folder: Path, wnids: list[str]) -> None:
    # The real words.txt covers all of WordNet; a few unrelated lines make sure we look ids up.
    lines = ["n00000001\tentity"] + [f"{w}\t{tiny_class_name(i)}" for i, w in enumerate(wnids)]
    (folder / "words.txt").write_text("\n".join(lines + ["n09999999\tunused"]) + "\n")


def _tiny_train(folder: Path, wnids: list[str], n_train: int) -> None:
    for i, wnid in enumerate(wnids):
        boxes = []
        for k in range(n_train):
            name = f"{wnid}_{k}.JPEG"
            _jpeg(folder / "train" / wnid / "images" / name, tiny_colour(i))
            boxes.append(f"{name}\t0\t0\t63\t63")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")


def _tiny_val(folder: Path, wnids: list[str], n_val: int) -> None:
    rows, j = [], 0
    for k in range(n_val):
        for i, wnid in enumerate(wnids):
            name = f"val_{j}.JPEG"
            if j == 0:  # one greyscale file, as in the real set
                _jpeg(folder / "val" / "images" / name, tiny_grey(i), mode="L")
            else:
                _jpeg(folder / "val" / "images" / name, tiny_colour(i))
            rows.append(f"{name}\t{wnid}\t1\t2\t60\t61")
            j += 1
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def make_tiny_imagenet(root, num_classes: int = 3, n_train: int = 2, n_val: int = 1) -> Path:
    """Write ``root/tiny-imagenet-200/`` (wnids, words, train, val) with real JPEGs; return it.

    ``n_train`` images per class in train, ``n_val`` per class in val (interleaved by class, so
    val image j has class ``j % num_classes``); ``val_0.JPEG`` is greyscale.
    """
    folder = Path(root) / "tiny-imagenet-200"
    folder.mkdir(parents=True, exist_ok=True)
    wnids = [tiny_wnid(i) for i in range(num_classes)]
    (folder / "wnids.txt").write_text("\n".join(wnids[::-1]) + "\n")  # unsorted, as in the real file
    _tiny_words(folder, wnids)
    _tiny_train(folder, wnids, n_train)
    _tiny_val(folder, wnids, n_val)
    (folder / "test" / "images").mkdir(parents=True, exist_ok=True)  # unlabelled in the real set
    return folder


def folder_colour(i: int) -> tuple[int, int, int]:
    return (40 + 70 * i % 200, 200 - 50 * i % 180, 30 + 90 * i % 210)


def folder_grey(i: int) -> int:
    return 50 + 60 * i % 190


def _folder_image(path: Path, i: int, k: int, side: int, rng) -> None:
    grey = k % 3 == 0
    pixels = np.full((side, side) if grey else (side, side, 3), folder_grey(i) if grey else folder_colour(i), np.int16)
    if rng is not None:
        pixels = pixels + rng.integers(-30, 31, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L" if grey else "RGB")
    if k % 2 == 0:
        image.save(path, "PNG")
    else:
        image.save(path, "JPEG", quality=95)


def make_image_folder(root, classes=("cat", "ant", "bee"), n_train: int = 3, n_test: int = 2, side: int = 16,
                      held_out: str = "test", noise: bool = False) -> Path:
    """Write ``root/train/<class>/`` and ``root/<held_out>/<class>/`` (PNG and JPEG, grey and RGB mixed;
    see the module docstring); return ``root``. Class i is the i-th of ``sorted(classes)``."""
    root = Path(root)
    rng = np.random.default_rng(0) if noise else None
    order = sorted(classes)
    for split, count in (("train", n_train), (held_out, n_test)):
        for name in classes:
            for k in range(count):
                suffix = "png" if k % 2 == 0 else "jpg"
                _folder_image(root / split / name / f"{name}_{k:03d}.{suffix}", order.index(name), k, side, rng)
    return root


def make_public_uvit_weights(path, preset: str, num_classes: int, seed: int = 0) -> Path:
    """Write a stand-in for a public U-ViT checkpoint at ``path`` and return it: our U-ViT ``preset``,
    randomly initialised, saved as the official files are (docs/reference.md, "U-ViT"): a flat fp32
    state_dict without ``module.`` prefix, ``label_emb`` with exactly ``num_classes`` rows (no null
    class) or none when ``num_classes`` is 0. ``("uvit_small_2", 0)`` stands in for
    ``cifar10_uvit_small.pth``, ``("uvit_mid_4", 1000)`` for ``imagenet64_uvit_mid.pth``.
    """
    import torch

    from diffdistill.diffusion import uvit

    torch.manual_seed(seed)
    state = uvit.build(preset, num_classes=num_classes, null_class=False).state_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.detach().clone() for key, value in state.items()}, path)
    return path
