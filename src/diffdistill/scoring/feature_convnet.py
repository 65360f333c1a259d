"""The feature ConvNet of FD-ConvNet scoring: the challenge's evaluation ConvNet trained on the real
training split, saved to one file, and loaded back as a feature extractor.

FD-ConvNet replaces FID where Inception features mean little (8x8 digits); see docs/reference.md,
"FID". The package rules "herding" and "coverage" pick pool images with the same network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from diffdistill import atomic, settings
from diffdistill.data import LabeledImages
from diffdistill.data.normalize import normalize, stats_for
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import protocol
from diffdistill.evaluation.convnet import ConvNet
from diffdistill.scoring import fid
from diffdistill.settings import setting

CONVNET_FORMAT = "diffdistill-feature-convnet"


@dataclass
class ReferenceSettings:
    """The feature space of checkpoint scoring, and the real data's statistics in it (the
    reference_stats rule; score_checkpoint takes the same flags)."""

    extractor: str = setting(choices=tuple(fid.SCORE_KINDS), description=(
        "convnet: FD-ConvNet (the evaluation ConvNet's features) | inception: FID"))
    inception_weights: str | None = setting(None, description=(
        "a local Inception weights file for offline FID (.pth or TorchScript); null: torch.hub"))
    convnet_epochs: int = setting(50, minimum=1, description=(
        "epochs of the feature ConvNet, trained on the real training split"))

    def __post_init__(self):
        settings.check(self, "reference settings")


def train_feature_convnet(real: LabeledImages, *, epochs: int, device, seed: int | None = None,
                          batch_size: int = protocol.CHALLENGE_BATCH, net_width: int = 128,
                          net_depth: int = 3) -> dict:
    """The evaluation ConvNet trained on the real training split with the challenge protocol.

    Returns the file contents for :func:`save_feature_convnet`: state_dict, architecture, the
    normalisation (challenge constants, else the split's own statistics) and the training settings.
    """
    mean, std = stats_for(real.name, real.images)
    x = normalize(real.images, mean, std)  # (N, C, H, W) float32, as ConvNetExtractor feeds it
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    _, channel, height, width = real.images.shape
    net = protocol.train_convnet(
        x, real.labels, num_classes=real.num_classes, channel=channel, im_size=(height, width), epochs=epochs,
        batch_size=batch_size, device=device, generator=generator, init_seed=seed, net_width=net_width,
        net_depth=net_depth)
    architecture = dict(channel=channel, num_classes=real.num_classes, net_width=net_width, net_depth=net_depth,
                        im_size=[height, width])
    return {"format": CONVNET_FORMAT, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "architecture": architecture, "mean": list(mean), "std": list(std),
            "settings": {"epochs": epochs, "batch_size": batch_size, "seed": seed, "dataset": real.name,
                         "train_images": len(real)}}


def save_feature_convnet(path: str | os.PathLike, contents: dict) -> None:
    atomic.torch_save(contents, path)


def load_feature_convnet(path: str | os.PathLike, device) -> fid.ConvNetExtractor:
    """A :class:`~diffdistill.scoring.fid.ConvNetExtractor` from a file of :func:`save_feature_convnet`."""
    path = Path(path)
    obj = atomic.read_torch(path, "the feature ConvNet written by reference_stats")
    if not isinstance(obj, dict) or obj.get("format") != CONVNET_FORMAT:
        raise DiffdistillError(f"{path}: not a feature ConvNet file (expected format={CONVNET_FORMAT!r})")
    try:
        net = ConvNet(**obj["architecture"])
        net.load_state_dict(obj["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise DiffdistillError(f"{path}: architecture and state_dict do not fit ({err})") from err
    return fid.ConvNetExtractor(net, obj["mean"], obj["std"], device)
