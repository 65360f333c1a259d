"""The challenge submission format: validate and write a package, and read one back (labels by
position) for evaluation. Which pool images go in it: :mod:`diffdistill.packaging.selection`.

Contract of the First Dataset Distillation Challenge (docs/reference.md, "Challenge protocol"): one
file per data set (``cifar100.pt``, ``tinyimagenet.pt``) holding a *bare* float tensor (N, 3, H, W),
no labels, no dict. Labels are implied by position: class-major blocks, class i in rows
i*IPC .. (i+1)*IPC - 1 in class-index order. Images are stored pre-normalised with the challenge's
per-channel constants. Track 1 asserts N = 10 * classes: [1000, 3, 32, 32] and [2000, 3, 64, 64].
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from diffdistill import atomic
from diffdistill.data.normalize import CHALLENGE_STATS
from diffdistill.errors import DiffdistillError

# The official Track 1 layout: (number of classes, (C, H, W)). The tensor has 10 * classes rows.
TRACK1: dict[str, tuple[int, tuple[int, int, int]]] = {
    "cifar100": (100, (3, 32, 32)),
    "tinyimagenet": (200, (3, 64, 64)),
}
TRACK1_IPC = 10
log = logging.getLogger(__name__)
# De-normalised pixels must lie in [0, 1] up to float rounding of the stored values.
RANGE_TOLERANCE = 1e-3

def submission_filename(dataset: str) -> str:
    """The file name the challenge expects for ``dataset`` (``cifar100.pt``, ``tinyimagenet.pt``)."""
    key = dataset.lower().replace("-", "").replace("_", "")
    return f"{key}.pt" if key in TRACK1 else f"{dataset}.pt"


def _check(name: str, ok: bool, detail: str, status: str | None = None) -> dict:
    return {"check": name, "status": status or ("pass" if ok else "fail"), "detail": detail}


def _load_candidate(tensor_or_path):
    if isinstance(tensor_or_path, (str, os.PathLike)):
        path = Path(tensor_or_path)
        return atomic.read_torch(path, "a submission tensor"), str(path)
    return tensor_or_path, "package"


def _contract(dataset, num_classes, image_shape, mean, std):
    """Fill the layout and constants of the challenge data sets; other data sets must pass them."""
    official = TRACK1.get(dataset)
    num_classes = num_classes if num_classes is not None else (official[0] if official else None)
    image_shape = image_shape if image_shape is not None else (official[1] if official else None)
    stats = CHALLENGE_STATS.get(dataset, (None, None))
    mean = mean if mean is not None else stats[0]
    std = std if std is not None else stats[1]
    if None in (num_classes, image_shape, mean, std):
        raise DiffdistillError(f"validate: data set {dataset!r} is not a challenge data set; "
                               "pass num_classes, image_shape, mean and std")
    return int(num_classes), tuple(int(s) for s in image_shape), tuple(mean), tuple(std)


def _layout_checks(x, dataset, num_classes, ipc, image_shape) -> list[dict]:
    expected = (ipc * num_classes, *image_shape)
    checks = [
        _check("shape", tuple(x.shape) == expected,
               f"shape {list(x.shape)}, expected [ipc*classes, C, H, W] = {list(expected)}"),
        _check("dtype", x.dtype == torch.float32, f"dtype {x.dtype}, expected torch.float32"),
    ]
    if dataset in TRACK1:
        official = TRACK1[dataset]
        checks.append(_check("track1_layout", (num_classes, image_shape) == official,
                             f"{num_classes} classes of {list(image_shape)}, Track 1 has "
                             f"{official[0]} of {list(official[1])}"))
        checks.append(_check("track1_ipc", True, f"ipc {ipc}; Track 1 asserts ipc {TRACK1_IPC}",
                             status="pass" if ipc == TRACK1_IPC else "warn"))
    return checks


def _value_checks(x, mean, std) -> list[dict]:
    if not x.is_floating_point():
        return []
    finite = bool(torch.isfinite(x).all())
    checks = [_check("finite", finite, "all values finite" if finite else
                     f"{int((~torch.isfinite(x)).sum())} NaN/inf values")]
    if not finite or x.dim() != 4 or x.shape[1] != len(mean):
        return checks
    # x * std + mean is increasing in x (std > 0): de-normalising each channel's extremes is enough.
    per_channel = x.detach().transpose(0, 1).flatten(1)  # (C, N*H*W)
    low = min(lo * s + m for lo, s, m in zip(per_channel.min(1).values.double().tolist(), std, mean))
    high = max(hi * s + m for hi, s, m in zip(per_channel.max(1).values.double().tolist(), std, mean))
    checks.append(_check("normalised_range", low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE,
                         f"de-normalised values in [{low:.4f}, {high:.4f}], expected within [0, 1]"))
    # Images that were scaled to [0, 1] but never normalised pass the range test (x * std + mean
    # stays inside [0, 1]); they give themselves away by having no pixel darker than the mean.
    below = bool((x < 0).any())
    checks.append(_check("normalised_centre", below,
                         "has values below the channel mean" if below else
                         "no value below 0: looks like [0, 1] images that were not normalised"))
    return checks


def validate(tensor_or_path, dataset: str, *, num_classes: int | None = None, ipc: int = TRACK1_IPC,
             image_shape=None, mean=None, std=None) -> list[dict]:
    """Check a package (tensor or file) against the challenge contract; return the checks.

    Each check is {"check", "status" ("pass", "warn", "fail"), "detail"}. Raises
    DiffdistillError listing every failed check. Layout and constants default to the official ones
    for cifar100 / tinyimagenet.
    """
    obj, where = _load_candidate(tensor_or_path)
    num_classes, image_shape, mean, std = _contract(dataset, num_classes, image_shape, mean, std)
    is_tensor = isinstance(obj, torch.Tensor)
    checks = [_check("bare_tensor", is_tensor, f"a {type(obj).__name__}, expected a bare torch.Tensor "
                     "(no dict, no labels)")]
    if is_tensor:
        checks += _layout_checks(obj, dataset, num_classes, ipc, image_shape)
        checks += _value_checks(obj, mean, std)
    failed = [c for c in checks if c["status"] == "fail"]
    if failed:
        raise DiffdistillError(f"{where}: not a valid {dataset} submission: " +
                               "; ".join(f"{c['check']}: {c['detail']}" for c in failed))
    for c in checks:
        if c["status"] == "warn":
            log.warning("%s: %s: %s", where, c["check"], c["detail"])
    return checks


def save_package(tensor: torch.Tensor, path: str | os.PathLike, dataset: str, **contract) -> list[dict]:
    """Write the bare tensor atomically, validating the written file before it takes its name.

    ``contract`` is passed to :func:`validate` (num_classes, ipc, image_shape, mean, std). Returns
    the checks; on a failed check nothing is left at ``path``.
    """
    with atomic.atomic_path(path) as tmp:
        # clone: a view would drag its whole underlying storage into the file.
        torch.save(tensor.detach().cpu().contiguous().clone(), tmp)
        try:
            return validate(tmp, dataset, **contract)
        except DiffdistillError as err:  # name the destination, not the temporary file
            raise DiffdistillError(str(err).replace(str(tmp), str(path))) from err


# --- reading a package back ------------------------------------------------------------------------


def labels_by_position(n: int, num_classes: int, ipc: int) -> torch.Tensor:
    """Labels of a packaged file: class i owns rows i*ipc .. (i+1)*ipc - 1. (n,) int64."""
    if ipc < 1 or n != num_classes * ipc:
        raise DiffdistillError(f"package has {n} images; expected ipc * classes = {ipc} * {num_classes} "
                               f"= {ipc * num_classes}")
    return torch.arange(num_classes).repeat_interleave(ipc)  # (n,)


def load_package(path: str | os.PathLike, num_classes: int, ipc: int, image_shape: Sequence[int]):
    """A submission file: a bare float tensor (N, C, H, W), pre-normalised. Returns (x, labels)."""
    path = Path(path)
    x = atomic.read_torch(path, "a package tensor N x C x H x W")
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise DiffdistillError(f"{path}: expected a bare float tensor (N, C, H, W), got "
                               f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise DiffdistillError(f"{path}: images are {tuple(x.shape[1:])}; expected {tuple(image_shape)} like the test set")
    if not torch.isfinite(x).all():
        raise DiffdistillError(f"{path}: contains NaN or infinite values")
    try:
        labels = labels_by_position(x.shape[0], num_classes, ipc)
    except DiffdistillError as err:
        raise DiffdistillError(f"{path}: {err}") from err
    return x.float(), labels
