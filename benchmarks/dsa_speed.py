"""DSA speed: one epoch of mode-'S' augmentation, batched against per-sample Python loops.

Three implementations of the same transform get the same drawn parameters (same seeds, so the same
family per batch):

- ``batched``: :func:`diffdistill.evaluation.dsa.apply_params`, no Python loop over samples;
- ``loop``: :func:`diffdistill.evaluation.dsa.apply_params_loop`, every family one image at a time;
- ``ref-style``: like the challenge's original code, the scale/rotate matrices are built in a
  per-sample Python loop (``torch.tensor`` of a list of per-image matrices) and then sampled in one
  batched call; the other families are batched as in the original.

Only augmentation is timed (no network). Usage::

    python benchmarks/dsa_speed.py --n 1000 --size 32 --channels 3 --batch 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from diffdistill import speed
from diffdistill.cli import device_name
from diffdistill.evaluation import dsa


def reference_style(x: torch.Tensor, family: str, drawn: dict, params: dsa.DSAParams) -> torch.Tensor:
    """The original's cost profile: per-sample Python loops only where it builds affine matrices."""
    if family == "scale":
        theta = [[[float(sx), 0.0, 0.0], [0.0, float(sy), 0.0]] for sx, sy in zip(drawn["scale_x"], drawn["scale_y"])]
    elif family == "rotate":
        theta = [[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]] for a in drawn["angle"].tolist()]
    else:
        return dsa.apply_params(x, family, drawn, params)
    return dsa.warp(x, torch.tensor(theta, dtype=torch.float32).to(x.device))  # (N, C, H, W)


METHODS = {"batched": dsa.apply_params, "loop": dsa.apply_params_loop, "ref-style": reference_style}


def epoch_seconds(method, x: torch.Tensor, batch: int, family: str | None, seed: int) -> float:
    """Seconds to augment every batch of x once; draws are made outside the timed region."""
    gen = torch.Generator().manual_seed(seed)
    params = dsa.DSAParams()
    total = 0.0
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]  # (B, C, H, W)
        fam = dsa.draw_family(gen, params) if family is None else family
        drawn = dsa.draw_params(fam, xb.shape, gen, x.device, params)
        speed.synchronize(x.device)
        began = time.perf_counter()
        METHODS[method](xb, fam, drawn, params)
        speed.synchronize(x.device)
        total += time.perf_counter() - began
    return total


def measure(x: torch.Tensor, batch: int, family: str | None, repeats: int) -> dict[str, float]:
    """Median epoch time per method over ``repeats`` epochs, after one warm-up epoch."""
    out = {}
    for method in METHODS:
        epoch_seconds(method, x, batch, family, seed=0)
        out[method] = statistics.median(epoch_seconds(method, x, batch, family, seed=r + 1) for r in range(repeats))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="images per epoch")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when unavailable")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.n} images "
          f"{args.channels}x{args.size}x{args.size}, batch {args.batch}, median of {args.repeats} epochs")
    print(f"{'device':<28} {'family':<8} {'batched s':>10} {'loop s':>10} {'loop/batched':>13} "
          f"{'ref-style s':>12} {'ref/batched':>12}")
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(name)
        x = torch.randn(args.n, args.channels, args.size, args.size, device=device)
        for family in [None, *dsa.FAMILIES]:
            t = measure(x, args.batch, family, args.repeats)
            print(f"{device_name(device)[:20] + ' ' + name:<28} {family or 'S (mix)':<8} {t['batched']:>10.4f} "
                  f"{t['loop']:>10.4f} {t['loop'] / t['batched']:>13.1f} {t['ref-style']:>12.4f} "
                  f"{t['ref-style'] / t['batched']:>12.1f}")


if __name__ == "__main__":
    main()
