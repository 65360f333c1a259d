"""Differentiable Siamese Augmentation (DSA), mode 'S', as the challenge trains its ConvNet.

Mode 'S' (docs/reference.md, "DSA augmentation"): per call one family is drawn uniformly from the strategy
``color_crop_cutout_flip_scale_rotate``; its parameters are drawn per sample. The families:

- ``flip``: mirror left-right with probability 0.5;
- ``scale``: affine zoom with factors in [1/1.2, 1.2] drawn per axis (bilinear, zeros outside);
- ``rotate``: affine rotation by an angle in [-15, 15] degrees (bilinear, zeros outside);
- ``crop``: integer shift by up to round(0.125 * side) pixels per axis; pixels shifted in are zero
  (the reference pads one zero pixel and clamps indices into the padded image, which is the same);
- ``cutout``: a square of round(0.5 * side) zeroed around a random centre, clipped at the border;
- ``color``: brightness (+U - 0.5), then saturation (factor 2U around each pixel's channel mean),
  then contrast (factor U + 0.5 around the image mean).

Parameters are drawn once (:func:`draw_params`) and applied in two ways: :func:`apply_params`, batched
on the input's device with no Python loop over samples, and :func:`apply_params_loop`, a deliberately
per-sample reference (slicing and per-image affine matrices, like the original's Python loops) that
computes the same transform; tests compare the two and the benchmark times them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from diffdistill.errors import DiffdistillError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")

Drawn = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DSAParams:
    """The challenge's DSA constants (the reference's ``ParamDiffAug``); ratios as in
    docs/reference.md, "DSA augmentation"."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    @property
    def families(self) -> tuple[str, ...]:
        names = tuple(self.strategy.split("_"))
        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            raise DiffdistillError(f"DSA strategy {self.strategy!r}: unknown families {unknown} (expected {FAMILIES})")
        return names


def crop_shift(size: int, params: DSAParams) -> int:
    """Largest shift in pixels along a side of ``size`` (4 for 32, 8 for 64, 1 for 8)."""
    return int(size * params.ratio_crop_pad + 0.5)


def cutout_size(size: int, params: DSAParams) -> int:
    """Side of the cutout square along a side of ``size`` (16 for 32)."""
    return int(size * params.ratio_cutout + 0.5)


def _uniform(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) U[0, 1) drawn on the generator's device (the default RNG of ``device`` without one)."""
    source = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=source).to(device)


def _randint(low: int, high: int, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) integers in [low, high), drawn like :func:`_uniform`."""
    source = generator.device if generator is not None else device
    return torch.randint(low, high, (n,), generator=generator, device=source).to(device)


def draw_family(generator: torch.Generator | None = None, params: DSAParams = DSAParams()) -> str:
    """One family, uniformly from the strategy (drawn on the CPU RNG unless a generator is given)."""
    families = params.families
    source = generator.device if generator is not None else "cpu"
    return families[int(torch.randint(len(families), (1,), generator=generator, device=source))]


def draw_params(family: str, shape, generator: torch.Generator | None = None, device="cpu",
                params: DSAParams = DSAParams()) -> Drawn:
    """Per-sample parameters of one family for a batch of ``shape`` (N, C, H, W), on ``device``."""
    n, _, h, w = shape
    if family == "color":
        return {k: _uniform(n, generator, device) for k in ("brightness", "saturation", "contrast")}
    if family == "crop":
        sh, sw = crop_shift(h, params), crop_shift(w, params)
        return {"shift_h": _randint(-sh, sh + 1, n, generator, device),
                "shift_w": _randint(-sw, sw + 1, n, generator, device)}
    if family == "cutout":
        ch, cw = cutout_size(h, params), cutout_size(w, params)
        # An even-sided square is centred between pixels, so its centre may also sit on the far edge.
        return {"centre_h": _randint(0, h + 1 - ch % 2, n, generator, device),
                "centre_w": _randint(0, w + 1 - cw % 2, n, generator, device)}
    if family == "flip":
        return {"flip": _uniform(n, generator, device) < params.prob_flip}
    if family == "scale":
        r = params.ratio_scale
        return {k: _uniform(n, generator, device) * (r - 1.0 / r) + 1.0 / r for k in ("scale_x", "scale_y")}
    if family == "rotate":
        max_angle = params.ratio_rotate / 180.0 * math.pi
        return {"angle": (_uniform(n, generator, device) - 0.5) * 2.0 * max_angle}
    raise DiffdistillError(f"DSA family {family!r} is unknown (expected one of {FAMILIES})")


# ---- batched application: every line works on the whole batch ---------------------------------


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample x (N, C, H, W) through affine matrices theta (N, 2, 3), output -> input coordinates."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _matrices(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(N,) entries -> (N, 2, 3) matrices [[a, b, 0], [c, d, 0]]."""
    zero = torch.zeros_like(a)
    return torch.stack([torch.stack([a, b, zero], -1), torch.stack([c, d, zero], -1)], 1)  # (N, 2, 3)


def _scale(x: torch.Tensor, drawn: Drawn, params: DSAParams) -> torch.Tensor:
    zero = torch.zeros_like(drawn["scale_x"])
    return warp(x, _matrices(drawn["scale_x"], zero, zero, drawn["scale_y"]))


def _rotate(x: torch.Tensor, drawn: Drawn, params: DSAParams) -> torch.Tensor:
    cos, sin = torch.cos(drawn["angle"]), torch.sin(drawn["angle"])  # (N,)
    return warp(x, _matrices(cos, -sin, sin, cos))


def _flip(x: torch.Tensor, drawn: Drawn, params: DSAParams) -> torch.Tensor:
    return torch.where(drawn["flip"].view(-1, 1, 1, 1), x.flip(3), x)  # (N, C, H, W)


def _crop(x: torch.Tensor, drawn: Drawn, params: DSAParams) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))  # (N, C, H+2, W+2) with a zero border
    # Output pixel (i, j) reads input (i + shift_h, j + shift_w); anything outside lands on the border.
    rows = (torch.arange(h, device=x.device) + drawn["shift_h"].view(-1, 1) + 1).clamp(0, h + 1)  # (N, H)
    cols = (torch.arange(w, device=x.device) + drawn["shift_w"].view(-1, 1) + 1).clamp(0, w + 1)  # (N, W)
    x = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2))  # (N, C, H, W+2)
    return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))  # (N, C, H, W)


def _cutout(x: torch.Tensor, drawn: Drawn, params: DSAParams) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = cutout_size(h, params), cutout_size(w, params)
    top = (drawn["centre_h"] - ch // 2).view(-1, 1)  # (N, 1)
    left = (drawn["centre_w"] - cw // 2).view(-1, 1)  # (N, 1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= top) & (rows < top + ch)  # (N, H)
    in_cols = (cols >= left) & (cols < left + cw)  # (N, W)
    keep = ~(in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w))  # (N, 1, H, W)
    return x * keep.to(x.dtype)


def _color(x: torch.Tensor, drawn: Drawn, params: DSAParams) -> torch.Tensor:
    x = x + ((drawn["brightness"] - 0.5) * params.brightness).view(-1, 1, 1, 1).to(x.dtype)
    mean = x.mean(dim=1, keepdim=True)  # (N, 1, H, W): each pixel's mean over channels
    x = (x - mean) * (drawn["saturation"] * params.saturation).view(-1, 1, 1, 1).to(x.dtype) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1): each image's mean
    return (x - mean) * (drawn["contrast"] + params.contrast).view(-1, 1, 1, 1).to(x.dtype) + mean


# ---- per-sample reference: one image at a time, Python numbers per image ------------------------


def _scale_one(xi: torch.Tensor, drawn: Drawn, i: int, params: DSAParams) -> torch.Tensor:
    theta = [[float(drawn["scale_x"][i]), 0.0, 0.0], [0.0, float(drawn["scale_y"][i]), 0.0]]
    return warp(xi[None], torch.tensor([theta], device=xi.device))[0]


def _rotate_one(xi: torch.Tensor, drawn: Drawn, i: int, params: DSAParams) -> torch.Tensor:
    a = float(drawn["angle"][i])
    theta = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
    return warp(xi[None], torch.tensor([theta], device=xi.device))[0]


def _flip_one(xi: torch.Tensor, drawn: Drawn, i: int, params: DSAParams) -> torch.Tensor:
    return xi.flip(2) if bool(drawn["flip"][i]) else xi


def _crop_one(xi: torch.Tensor, drawn: Drawn, i: int, params: DSAParams) -> torch.Tensor:
    _, h, w = xi.shape
    dh, dw = int(drawn["shift_h"][i]), int(drawn["shift_w"][i])
    out = torch.zeros_like(xi)
    out[:, max(0, -dh):h - max(0, dh), max(0, -dw):w - max(0, dw)] = \
        xi[:, max(0, dh):h - max(0, -dh), max(0, dw):w - max(0, -dw)]
    return out


def _cutout_one(xi: torch.Tensor, drawn: Drawn, i: int, params: DSAParams) -> torch.Tensor:
    _, h, w = xi.shape
    ch, cw = cutout_size(h, params), cutout_size(w, params)
    top, left = int(drawn["centre_h"][i]) - ch // 2, int(drawn["centre_w"][i]) - cw // 2
    out = xi.clone()
    out[:, max(0, top):max(0, top + ch), max(0, left):max(0, left + cw)] = 0.0
    return out


def _color_one(xi: torch.Tensor, drawn: Drawn, i: int, params: DSAParams) -> torch.Tensor:
    xi = xi + (float(drawn["brightness"][i]) - 0.5) * params.brightness
    mean = xi.mean(dim=0, keepdim=True)  # (1, H, W)
    xi = (xi - mean) * (float(drawn["saturation"][i]) * params.saturation) + mean
    mean = xi.mean()
    return (xi - mean) * (float(drawn["contrast"][i]) + params.contrast) + mean


_BATCHED: dict[str, Callable[[torch.Tensor, Drawn, DSAParams], torch.Tensor]] = {
    "color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate,
}
_ONE: dict[str, Callable[[torch.Tensor, Drawn, int, DSAParams], torch.Tensor]] = {
    "color": _color_one, "crop": _crop_one, "cutout": _cutout_one, "flip": _flip_one,
    "scale": _scale_one, "rotate": _rotate_one,
}


def _check(x: torch.Tensor, family: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise DiffdistillError(f"DSA input must be a float tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if family not in FAMILIES:
        raise DiffdistillError(f"DSA family {family!r} is unknown (expected one of {FAMILIES})")


def apply_params(x: torch.Tensor, family: str, drawn: Drawn, params: DSAParams = DSAParams()) -> torch.Tensor:
    """Apply drawn parameters to the whole batch at once, on x's device."""
    _check(x, family)
    return _BATCHED[family](x, drawn, params)


def apply_params_loop(x: torch.Tensor, family: str, drawn: Drawn, params: DSAParams = DSAParams()) -> torch.Tensor:
    """The same transform, one sample at a time (the slow reference for tests and the benchmark)."""
    _check(x, family)
    if x.shape[0] == 0:
        return x.clone()
    return torch.stack([_ONE[family](x[i], drawn, i, params) for i in range(x.shape[0])])


def augment_family(x: torch.Tensor, family: str, generator: torch.Generator | None = None,
                   params: DSAParams = DSAParams()) -> torch.Tensor:
    """Draw per-sample parameters of ``family`` and apply them batched: (N, C, H, W) -> same shape."""
    _check(x, family)
    return apply_params(x, family, draw_params(family, x.shape, generator, x.device, params), params)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, params: DSAParams = DSAParams(),
            family: str | None = None) -> torch.Tensor:
    """DSA mode 'S': one family (drawn uniformly unless given) with per-sample parameters, batched."""
    family = draw_family(generator, params) if family is None else family
    return augment_family(x, family, generator, params)


def augment_loop(x: torch.Tensor, generator: torch.Generator | None = None, params: DSAParams = DSAParams(),
                 family: str | None = None) -> torch.Tensor:
    """:func:`augment` with the per-sample reference: same draws from the same generator, same result."""
    family = draw_family(generator, params) if family is None else family
    _check(x, family)
    return apply_params_loop(x, family, draw_params(family, x.shape, generator, x.device, params), params)
