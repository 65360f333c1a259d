"""Which pool images make a package: IPC per class by a named rule (docs/reference.md, "Package
rules"), normalised like the challenge's files, class-major (labels by position)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from diffdistill.data import LabeledImages
from diffdistill.data.normalize import normalize
from diffdistill.errors import DiffdistillError
from diffdistill.settings import setting

log = logging.getLogger(__name__)


def selection_inputs(classify, pool: LabeledImages, real: LabeledImages, rule: str) -> dict:
    """The keywords :func:`select_indices` needs for ``rule`` from a real-data classifier.

    ``classify(uint8 images) -> (features (N, F), logits (N, K))``, e.g.
    :meth:`diffdistill.scoring.fid.ConvNetExtractor.classify`. Herding's targets are the real class means
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
        chosen.append(RULES[rule](members, k, name, ipc, generator, features, predictions, targets)[:ipc])
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


# A rule picks IPC of one class's ``members`` (pool indices, pool order):
# rule(members, label, name, ipc, generator, features, predictions, targets) -> (>= ipc,) indices.
def _first(members, label, name, ipc, generator, features, predictions, targets):
    return members


def _random(members, label, name, ipc, generator, features, predictions, targets):
    return members[torch.randperm(members.numel(), generator=generator)[:ipc]].sort().values


def _herding(members, label, name, ipc, generator, features, predictions, targets):
    target = None if targets is None else targets[label]
    return herding(members, features, predictions == label, ipc, name, target=target)


def _coverage(members, label, name, ipc, generator, features, predictions, targets):
    return coverage(members, features, predictions == label, ipc, targets[label], name)


RULES = {"first": _first, "random": _random, "herding": _herding, "coverage": _coverage}
FEATURE_RULES = ("herding", "coverage")  # rules that need the real-data feature ConvNet


@dataclass
class PackageSettings:
    """Which packages are made, and by which rule."""

    ipc: int | list[int] = setting(flag=False, min_items=1, description=(
        "the IPC grid: images per class of each package, each evaluated with random real subsets of its size "
        "(a bare integer is a grid of one); distinct positive integers (checked in workflow/rules/common.smk, "
        "which names a bad value). package/<dataset>.pt, the submission, holds IPC 10 (the challenge's) when "
        "the grid has it, else the grid's largest; the others go to package/ipc<n>/"))
    rule: str = setting(choices=tuple(RULES), description=(
        "coverage: on-label images covering the real class in the feature ConvNet's space | herding: on-label "
        "images matching the real class mean | first | random; herding and coverage need scoring.extractor "
        "convnet (docs/reference.md, \"Package rules\")"))
