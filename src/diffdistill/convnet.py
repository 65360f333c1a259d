"""The evaluation ConvNet of the First Dataset Distillation Challenge (facts.md section 5).

Layer order and module names equal the challenge's ``utils/network.py`` ConvNet, so its state_dict
keys (``features.<i>.weight``, ``classifier.weight``, ...) and shapes match and weights move both
ways with a strict load. Each block is Conv2d(3x3, pad 1) -> GroupNorm(width, width) -> ReLU ->
AvgPool2d(2); a GroupNorm with one group per channel normalises every channel of every image over
its own spatial positions, which is what the challenge calls "instancenorm".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .errors import DiffdistillError

# Modules per block, so block d's conv is features.<4d> and its norm features.<4d + 1>.
BLOCK_LEN = 4


class ConvNet(nn.Module):
    """Challenge ConvNet: ``net_depth`` conv blocks of width ``net_width``, then one Linear layer."""

    def __init__(self, channel: int, num_classes: int, net_width: int = 128, net_depth: int = 3,
                 im_size: Sequence[int] = (32, 32)):
        super().__init__()
        height, width = int(im_size[0]), int(im_size[1])
        layers: list[nn.Module] = []
        in_channels = channel
        for _ in range(net_depth):
            layers += [
                nn.Conv2d(in_channels, net_width, kernel_size=3, padding=1),
                nn.GroupNorm(net_width, net_width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_channels = net_width
            height, width = height // 2, width // 2  # AvgPool2d floors odd sizes
        if height < 1 or width < 1:
            raise DiffdistillError(f"im_size {tuple(im_size)} is too small for net_depth {net_depth} "
                                   f"(each block halves the side; expected a side of at least {2 ** net_depth})")
        self.feature_shape = (net_width, height, width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(net_width * height * width, num_classes)

    @property
    def embed_dim(self) -> int:
        """Length of the :meth:`embed` vector: width * (H / 2^depth) * (W / 2^depth)."""
        c, h, w = self.feature_shape
        return c * h * w

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim): the flattened features the classifier sees."""
        return self.features(x).flatten(1)  # (B, width * h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.classifier(self.embed(x))  # (B, num_classes)
