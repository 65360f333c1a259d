"""Per-channel normalisation of the challenge: packages are stored pre-normalised.

CIFAR-100 and Tiny-ImageNet use the challenge's fixed constants (docs/reference.md, "Challenge
protocol"); any other data set (the digits default) uses the mean and std of its real training
split, computed once and recorded next to the package.
"""

from __future__ import annotations

import torch

CHALLENGE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel of uint8 images (N, C, H, W) scaled to [0, 1]."""
    x = images.double().div(255.0).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def stats_for(dataset: str, real_train_images: torch.Tensor | None = None):
    """The challenge constants for its two data sets, else the statistics of the real train split."""
    if dataset in CHALLENGE_STATS:
        return CHALLENGE_STATS[dataset]
    if real_train_images is None:
        from diffdistill.errors import DiffdistillError

        raise DiffdistillError(f"data set {dataset!r} has no challenge constants: give the real training "
                               f"split (--real-train) for its normalisation statistics")
    return channel_stats(real_train_images)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of :func:`normalize`, back to uint8."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x.float() * std_t + mean_t) * 255.0).round().clamp(0, 255).to(torch.uint8)
