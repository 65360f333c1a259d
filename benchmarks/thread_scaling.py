"""Thread scaling of the default's CPU stages: seconds per unit of work at each thread count, the speed-up
over one thread and the parallel efficiency (speed-up / threads). It decides how the workflow gives
out a workstation's cores: a stage that is less than fully efficient on two threads finishes its
share of the work sooner as one of two one-thread jobs side by side.

    python benchmarks/thread_scaling.py --threads 1 2

The workloads are the default's (config/config.yaml) on the real digits split: a fine-tuning step of
uvit_digits at batch 128, one epoch of the challenge ConvNet with DSA on 10 / 100 / 1,257 / 2,000
images (random real IPC 1 and 10, the full real split, a pool-sized set), and one 250-image sampling
batch (DPM-Solver++ 20 steps). Each row is the median of --repeats timings after one untimed warm-up.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from diffdistill.data.digits import load_digits_split
from diffdistill.data.normalize import normalize, stats_for
from diffdistill.diffusion import sampler_settings, sampling, training, uvit
from diffdistill.evaluation import protocol

COLUMNS = ["workload", "unit", "threads", "seconds", "speedup", "efficiency"]
EVALUATOR_SETS = {"evaluator IPC 1": 10, "evaluator IPC 10": 100, "evaluator real split": 1257,
                  "evaluator 2,000 images": 2000}
WORKLOADS = ["fine-tuning step", *EVALUATOR_SETS, "sampling batch"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="fine-tuning steps per timing")
    p.add_argument("--epochs", type=int, default=2, help="evaluator epochs per timing")
    return p.parse_args(argv)


def finetune_workload(real, steps):
    model = uvit.build("uvit_digits", num_classes=real.num_classes, null_class=True)
    config = training.TrainConfig(total_steps=10**6, batch_size=128, lr=2e-3, warmup_steps=100, ema_rate=0.995)
    trainer = training.Trainer(model, real, config, torch.device("cpu"))
    trainer.model.train()
    counter = iter(range(1, 10**6))

    def run():
        for _ in range(steps):
            trainer.step(next(counter))

    return f"{steps} steps", run


def evaluator_workload(real, n, epochs):
    mean, std = stats_for(real.name, real.images)
    index = torch.arange(n) % len(real)  # the 2,000-image set repeats the split, as a pool repeats classes
    x, y = normalize(real.images[index], mean, std), real.labels[index]

    def run():
        protocol.train_convnet(x, y, num_classes=real.num_classes, channel=1, im_size=(8, 8), epochs=epochs - 1,
                                 device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                 init_seed=0, log_every=0)

    return f"{epochs} epochs", run


def sampling_workload(real):
    model = uvit.build("uvit_digits", num_classes=real.num_classes, null_class=True).eval()
    settings = sampler_settings.SamplerSettings(steps=20, order=2, method="multistep", algorithm="dpmsolver++",
                                        skip_type="logSNR", t_end=1e-3, guidance_scale=1.0)
    labels = sampling.balanced_labels(real.num_classes, 250)

    def run():
        sampling.generate(model, labels, settings, device="cpu", seed=0)

    return "250 images", run


def workloads(args, real):
    """(name, unit, run) of each chosen workload, built only when chosen."""
    for name in args.workloads:
        if name == "fine-tuning step":
            yield name, *finetune_workload(real, args.steps)
        elif name == "sampling batch":
            yield name, *sampling_workload(real)
        else:
            yield name, *evaluator_workload(real, EVALUATOR_SETS[name], args.epochs)


def median_seconds(run, repeats):
    run()  # warm-up: allocator, kernel choice
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    real = load_digits_split("train")
    print(f"# thread scaling, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("\t".join(COLUMNS), flush=True)
    before = torch.get_num_threads()
    try:
        for name, unit, run in workloads(args, real):
            base = None
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds = median_seconds(run, args.repeats)
                base = base or seconds * args.threads[0]  # the first count's seconds, as one thread's
                speedup = base / seconds
                print(f"{name}\t{unit}\t{threads}\t{seconds:.4g}\t{speedup:.3f}\t{speedup / threads:.3f}", flush=True)
    finally:
        torch.set_num_threads(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
