"""The challenge ConvNet: state_dict names/shapes as the challenge's network (docs/reference.md, "ConvNet")."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffdistill.errors import DiffdistillError
from diffdistill.evaluation.convnet import ConvNet

# docs/reference.md "ConvNet": depth 3, width 128, Conv2d(3x3, pad 1; 3 for a one-channel first conv) -> GroupNorm(128, 128) -> ReLU ->
# AvgPool2d(2) per block, then Linear(128 * (H/8)^2, classes). A Sequential numbers the modules, so
# block d's conv is features.<4d> and its norm features.<4d+1>.
CIFAR100_KEYS = {
    "features.0.weight": (128, 3, 3, 3), "features.0.bias": (128,),
    "features.1.weight": (128,), "features.1.bias": (128,),
    "features.4.weight": (128, 128, 3, 3), "features.4.bias": (128,),
    "features.5.weight": (128,), "features.5.bias": (128,),
    "features.8.weight": (128, 128, 3, 3), "features.8.bias": (128,),
    "features.9.weight": (128,), "features.9.bias": (128,),
    "classifier.weight": (100, 2048), "classifier.bias": (100,),
}


class ChallengeLayout(nn.Module):
    """The challenge's module layout written out by hand, independently of ConvNet's loop."""

    def __init__(self, channel, classes, side, first_padding=1, classifier_side=None):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, 3, padding=first_padding), nn.GroupNorm(128, 128, affine=True), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
            nn.Conv2d(128, 128, 3, padding=1), nn.GroupNorm(128, 128, affine=True), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
            nn.Conv2d(128, 128, 3, padding=1), nn.GroupNorm(128, 128, affine=True), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2),
        )
        self.classifier = nn.Linear(128 * (classifier_side or side // 8) ** 2, classes)

    def forward(self, x):
        return self.classifier(self.features(x).view(x.shape[0], -1))


def test_cifar100_state_dict_keys_and_shapes():
    sd = ConvNet(3, 100, 128, 3, (32, 32)).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == CIFAR100_KEYS
    assert list(sd) == list(CIFAR100_KEYS)  # same order as the challenge's Sequential


def test_defaults_are_the_challenge_settings():
    net = ConvNet(3, 100)
    assert net.classifier.in_features == 2048
    assert [type(m) for m in net.features[:4]] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d]
    conv, norm, _, pool = net.features[:4]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is not None
    assert norm.num_groups == 128 and norm.num_channels == 128 and norm.affine
    assert pool.kernel_size == 2 and pool.stride == 2


def test_tinyimagenet_classifier_shape():
    net = ConvNet(3, 200, im_size=(64, 64))
    assert tuple(net.classifier.weight.shape) == (200, 128 * 8 * 8)


# (channel, side) -> the organisers' first padding and the classifier's side (docs/reference.md,
# "ConvNet": padding 3 for one channel, a side of 28 counted as 32, halved per block).
LAYOUTS = [(3, 32, 1, 4), (1, 8, 3, 1), (1, 28, 3, 4), (3, 64, 1, 8)]


@pytest.mark.parametrize("channel,side,padding,classifier_side", LAYOUTS)
@pytest.mark.parametrize("direction", ["challenge_to_ours", "ours_to_challenge"])
def test_weights_move_both_ways_through_a_file(tmp_path, direction, channel, side, padding, classifier_side):
    torch.manual_seed(0)
    theirs = ChallengeLayout(channel, 10, side, padding, classifier_side)
    ours = ConvNet(channel, 10, im_size=(side, side))
    src, dst = (theirs, ours) if direction == "challenge_to_ours" else (ours, theirs)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    x = torch.randn(4, channel, side, side)
    torch.testing.assert_close(dst(x), src(x))


# The feature-map side after each block, from docs/reference.md: a one-channel 8x8 digit is padded
# to 12 by the first convolution (12 -> 6 -> 3 -> 1), MNIST's 28 to 32; three channels pad by 1.
FEATURE_SIDES = {(1, 8): [6, 3, 1], (1, 28): [16, 8, 4], (3, 32): [16, 8, 4], (3, 64): [32, 16, 8]}


@pytest.mark.parametrize("channel,side", list(FEATURE_SIDES))
def test_feature_map_sizes_follow_the_organisers_padding(channel, side):
    net = ConvNet(channel, 10, im_size=(side, side))
    first_conv = net.features[0]
    assert first_conv.padding == ((3, 3) if channel == 1 else (1, 1))
    assert all(m.padding == (1, 1) for m in net.features[1:] if isinstance(m, nn.Conv2d))
    sides = []
    for block in range(3):
        net.features[4 * block + 3].register_forward_hook(lambda m, i, out: sides.append(tuple(out.shape[2:])))
    x = torch.randn(2, channel, side, side)
    conv_out = first_conv(x)
    assert conv_out.shape[-1] == side + 2 * first_conv.padding[0] - 2  # 12 for a digit, 32 for MNIST
    assert net(x).shape == (2, 10)
    assert sides == [(s, s) for s in FEATURE_SIDES[(channel, side)]]
    assert net.classifier.in_features == 128 * FEATURE_SIDES[(channel, side)][-1] ** 2 == net.embed_dim


@pytest.mark.parametrize("channel,side", [(1, 12), (3, 28), (1, 4)])
def test_sizes_the_organisers_net_cannot_take_are_refused(channel, side):
    # One channel at 12: the convolutions give 16 -> 8 -> 4 -> 2 but the classifier expects 12 -> 1;
    # three channels at 28: 3 real vs 4 nominal; 4x4 is too small for three blocks.
    with pytest.raises(DiffdistillError, match=rf"im_size \({side}, {side}\) with {channel} channel"):
        ConvNet(channel, 10, im_size=(side, side))


def test_groupnorm_is_instance_norm():
    torch.manual_seed(0)
    net = ConvNet(3, 10)
    norm = net.features[1]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    h = torch.randn(5, 128, 16, 16) * 3 + 2
    expected = F.instance_norm(h, weight=norm.weight, bias=norm.bias, eps=1e-5)
    torch.testing.assert_close(norm(h), expected, rtol=1e-4, atol=1e-4)
    # Per image, per channel: normalised over its own pixels only (not the batch).
    plain = nn.GroupNorm(128, 128)(h)
    torch.testing.assert_close(plain.mean((2, 3)), torch.zeros(5, 128), atol=1e-4, rtol=0)
    torch.testing.assert_close(plain.var((2, 3), unbiased=False), torch.ones(5, 128), atol=1e-3, rtol=0)


@pytest.mark.parametrize("channel,side,classes,dim", [(3, 32, 100, 2048), (1, 8, 10, 128), (3, 64, 200, 8192)])
def test_embed_and_forward_shapes(channel, side, classes, dim):
    net = ConvNet(channel, classes, im_size=(side, side))
    x = torch.randn(2, channel, side, side)
    assert net.embed_dim == dim
    assert net.embed(x).shape == (2, dim)
    assert net(x).shape == (2, classes)
    torch.testing.assert_close(net(x), net.classifier(net.embed(x)))


def test_eval_and_train_mode_agree():
    # GroupNorm keeps no running statistics, so the mode does not change the output.
    net = ConvNet(1, 10, im_size=(8, 8))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net.train()(x), net.eval()(x))


def test_too_small_image_is_an_error():
    with pytest.raises(DiffdistillError, match="accepts"):
        ConvNet(1, 10, net_depth=4, im_size=(8, 8))
