"""Fréchet distances between image sets in the feature space of a fixed network.

Two feature extractors:

* :class:`diffdistill.scoring.inception_features.InceptionExtractor` -- pytorch-fid's InceptionV3 (the TF "2015-12-05" weights), 2048-d
  pool features: the standard **FID**, for natural images (CIFAR-100, Tiny-ImageNet).
* :class:`ConvNetExtractor` -- the evaluation ConvNet trained on the real training data: a Fréchet
  distance in a classifier's feature space, reported as **FD-ConvNet** and never as FID (for tiny
  or non-natural data such as the 8x8 digits default, where Inception features mean little).

The distance itself (:func:`frechet_distance`) is our own float64 implementation through
eigenvalues of symmetric matrices: pytorch-fid's SciPy ``sqrtm(..., disp=False)`` call breaks on
newer SciPy and returned large imaginary parts on some older ones (docs/reference.md, "FID").
FID depends strongly on the sample count: only compare scores computed at one fixed count.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffdistill import atomic
from diffdistill.data.normalize import normalize
from diffdistill.errors import DiffdistillError

log = logging.getLogger(__name__)

# extractor name -> the name its score must be reported under
SCORE_KINDS: dict[str, str] = {"inception": "FID", "convnet": "FD-ConvNet"}



# ---------------------------------------------------------------------------------------------
# The distance


def _symmetric_sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues -> 0."""
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _check_moments(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise DiffdistillError(f"{which}: expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DiffdistillError(f"{which}: mu/sigma contain NaN or inf")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), all in float64.

    tr sqrt(S1 S2) equals the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), so two symmetric eigendecompositions
    replace a general matrix square root and no complex numbers appear.
    """
    mu1, sigma1 = _check_moments(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_moments(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise DiffdistillError(f"feature dimensions differ: {mu1.size} vs {mu2.size}")
    root1 = _symmetric_sqrt_psd(sigma1)
    product = root1 @ sigma2 @ root1  # (d, d), symmetric PSD up to rounding
    eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# Statistics on disk


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of ``count`` feature vectors from the named extractor."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str
    meta: dict = field(default_factory=dict)

    @property
    def score_kind(self) -> str:
        """"FID" for Inception features, "FD-ConvNet" for the evaluation ConvNet."""
        return SCORE_KINDS.get(self.extractor, f"FD-{self.extractor}")

    def distance_to(self, other: "FeatureStats") -> float:
        if other.extractor != self.extractor:
            raise DiffdistillError(f"cannot compare {self.extractor} statistics with {other.extractor} statistics")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def save_stats(path: str | os.PathLike, stats: FeatureStats) -> None:
    """An npz with ``mu``/``sigma`` (float64, as pytorch-fid writes them) plus our metadata."""
    header = {"count": int(stats.count), "extractor": stats.extractor, "score_kind": stats.score_kind, **stats.meta}
    buffer = io.BytesIO()  # np.savez on a file object: no ".npz" appended to the temporary name
    np.savez(buffer, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
             meta=np.array(json.dumps(header)))
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Read :func:`save_stats` output; a plain pytorch-fid npz (mu, sigma only) counts as Inception."""
    path = Path(path)
    if not path.is_file():
        raise DiffdistillError(f"{path}: no such file (expected feature statistics .npz with mu and sigma)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as err:  # zipfile, ValueError, OSError ... for corrupt files
        raise DiffdistillError(f"{path}: cannot be read as an npz file ({type(err).__name__}: {err})") from err
    missing = [key for key in ("mu", "sigma") if key not in arrays]
    if missing:
        raise DiffdistillError(f"{path}: not a statistics file, missing arrays {missing}")
    try:
        header = json.loads(str(arrays["meta"])) if "meta" in arrays else {"extractor": "inception", "count": 0}
    except ValueError as err:
        raise DiffdistillError(f"{path}: its 'meta' entry is not valid JSON ({err})") from err
    count, extractor = int(header.pop("count", 0)), str(header.pop("extractor", "inception"))
    header.pop("score_kind", None)
    try:
        mu, sigma = _check_moments(arrays["mu"], arrays["sigma"], str(path))
    except DiffdistillError as err:
        raise DiffdistillError(f"{path}: {err}") from err
    return FeatureStats(mu, sigma, count, extractor, header)


# ---------------------------------------------------------------------------------------------
# Feature extractors


def check_uint8_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DiffdistillError(f"feature extractor: expected uint8 images (N, C, H, W), got {got}")
    return images


class ConvNetExtractor:
    """Features of the evaluation ConvNet (``convnet.embed``) on normalised uint8 images."""

    name = "convnet"

    def __init__(self, convnet: torch.nn.Module, mean, std, device):
        self.device = torch.device(device)
        self.convnet = convnet.to(self.device).eval()
        self.mean, self.std = tuple(mean), tuple(std)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, F) on the CPU."""
        images = check_uint8_images(images)
        if images.shape[1] != len(self.mean):
            raise DiffdistillError(f"ConvNet features: images have {images.shape[1]} channels, "
                                   f"the normalisation has {len(self.mean)}")
        x = normalize(images, self.mean, self.std).to(self.device)  # (N, C, H, W)
        return self.convnet.embed(x).flatten(1).float().cpu()  # (N, F)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, F), logits (N, K)) of uint8 images, in batches (the prediction is the argmax)."""
        feats = torch.cat([self(part) for part in images.split(batch_size)])  # (N, F)
        return feats, self.convnet.classifier(feats.to(self.device)).cpu()  # (N, K) logits


Extractor = Callable[[torch.Tensor], torch.Tensor]


def compute_stats(extractor: Extractor, images: torch.Tensor, batch_size: int = 100) -> FeatureStats:
    """Mean and covariance of the extractor's features over ``images`` (uint8 (N, C, H, W)).

    Accumulates float64 sums of features shifted by the first batch's mean, so memory stays
    O(d^2) for any N and the covariance does not lose digits to a large common offset.
    """
    images = check_uint8_images(images)
    count = images.shape[0]
    if count < 2:
        raise DiffdistillError(f"feature statistics need at least 2 images, got {count}")
    shift = total = outer = None
    for start in range(0, count, batch_size):
        feats = extractor(images[start:start + batch_size]).double().numpy()  # (B, F)
        if shift is None:
            shift = feats.mean(0)
            total, outer = np.zeros_like(shift), np.zeros((shift.size, shift.size))
        centred = feats - shift  # (B, F)
        total += centred.sum(0)
        outer += centred.T @ centred
        log.info("features %d/%d", min(start + batch_size, count), count)
    mean_offset = total / count
    sigma = (outer - count * np.outer(mean_offset, mean_offset)) / (count - 1)
    return FeatureStats(shift + mean_offset, sigma, count, getattr(extractor, "name", "custom"))
