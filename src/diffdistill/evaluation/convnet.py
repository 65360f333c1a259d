"""The evaluation ConvNet of the First Dataset Distillation Challenge (docs/reference.md, "ConvNet").

Layer order and module names equal the challenge's ``utils/network.py`` ConvNet, so its state_dict
keys (``features.<i>.weight``, ``classifier.weight``, ...) and shapes match and weights move both
ways with a strict load. Each block is Conv2d(3x3) -> GroupNorm(width, width) -> ReLU ->
AvgPool2d(2); a GroupNorm with one group per channel normalises every channel of every image over
its own spatial positions, which is what the challenge calls "instancenorm".

Two rules of the organisers' network matter for small or one-channel images:

* the first convolution pads by 3 (not 1) when the input has one channel (the MNIST 28 -> 32
  convention); every later convolution pads by 1;
* the classifier's input size is computed from the *nominal* side, halved (floored) per block as if
  the first padding were 1, after a first side of 28 is replaced by 32 (both sides).

For an 8x8 digit the real feature maps are 12 -> 6 -> 3 -> 1 and the nominal ones 8 -> 4 -> 2 -> 1,
both 128 * 1 * 1. Where the two disagree (a one-channel side of 12, a three-channel side of 28, ...)
the organisers' network fails at its first forward pass; here the constructor refuses it instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from diffdistill.errors import DiffdistillError

# Modules per block, so block d's conv is features.<4d> and its norm features.<4d + 1>.
BLOCK_LEN = 4


def first_padding(channel: int) -> int:
    """The organisers' padding of the first convolution: 3 for one-channel input, else 1."""
    return 3 if channel == 1 else 1


def nominal_feature_side(side: int, net_depth: int, first_side: int) -> int:
    """The classifier's view of one side: 28 becomes 32 (decided by the first side), then halved per block."""
    if first_side == 28:
        side = 32
    for _ in range(net_depth):
        side //= 2
    return side


def real_feature_side(side: int, net_depth: int, channel: int) -> int:
    """The side the feature maps really have: 3x3 conv (padding 3 or 1) then AvgPool2d(2), per block."""
    for depth in range(net_depth):
        padding = first_padding(channel) if depth == 0 else 1
        side = side + 2 * padding - 2  # a 3x3 convolution with stride 1
        if side < 2:
            return 0  # AvgPool2d(2) of a side below 2 is an error in torch
        side //= 2
    return side


def check_input_size(channel: int, im_size: Sequence[int], net_depth: int = 3) -> tuple[int, int]:
    """The classifier's feature-map size for this input; refuses a size where it differs from what the
    convolutions give (the organisers' network would fail at its first forward pass)."""
    height, width = int(im_size[0]), int(im_size[1])
    nominal = tuple(nominal_feature_side(s, net_depth, height) for s in (height, width))
    real = tuple(real_feature_side(s, net_depth, channel) for s in (height, width))
    if min(nominal) < 1 or nominal != real:
        raise DiffdistillError(
            f"im_size {tuple(im_size)} with {channel} channel(s) is not a size the challenge's ConvNet "
            f"(depth {net_depth}) accepts: its classifier expects feature maps of {nominal} but the "
            f"convolutions give {real}; expected e.g. 1x8x8, 1x28x28, 3x32x32 or 3x64x64")
    return nominal


class ConvNet(nn.Module):
    """Challenge ConvNet: ``net_depth`` conv blocks of width ``net_width``, then one Linear layer."""

    def __init__(self, channel: int, num_classes: int, net_width: int = 128, net_depth: int = 3,
                 im_size: Sequence[int] = (32, 32)):
        super().__init__()
        nominal = check_input_size(channel, im_size, net_depth)
        layers: list[nn.Module] = []
        in_channels = channel
        for depth in range(net_depth):
            layers += [
                nn.Conv2d(in_channels, net_width, kernel_size=3, padding=first_padding(channel) if depth == 0 else 1),
                nn.GroupNorm(net_width, net_width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_channels = net_width
        self.feature_shape = (net_width, *nominal)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(net_width * nominal[0] * nominal[1], num_classes)

    @property
    def embed_dim(self) -> int:
        """Length of the :meth:`embed` vector: the classifier's input size."""
        c, h, w = self.feature_shape
        return c * h * w

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim): the flattened features the classifier sees."""
        return self.features(x).flatten(1)  # (B, width * h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.classifier(self.embed(x))  # (B, num_classes)
