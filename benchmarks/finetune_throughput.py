"""Fine-tuning throughput: images/s of diffdistill.diffusion.training.Trainer steps over precision (fp32 / bf16
autocast), torch.compile, fused AdamW and TF32, with achieved TFLOP/s and the speed-up over the first row.

    python benchmarks/finetune_throughput.py --device cuda --preset uvit_small_2 --batch-size 128 \
        --precisions fp32 bf16 --compile off on --fused off on

The trainer's own step (random draws, noise, loss, backward, AdamW, EMA) on random uint8 images of a
conditional model with a null class; the first --warmup steps (compilation, kernel selection) are
timed apart as warmup_s. A step costs about 3 forward passes of FLOPs (forward plus backward); the
forward is counted with torch.utils.flop_counter. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from diffdistill import atomic, speed
from diffdistill.cli import resolve_device
from diffdistill.data import LabeledImages
from diffdistill.diffusion import training, uvit

COLUMNS = ["preset", "device", "batch", "precision", "compile", "fused", "tf32", "images/s", "ms/step",
           "TFLOP/s", "speedup", "warmup_s", "loss"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(uvit.PRESETS), default="uvit_tiny_test")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--fused", nargs="+", choices=["off", "on"], default=["off"], help="fused AdamW")
    p.add_argument("--tf32", nargs="+", choices=["off", "on"], default=["off"])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-tsv", default=None)
    return p.parse_args(argv)


def toy_data(model: uvit.UViT, num_classes: int, n: int) -> LabeledImages:
    cfg = model.config
    images = torch.randint(0, 256, (n, cfg["in_chans"], cfg["img_size"], cfg["img_size"]), dtype=torch.uint8)
    return LabeledImages(images, torch.arange(n) % num_classes, [str(k) for k in range(num_classes)], "toy", "train")


def time_steps(args, device, precision, comp, fused, tf32) -> tuple[float, float, float]:
    """(seconds per timed step, warm-up seconds, last loss) of a fresh trainer."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = uvit.build(args.preset, num_classes=args.num_classes, null_class=True)
    # U-ViT's CIFAR-10 recipe (lr, EMA, flips) without warmup
    config = training.TrainConfig(total_steps=args.warmup + args.steps, batch_size=args.batch_size, lr=2e-4,
                                  warmup_steps=0, ema_rate=0.9999, hflip=True, bf16=precision == "bf16",
                                  compile=comp == "on", fused_adamw=fused == "on", tf32=tf32 == "on")
    trainer = training.Trainer(model, toy_data(model, args.num_classes, 4 * args.batch_size), config, device)
    trainer.model.train()
    with training.tf32(config.tf32, device):
        began = time.perf_counter()
        for step in range(1, args.warmup + 1):
            trainer.step(step)
        speed.synchronize(device)
        warm = time.perf_counter() - began
        began = time.perf_counter()
        for step in range(args.warmup + 1, args.warmup + args.steps + 1):
            loss = trainer.step(step)
        speed.synchronize(device)
        seconds = (time.perf_counter() - began) / max(args.steps, 1)
    return seconds, warm, float(loss)


def run(args, device):
    """Yield one result row per configuration (the first row is the speed-up's reference)."""
    gflop = speed.forward_flops(uvit.build(args.preset, num_classes=args.num_classes, null_class=True).to(device).eval(),
                          device) / 1e9
    reference = None
    for precision, comp, fused, tf32 in itertools.product(args.precisions, args.compile, args.fused, args.tf32):
        seconds, warm, loss = time_steps(args, device, precision, comp, fused, tf32)
        reference = reference or seconds
        tflops = 3 * gflop * args.batch_size / seconds / 1e3
        yield [args.preset, device.type, args.batch_size, precision, comp, fused, tf32, args.batch_size / seconds,
               1e3 * seconds, tflops, reference / seconds, warm, loss]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    print(f"# fine-tuning steps, torch {torch.__version__}, device {device}")
    print("\t".join(COLUMNS), flush=True)
    rows = []
    for row in run(args, device):
        rows.append(row)
        print("\t".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row), flush=True)
    if args.out_tsv:
        atomic.write_tsv(args.out_tsv, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
