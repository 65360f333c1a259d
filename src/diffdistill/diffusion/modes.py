"""Mode guidance (docs/reference.md, "Mode guidance"): k modes per class and the pull towards them.

:func:`class_modes` finds ``k`` modes per class by k-means (:func:`kmeans`: k-means++ seeding, then
Lloyd iterations) over the real training images in the diffusion model's pixel range [-1, 1], the
space in which the solver predicts the clean image x0. :class:`ModePull` is what the solver adds to
that prediction during the first network evaluations: strength * (mode - x0). Image i of a class in
the pool is pulled towards mode i mod k of that class (:func:`balanced_mode_indices`), so the pool
covers the modes evenly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from diffdistill.data import LabeledImages, load_images, to_model_range
from diffdistill.errors import DiffdistillError

log = logging.getLogger(__name__)

KMEANS_SEED = 0  # the modes depend on the training split and k alone: the same in every stage and shard
KMEANS_ITERATIONS = 100  # Lloyd iterations at most; they stop earlier once no point changes cluster


def kmeans(points: torch.Tensor, k: int, *, seed: int = KMEANS_SEED,
           iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``points`` (n, d): (centers (k, d), cluster of each point (n,)).

    Seeding is k-means++ (each new center drawn with probability proportional to the squared distance
    to the nearest center so far) from a CPU generator seeded with ``seed``; then Lloyd iterations
    until no point changes cluster. A cluster left empty keeps its center.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= the number of points ({n}), got k={k}")
    points = points.float()
    generator = torch.Generator().manual_seed(int(seed))
    centers = _kmeans_plus_plus(points, k, generator)  # (k, d)
    assignment = torch.cdist(points, centers).argmin(dim=1)  # (n,)
    for _ in range(iterations):
        for j in range(k):
            members = points[assignment == j]
            if members.shape[0]:
                centers[j] = members.mean(dim=0)
        new = torch.cdist(points, centers).argmin(dim=1)
        if torch.equal(new, assignment):
            break
        assignment = new
    return centers, assignment


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.cdist(points, points[chosen]).squeeze(1) ** 2  # (n,) squared distance to the nearest center
    for _ in range(1, k):
        # All distances 0 (fewer distinct points than k): any point will do.
        weights = nearest if nearest.sum() > 0 else torch.ones(n)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, ((points - points[index]) ** 2).sum(dim=1))
    return points[chosen].clone()  # (k, d)


def class_modes(data: LabeledImages, modes_per_class: int, *, seed: int = KMEANS_SEED) -> torch.Tensor:
    """k = ``modes_per_class`` modes of each class: float (num_classes, k, C, H, W) in [-1, 1]."""
    shape = tuple(data.images.shape[1:])
    modes = torch.empty(data.num_classes, modes_per_class, *shape)
    for label, name in enumerate(data.classes):
        images = data.images[data.labels == label]  # (n_c, C, H, W) uint8
        if images.shape[0] < modes_per_class:
            raise DiffdistillError(f"sampler key modes_per_class: {modes_per_class} modes, but class {label} "
                                   f"({name!r}) has only {images.shape[0]} training images")
        centers, _ = kmeans(to_model_range(images).flatten(1), modes_per_class, seed=seed)
        modes[label] = centers.view(modes_per_class, *shape)
    return modes


def modes_for(settings, real_train: str | None) -> torch.Tensor | None:
    """The class modes a sampler with these settings needs (None without mode guidance), from the real
    training split in the file ``real_train``."""
    if settings.mode_guidance == 0:
        return None
    if not real_train:
        raise DiffdistillError("sampler key mode_guidance > 0 needs the real training split (--real-train) "
                               "to find the class modes in")
    began = time.perf_counter()
    modes = class_modes(load_images(real_train), settings.modes_per_class)
    log.info("%d modes per class of %s in %.1f s", settings.modes_per_class, real_train, time.perf_counter() - began)
    return modes


def balanced_mode_indices(num_classes: int, n: int, modes_per_class: int, offset: int = 0) -> torch.Tensor:
    """The mode of each image of :func:`diffdistill.diffusion.sampling.balanced_labels` (same ``offset``): the
    image's rank within its class, mod k, so the images of a class go through the modes in turn."""
    return ((torch.arange(n, dtype=torch.long) + offset) // num_classes) % modes_per_class  # (n,)


@dataclass
class ModePull:
    """The change the solver makes to its clean-image prediction x0 at each network evaluation:
    ``strength`` * (target - x0) during the first ``evaluations`` evaluations, none after.

    ``targets`` (B, C, H, W): each image's mode. Strength 1 replaces x0 by the mode.
    """

    targets: torch.Tensor
    strength: float
    evaluations: int

    def __call__(self, x0: torch.Tensor, evaluation: int) -> torch.Tensor | None:
        if evaluation >= self.evaluations:
            return None
        return self.strength * (self.targets - x0)
