"""Host memory kept for reuse (diffdistill.host_memory) against glibc's default allocator, side by side.

    python benchmarks/host_memory.py --repeats 3 --epochs 30 --steps 300

Each workload runs in a fresh process per mode (glibc's thresholds move as a process allocates and
cannot be put back), the modes interleaved and repeated, so a busy or throttled moment hits both;
the table gives the median seconds, the ratio and the page faults per second of work. Workloads, at
the threads the workflow gives them: the challenge evaluator on the digits (one round; a random
real subset at IPC 1 and 10, and a 2,000-image pool; one thread) and the fine-tuning step of the
default's U-ViT (two threads). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from diffdistill import host_memory
from diffdistill.data.digits import load_digits_split
from diffdistill.diffusion import training, uvit
from diffdistill.evaluation import protocol

# workload -> (threads, the digits set of evaluator_speed.digits_sets; None: the fine-tuning step)
WORKLOADS = {"evaluate ipc 1": (1, dict(digits_ipc=[1], pool=0)),
             "evaluate ipc 10": (1, dict(digits_ipc=[10], pool=0)),
             "evaluate pool 2000": (1, dict(digits_ipc=[], pool=2000)),
             "fine-tune step": (2, None)}
MODES = ("glibc default", "freed memory kept")


def evaluation_work(digits_set: dict, epochs: int):
    """One round of the evaluator on a digits set (loaded here, outside the timing)."""
    from evaluator_speed import digits_sets  # a sibling script: importable when this file runs as one

    _, x, y, test_x, test_y, classes, subsets = next(digits_sets(argparse.Namespace(**digits_set, rounds=1)))
    return lambda: protocol.train_and_evaluate(
        x, y, test_x, test_y, num_classes=classes, channel=1, im_size=(8, 8), epochs=epochs, rounds=1,
        device=torch.device("cpu"), seed=0, round_indices=subsets, log_every=0)


def fine_tune_work(steps: int):
    """``steps`` fine-tuning steps of the default's U-ViT on the digits (built here, outside the timing)."""
    torch.manual_seed(0)
    model = uvit.build("uvit_digits", num_classes=10, null_class=True)
    config = training.TrainConfig(total_steps=steps, batch_size=128, lr=2e-3, warmup_steps=100, ema_rate=0.995,
                                  label_dropout=0.1, hflip=False)
    trainer = training.Trainer(model, load_digits_split("train"), config, torch.device("cpu"))
    trainer.model.train()
    return lambda: [trainer.step(step) for step in range(1, steps + 1)]


def child(args) -> None:
    """One workload in this fresh process; prints {"seconds", "faults"} of its work as JSON."""
    if args.child == MODES[1]:
        host_memory.keep_freed_memory()
    threads, digits_set = WORKLOADS[args.workload]
    torch.set_num_threads(threads)
    work = fine_tune_work(args.steps) if digits_set is None else evaluation_work(digits_set, args.epochs)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    began = time.perf_counter()
    work()
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))


def measure(args, workload: str, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--workload", workload, "--epochs", str(args.epochs),
               "--steps", str(args.steps)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=3, help="runs per workload and mode, interleaved")
    p.add_argument("--epochs", type=int, default=30, help="evaluator epochs per run")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    print(f"# torch {torch.__version__}, {args.repeats} interleaved runs per mode, median; evaluator "
          f"{args.epochs} epochs, fine-tuning {args.steps} steps", flush=True)
    print("| workload | threads | glibc default (s) | freed memory kept (s) | ratio | page faults/s: default | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for workload in args.workloads:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(measure(args, workload, mode))
        seconds = {m: statistics.median(r["seconds"] for r in runs[m]) for m in MODES}
        faults = {m: statistics.median(r["faults"] / r["seconds"] for r in runs[m]) for m in MODES}
        print(f"| {workload} | {WORKLOADS[workload][0]} | {seconds[MODES[0]]:.3f} | {seconds[MODES[1]]:.3f} | "
              f"{seconds[MODES[0]] / seconds[MODES[1]]:.2f} | {faults[MODES[0]]:,.0f} | {faults[MODES[1]]:,.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
