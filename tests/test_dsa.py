"""DSA mode 'S': each family's geometry and statistics (docs/reference.md, "DSA augmentation"),
batched == per-sample loop."""

import math
import sys

import numpy as np
import pytest
import torch

from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import dsa
from diffdistill.evaluation.dsa import FAMILIES, DSAParams


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp(n, h, w, axis):
    """Images whose value is the normalised x (axis 'u', columns) or y (axis 'v', rows) in [-1, 1]."""
    u = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(n, 1, h, w)
    v = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
    return (u if axis == "u" else v).clone()


def test_params_are_the_challenge_constants():
    p = DSAParams()
    assert p.families == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert (p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad, p.ratio_cutout) == (0.5, 1.2, 15.0, 0.125, 0.5)
    assert (p.brightness, p.saturation, p.contrast) == (1.0, 2.0, 0.5)
    assert dsa.crop_shift(32, p) == 4 and dsa.crop_shift(64, p) == 8 and dsa.crop_shift(8, p) == 1
    assert dsa.cutout_size(32, p) == 16 and dsa.cutout_size(64, p) == 32 and dsa.cutout_size(8, p) == 4


def test_family_drawn_uniformly_and_reproducibly():
    g = gen(1)
    draws = [dsa.draw_family(g) for _ in range(1200)]
    counts = {f: draws.count(f) for f in FAMILIES}
    assert all(140 < c < 260 for c in counts.values()), counts  # expected 200 each
    g2 = gen(1)
    assert draws[:50] == [dsa.draw_family(g2) for _ in range(50)]


def test_flip_mirrors_about_half_the_samples():
    x = torch.randn(2000, 2, 3, 5)
    out = dsa.augment_family(x, "flip", gen())
    flipped = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 0.45 < flipped.float().mean() < 0.55


def test_crop_is_a_shift_with_zero_fill():
    n, h, w = 400, 32, 32
    x = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w).repeat(n, 2, 1, 1)
    out = dsa.augment_family(x, "crop", gen())
    seen = set()
    for i in range(n):  # recover each sample's shift by brute force over all candidates up to 4 pixels
        matches = []
        for dh in range(-4, 5):
            for dw in range(-4, 5):
                expected = torch.zeros(2, h, w)
                expected[:, max(0, -dh):h - max(0, dh), max(0, -dw):w - max(0, dw)] = \
                    x[i, :, max(0, dh):h - max(0, -dh), max(0, dw):w - max(0, -dw)]
                if torch.equal(out[i], expected):
                    matches.append((dh, dw))
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert {dh for dh, _ in seen} == set(range(-4, 5)) and {dw for _, dw in seen} == set(range(-4, 5))


def test_crop_shift_is_at_most_one_pixel_on_8x8():
    drawn = dsa.draw_params("crop", (500, 1, 8, 8), gen())
    assert set(drawn["shift_h"].tolist()) == {-1, 0, 1} and set(drawn["shift_w"].tolist()) == {-1, 0, 1}


def test_cutout_zeroes_a_half_side_square():
    n, h, w = 500, 32, 32
    x = torch.rand(n, 3, h, w) + 1.0  # strictly positive, so zeros are the cut
    out = dsa.augment_family(x, "cutout", gen())
    zero = out == 0
    assert bool((zero.all(1) | ~zero.any(1)).all())  # the same pixels in every channel
    assert torch.equal(out[~zero], x[~zero])
    full = 0
    for i in range(n):
        rows = zero[i, 0].any(1).nonzero().flatten()
        cols = zero[i, 0].any(0).nonzero().flatten()
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert bool(zero[i, 0, r0:r1, c0:c1].all()) and int(zero[i, 0].sum()) == (r1 - r0) * (c1 - c0)
        assert r1 - r0 <= 16 and c1 - c0 <= 16
        if 0 < r0 and r1 < h and 0 < c0 and c1 < w:  # not clipped by the border: exactly 16 x 16
            assert (r1 - r0, c1 - c0) == (16, 16)
            full += 1
    assert full > 100


@pytest.mark.parametrize("axis", ["u", "v"])
def test_scale_is_a_zoom_about_the_centre_per_axis(axis):
    n, h, w = 300, 17, 17
    drawn = dsa.draw_params("scale", (n, 1, h, w), gen(3))
    factor = drawn["scale_x" if axis == "u" else "scale_y"]
    assert float(factor.min()) >= 1 / 1.2 and float(factor.max()) <= 1.2
    assert float(factor.min()) < 0.85 and float(factor.max()) > 1.17  # the range is used
    out = dsa.apply_params(ramp(n, h, w, axis), "scale", drawn)
    # Output coordinate c reads input coordinate factor * c; bilinear is exact on a ramp.
    src_u = ramp(n, h, w, "u") * drawn["scale_x"].view(-1, 1, 1, 1)
    src_v = ramp(n, h, w, "v") * drawn["scale_y"].view(-1, 1, 1, 1)
    expected = src_u if axis == "u" else src_v
    inside = (src_u.abs() <= 1) & (src_v.abs() <= 1)
    torch.testing.assert_close(out[inside], expected[inside], atol=1e-5, rtol=0)
    outside = (src_u.abs() > 1 + 2 / (w - 1)) | (src_v.abs() > 1 + 2 / (h - 1))
    assert bool(outside.any()) and bool((out[outside] == 0).all())  # zeros beyond the border


def test_rotate_by_at_most_15_degrees():
    n, h, w = 300, 17, 17
    drawn = dsa.draw_params("rotate", (n, 1, h, w), gen(4))
    angle = drawn["angle"]
    assert float(angle.abs().max()) <= math.radians(15) and float(angle.abs().max()) > math.radians(14)
    out = dsa.apply_params(ramp(n, h, w, "u"), "rotate", drawn)
    u, v = ramp(n, h, w, "u"), ramp(n, h, w, "v")
    a = angle.view(-1, 1, 1, 1)
    src_u, src_v = torch.cos(a) * u - torch.sin(a) * v, torch.sin(a) * u + torch.cos(a) * v
    inside = (src_u.abs() <= 1) & (src_v.abs() <= 1)
    torch.testing.assert_close(out[inside], src_u[inside], atol=1e-5, rtol=0)
    assert out.shape == (n, 1, h, w)


def test_color_is_brightness_saturation_contrast():
    n = 1000
    x = torch.randn(n, 3, 4, 4)
    drawn = dsa.draw_params("color", x.shape, gen(5))
    out = dsa.apply_params(x, "color", drawn).numpy()
    b, s, c = (drawn[k].numpy().reshape(-1, 1, 1, 1) for k in ("brightness", "saturation", "contrast"))
    assert b.min() >= 0 and b.max() < 1 and s.min() >= 0 and c.max() < 1
    y = x.numpy() + (b - 0.5)  # brightness + U - 0.5
    y = (y - y.mean(1, keepdims=True)) * (2 * s) + y.mean(1, keepdims=True)  # saturation 2U, channel mean
    y = (y - y.mean((1, 2, 3), keepdims=True)) * (c + 0.5) + y.mean((1, 2, 3), keepdims=True)  # contrast U+0.5
    np.testing.assert_allclose(out, y, atol=1e-5)


def test_color_bounds_on_grey_images():
    # Grey images have no saturation to change: mean moves by U - 0.5, spread scales by U + 0.5.
    x = torch.randn(2000, 1, 6, 6).repeat(1, 3, 1, 1)
    out = dsa.augment_family(x, "color", gen(6))
    shift = out.mean((1, 2, 3)) - x.mean((1, 2, 3))
    scale = out.std((1, 2, 3)) / x.std((1, 2, 3))
    assert float(shift.min()) >= -0.5 - 1e-5 and float(shift.max()) <= 0.5 + 1e-5 and float(shift.std()) > 0.25
    assert float(scale.min()) >= 0.5 - 1e-4 and float(scale.max()) <= 1.5 + 1e-4 and float(scale.std()) > 0.25


@pytest.mark.parametrize("shape", [(40, 3, 32, 32), (30, 1, 8, 8), (20, 2, 7, 9)])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_per_sample_loop(family, shape):
    x = torch.randn(shape)
    batched = dsa.augment(x, gen(7), family=family)
    looped = dsa.augment_loop(x, gen(7), family=family)
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=0)
    assert batched.shape == x.shape


def test_mode_s_batched_equals_loop_and_is_deterministic():
    x = torch.randn(16, 3, 16, 16)
    g1, g2, g3 = gen(8), gen(8), gen(8)
    for _ in range(12):
        a, b, c = dsa.augment(x, g1), dsa.augment_loop(x, g2), dsa.augment(x, g3)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert torch.equal(a, c)
    assert not torch.equal(dsa.augment(x, gen(1), family="rotate"), dsa.augment(x, gen(2), family="rotate"))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow(family):
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    dsa.augment(x, gen(9), family=family).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_the_input_device(family):
    # On the meta device any tensor made elsewhere, or any read of a value, would fail.
    x = torch.empty(8, 3, 16, 16, device="meta")
    assert dsa.augment(x, family=family).device.type == "meta"


def _dsa_lines(fn, n):
    """Python lines executed inside dsa.py while fn runs on a batch of n."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != dsa.__file__:
            return None
        if event == "line":
            count += 1
        return tracer

    x = torch.randn(n, 3, 8, 8)
    sys.settrace(tracer)
    try:
        fn(x)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("family", FAMILIES)
def test_no_python_loop_over_samples(family):
    def batched(x):
        return dsa.augment(x, gen(10), family=family)

    def looped(x):
        return dsa.augment_loop(x, gen(10), family=family)

    assert _dsa_lines(batched, 2) == _dsa_lines(batched, 64)
    assert _dsa_lines(looped, 64) > _dsa_lines(looped, 2)  # the tracer does see a per-sample loop


def test_bad_input():
    with pytest.raises(DiffdistillError, match="family"):
        dsa.augment(torch.zeros(1, 1, 8, 8), family="blur")
    with pytest.raises(DiffdistillError, match="float tensor"):
        dsa.augment(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), family="flip")
    with pytest.raises(DiffdistillError, match="strategy"):
        dsa.augment(torch.zeros(1, 1, 8, 8), params=DSAParams(strategy="color_blur"))


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_batched_equals_loop(family):
    x = torch.randn(32, 3, 32, 32, device="cuda")
    a = dsa.augment(x, gen(11), family=family)
    b = dsa.augment_loop(x, gen(11), family=family)
    assert a.device.type == "cuda"
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
