"""Sampler throughput: images/s of U-ViT + DPM-Solver over presets, batch sizes, precisions, compile,
step counts and guidance, with achieved TFLOP/s against a roofline.

    python benchmarks/sampler_throughput.py --presets uvit_tiny_test uvit_digits --batch-sizes 64 \
        --precisions fp32 bf16 --steps 10 --guidance 1 2
    python benchmarks/sampler_throughput.py --device cuda --presets uvit_small_2 uvit_mid_4 \
        --batch-sizes 256 --precisions bf16 --compile off on --steps 50 --sampler ss3

Random weights (speed does not depend on them), a conditional model with a null class, eval mode.
Each timed call is the package's own batch: diffdistill.diffusion.sampling.generate (noise, DPM-Solver, uint8
images on the host), with compile "on" through diffdistill.speed.FixedBatchNetwork in --compile-mode
(the sampler.compile setting; "reduce-overhead" adds CUDA graphs). Guidance w > 1 runs the network
at batch 2B (images/s counts B). ms/forward is the wall time of one sampler call over its network
evaluations (solver arithmetic included). Precision tf32 is fp32 with TF32 matmuls (CUDA).
FLOPs per forward are counted once per preset with torch.utils.flop_counter (attention through the
math backend so that it is counted on every device); docs/reference.md, "Throughput" gives 24.5 GFLOP for the
conditional S/2 and 70.5 GFLOP for M/4. The roofline is --peak-tflops; by default 790 (bf16) / 67
(fp32) TFLOP/s on CUDA (H100, docs/reference.md, "Throughput") and a quick matmul measurement on CPU.
first_call_s is the warm-up call (with compile "on": compilation, the sampler's compile_s, plus one batch).
fp32 runs with TF32 off, so that the fp32 roofline holds. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from diffdistill import atomic, speed
from diffdistill.cli import resolve_device
from diffdistill.diffusion import sampler_settings, sampling, uvit

# name -> dpm_solver.sample keyword arguments; ms2 for strong guidance (docs/reference.md, "DPM-Solver")
SAMPLERS = {
    "ms2": dict(method="multistep", algorithm="dpmsolver++", order=2),
    "ss3": dict(method="singlestep", algorithm="dpmsolver", order=3),  # U-ViT's own 50-NFE sampler
}
# H100/H200, docs/reference.md, "Throughput"; tf32: the datasheet's dense TF32 rate
CUDA_PEAK_TFLOPS = {"bf16": 790.0, "fp32": 67.0, "tf32": 495.0}
COLUMNS = ["preset", "device", "batch", "precision", "compile", "steps", "guidance", "images/s",
           "ms/forward", "GFLOP/img-fwd", "TFLOP/s", "%roofline", "first_call_s"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = list(uvit.PRESETS)
    p.add_argument("--presets", nargs="+", choices=presets, default=["uvit_tiny_test", "uvit_digits"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(sampler_settings.PRECISIONS))
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--compile-mode", default="default", choices=speed.COMPILE_MODES[1:],
                   help="torch.compile mode for compile 'on' (reduce-overhead: CUDA graphs)")
    p.add_argument("--steps", nargs="+", type=int, default=[10])
    p.add_argument("--guidance", nargs="+", type=float, default=[1.0], help="w; w > 1 doubles the batch")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ms2")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed sampler calls after one warm-up call")
    p.add_argument("--peak-tflops", type=float, default=None, help="roofline; default see module doc")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-tsv", default=None)
    return p.parse_args(argv)


def cpu_peak_tflops(precision: str, n: int = 1024, seconds: float = 0.5) -> float:
    """Dense matmul rate of this CPU in the run's precision: the CPU roofline."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - start) / 1e12


def settings_for(args, precision: str, steps: int, w: float, compile_mode: str) -> sampler_settings.SamplerSettings:
    t_end = 1e-4 if steps > 15 else 1e-3  # docs/reference.md, "DPM-Solver"
    return sampler_settings.SamplerSettings(steps=steps, t_end=t_end, guidance_scale=w, precision=precision,
                                    compile=compile_mode, **SAMPLERS[args.sampler])


def time_sampler(net, args, device, batch, settings) -> tuple[float, float]:
    """(median seconds of one sampler call after a warm-up call, seconds of the warm-up call)."""
    labels = torch.randint(0, args.num_classes, (batch,))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    times = []
    for _ in range(1 + args.repeats):
        speed.synchronize(device)
        start = time.perf_counter()
        sampling.generate(net, labels, settings, device=device, generator=generator)  # ends on the host
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def peak_for(args, device, precision, cache) -> float:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type == "cuda":
        return CUDA_PEAK_TFLOPS[precision]
    if precision not in cache:
        cache[precision] = cpu_peak_tflops(precision)
    return cache[precision]


def run(args, device):
    """Yield one result row per configuration."""
    peaks = {}
    for preset in args.presets:
        model = uvit.build(preset, num_classes=args.num_classes, null_class=True).to(device).eval()
        gflop = speed.forward_flops(model, device) / 1e9
        for batch, precision, comp, steps, w in itertools.product(
            args.batch_sizes, args.precisions, args.compile, args.steps, args.guidance
        ):
            mode = args.compile_mode if comp == "on" else "none"
            torch._dynamo.reset()  # a fresh compile per fixed batch shape, within dynamo's recompile limit
            net = speed.sampling_network(model, mode)
            seconds, first = time_sampler(net, args, device, batch, settings_for(args, precision, steps, w, mode))
            forward_batch = batch * (2 if w not in (0.0, 1.0) else 1)
            tflops = gflop * forward_batch * steps / seconds / 1e3
            peak = peak_for(args, device, precision, peaks)
            yield [preset, device.type, batch, precision, comp, steps, w, batch / seconds,
                   1e3 * seconds / steps, gflop, tflops, 100 * tflops / peak, first]


def format_row(row) -> str:
    cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
    return "\t".join(cells)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the 67 TFLOP/s roofline
        torch.backends.cudnn.allow_tf32 = False
    print(f"# sampler {args.sampler} {SAMPLERS[args.sampler]}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}")
    print("\t".join(COLUMNS), flush=True)
    rows = []
    with torch.inference_mode():
        for row in run(args, device):
            rows.append(row)
            print(format_row(row), flush=True)
    if args.out_tsv:
        atomic.write_tsv(args.out_tsv, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
