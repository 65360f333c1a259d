"""The challenge submission: pick IPC images per class from the sampled pool, normalise, validate,
write; and read a package back (labels by position) for evaluation.

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

from . import atomic
from .data import LabeledImages
from .errors import DiffdistillError
from .normalize import CHALLENGE_STATS, normalize

# The official Track 1 layout: (number of classes, (C, H, W)). The tensor has 10 * classes rows.
TRACK1: dict[str, tuple[int, tuple[int, int, int]]] = {
    "cifar100": (100, (3, 32, 32)),
    "tinyimagenet": (200, (3, 64, 64)),
}
TRACK1_IPC = 10
log = logging.getLogger(__name__)

RULES = ("first", "random", "herding", "coverage")
FEATURE_RULES = ("herding", "coverage")  # rules that need the real-data feature ConvNet
# De-normalised pixels must lie in [0, 1] up to float rounding of the stored values.
RANGE_TOLERANCE = 1e-3


def selection_inputs(classify, pool: LabeledImages, real: LabeledImages, rule: str) -> dict:
    """The keywords :func:`select_indices` needs for ``rule`` from a real-data classifier.

    ``classify(uint8 images) -> (features (N, F), logits (N, K))``, e.g.
    :meth:`diffdistill.fid.ConvNetExtractor.classify`. Herding's targets are the real class means
    (K, F); coverage's are the real features of each class (K tensors (n_k, F)). Other rules need none.
    """
    if rule not in FEATURE_RULES:
        return {}
    features, logits = classify(pool.images)
    real_features, _ = classify(real.images)
    per_class = [real_features[real.labels == k] for k in range(pool.num_classes)]  # K x (n_k, F)
    targets = torch.stack([f.mean(0) for f in per_class]) if rule == "herding" else per_class
    return {"features": features, "predictions": logits.argmax(1), "targets": targets}


def _check_selection(rule: str, ipc: int, features, predictions, targets) -> None:
    """What :func:`select_indices` needs for ``rule``, named when missing."""
    if rule not in RULES:
        raise DiffdistillError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if ipc < 1:
        raise DiffdistillError(f"ipc must be >= 1, got {ipc}")
    if rule in ("herding", "coverage") and (features is None or predictions is None):
        raise DiffdistillError(f"rule {rule!r} needs the features and predictions of a real-data classifier")
    if rule == "coverage" and targets is None:
        raise DiffdistillError("rule 'coverage' needs the real training features of each class (targets)")


def select_indices(pool: LabeledImages, ipc: int, rule: str = "first", seed: int = 0, *,
                   features: torch.Tensor | None = None, predictions: torch.Tensor | None = None,
                   targets=None) -> torch.Tensor:
    """Pool indices of the package rows, class-major: IPC per class, classes in index order.

    "first" takes each class's first IPC images in pool order. Every pool image is an independent
    draw from the model (the order only reflects when it was sampled), so this is an unbiased pick,
    and it is the one a run with a smaller budget would have made. "random" takes a seeded random
    IPC-subset of each class (kept in pool order). "herding" uses a classifier trained on the real
    data (``features`` (N, F) and ``predictions`` (N,) of it): among the images of a class that the
    classifier assigns to that class, it greedily picks the IPC whose feature mean best matches
    ``targets[k]`` (K, F), the class's mean feature on the real training data (herding; without
    targets, the mean of the candidates), so the few images are on-label and representative.
    "coverage": see :func:`coverage`.
    """
    _check_selection(rule, ipc, features, predictions, targets)
    generator = torch.Generator().manual_seed(int(seed))
    chosen, short = [], []
    for k, name in enumerate(pool.classes):
        members = torch.nonzero(pool.labels == k).flatten()  # (n_k,) in pool order
        if members.numel() < ipc:
            short.append(f"class {k} ({name!r}) has {members.numel()}")
            continue
        if rule == "random":
            members = members[torch.randperm(members.numel(), generator=generator)[:ipc]].sort().values
        elif rule == "herding":
            target = None if targets is None else targets[k]
            members = herding(members, features, predictions == k, ipc, name, target=target)
        elif rule == "coverage":
            members = coverage(members, features, predictions == k, ipc, targets[k], name)
        chosen.append(members[:ipc])
    if short:
        raise DiffdistillError(f"pool {pool.name!r} has fewer than {ipc} images (ipc={ipc}, rule {rule!r}) "
                               f"for {len(short)} class(es): " + "; ".join(short))
    return torch.cat(chosen)  # (K * ipc,)


def on_label_candidates(members: torch.Tensor, on_label: torch.Tensor, ipc: int, name: str) -> torch.Tensor:
    """The members the real-data classifier puts in their class; all members if fewer than IPC are."""
    candidates = members[on_label[members]]
    if candidates.numel() < ipc:
        log.warning("class %s: only %d of %d images classified on-label; choosing among all of them",
                    name, candidates.numel(), members.numel())
        return members
    return candidates


def coverage(members: torch.Tensor, features: torch.Tensor, on_label: torch.Tensor, ipc: int,
             real_features: torch.Tensor, name: str = "") -> torch.Tensor:
    """IPC on-label ``members`` that cover the class's real images in feature space (greedy k-medoids).

    Each pick minimises the summed distance from every real image of the class (``real_features``
    (n_real, F)) to its nearest pick so far, so the picks spread over the real class instead of
    crowding its mode. Our choice of rule (not from the paper). Returned in pool order.
    """
    candidates = on_label_candidates(members, on_label, ipc, name)
    distance = torch.cdist(real_features.double(), features[candidates].double())  # (n_real, n)
    nearest = torch.full((distance.shape[0],), float("inf"), dtype=torch.float64)  # (n_real,)
    taken = torch.zeros(len(candidates), dtype=torch.bool)
    for _ in range(ipc):
        cost = torch.minimum(nearest[:, None], distance).sum(0)  # (n,) summed distance if each were added
        cost[taken] = float("inf")
        pick = int(cost.argmin())
        taken[pick] = True
        nearest = torch.minimum(nearest, distance[:, pick])
    return candidates[taken]  # (ipc,) in pool order


def herding(members: torch.Tensor, features: torch.Tensor, on_label: torch.Tensor, ipc: int, name: str = "",
            target: torch.Tensor | None = None):
    """IPC of ``members`` (pool indices of one class) chosen by herding on their features.

    Candidates are the members the classifier puts in their class (``on_label``, (N,) bool); if fewer
    than IPC are, all members are candidates (logged). Greedy: each pick minimises the distance
    between the running mean of the picks and ``target`` (F,) (default: the candidates' mean).
    Returned in pool order.
    """
    candidates = on_label_candidates(members, on_label, ipc, name)
    feats = features[candidates].double()  # (n, F)
    target = feats.mean(0) if target is None else target.double()  # (F,)
    running = torch.zeros_like(target)
    taken = torch.zeros(len(candidates), dtype=torch.bool)
    for i in range(ipc):
        gap = ((target * (i + 1) - running - feats) ** 2).sum(1)  # (n,) distance if each were added
        gap[taken] = float("inf")
        pick = int(gap.argmin())
        taken[pick] = True
        running += feats[pick]
    return candidates[taken]  # (ipc,) in pool order


def package(pool: LabeledImages, dataset: str, ipc: int = 10, *, mean, std, rule: str = "first",
            seed: int = 0, index: torch.Tensor | None = None, **selection) -> torch.Tensor:
    """float32 (K * IPC, C, H, W), normalised, class-major (see :func:`select_indices`, which gets
    ``selection``: the classifier outputs for "herding" and "coverage"); ``index`` skips the selection."""
    if index is None:
        try:
            index = select_indices(pool, ipc, rule, seed, **selection)
        except DiffdistillError as err:
            raise DiffdistillError(f"{dataset} package: {err}") from err
    images = pool.images[index]  # (K * ipc, C, H, W) uint8
    return normalize(images, mean, std).contiguous()  # (K * ipc, C, H, W)


def normalized_pool(pool: LabeledImages, mean, std) -> dict:
    """The whole labelled pool, normalised like the package, for evaluating on all of it."""
    return {
        "images": normalize(pool.images, mean, std).contiguous(),  # (N, C, H, W) float32
        "labels": pool.labels.clone(), "classes": list(pool.classes),
        "mean": list(mean), "std": list(std),
    }


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
