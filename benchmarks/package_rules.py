"""Which pool images make the best package: each selection rule evaluated with the challenge protocol.

Reads a finished run's folder (``results/<dataset>``: the pool, the real splits and the feature
ConvNet of FD-ConvNet scoring), builds the IPC package with every rule asked for, trains the
challenge ConvNet on each (and on fresh random real IPC subsets, the baseline) for ``--rounds``
seeded rounds and prints accuracy mean +- std per rule. Usage::

    python benchmarks/package_rules.py --run results/digits --rules herding coverage first --ipc 1 10 --rounds 5
    python benchmarks/package_rules.py --run results/digits --ipc 1 10 \
        --pool plain=results/digits/samples/pool.pt modes=results/modes/digits/samples/pool.pt

With several pools (e.g. one sampled with mode guidance) every rule is applied to each. The table
gives, beside each row, random real at the same IPC and the gap in units of random real's std (a
gap within one std is a tie).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

from diffdistill.cli import resolve_device
from diffdistill.data import load_images
from diffdistill.data.normalize import normalize
from diffdistill.evaluation import entry, protocol
from diffdistill.packaging import selection
from diffdistill.scoring import feature_convnet


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run's results/<dataset> folder")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--pool", nargs="+", default=[], metavar="NAME=FILE",
                   help="pools to compare, e.g. modes=results/x/samples/pool.pt (default: the run's own pool)")
    p.add_argument("--rules", nargs="+", default=list(selection.RULES), choices=selection.RULES)
    p.add_argument("--ipc", type=int, nargs="+", default=[10])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the random real IPC baseline")
    p.add_argument("--device", default="auto", help="evaluation device (on CUDA the rounds train stacked)")
    return p.parse_args(argv)


def pools(args, run: Path) -> dict:
    """name -> pool (LabeledImages): --pool NAME=FILE, else the run's own pool as "pool"."""
    named = dict(item.split("=", 1) for item in args.pool) or {"pool": run / "samples" / "pool.pt"}
    return {name: load_images(path) for name, path in named.items()}


def main(argv=None) -> None:
    args = parse(argv)
    run = Path(args.run)
    real, test = load_images(run / "data" / "train.pt"), load_images(run / "data" / "test.pt")
    mean, std = protocol.normalization_stats(args.dataset, real)
    extractor = feature_convnet.load_feature_convnet(run / "scoring" / "feature_convnet.pt", "cpu")
    common = dict(num_classes=test.num_classes, channel=test.images.shape[1], im_size=tuple(test.images.shape[2:]),
                  epochs=args.epochs, rounds=args.rounds, device=resolve_device(args.device), seed=args.seed,
                  log_every=0)
    test_x = normalize(test.images, mean, std)
    evaluate = entry.run_rounds  # stacked rounds on CUDA
    rows = []
    for name, pool in pools(args, run).items():
        classify = functools.lru_cache(maxsize=2)(extractor.classify)  # pool and real outputs once for all rules
        for ipc in args.ipc:
            for rule in args.rules:
                inputs = selection.selection_inputs(classify, pool, real, rule)
                index = selection.select_indices(pool, ipc, rule, args.seed, **inputs)
                package = selection.package(pool, args.dataset, ipc, mean=mean, std=std, rule=rule, seed=args.seed,
                                             index=index)  # (K * ipc, C, H, W)
                began = time.perf_counter()
                result = evaluate(package, pool.labels[index], test_x, test.labels, **common)
                rows.append((ipc, f"{name} {rule}", result, time.perf_counter() - began))
    baselines = {}
    for ipc in [] if args.no_baseline else args.ipc:
        generator = torch.Generator().manual_seed(args.seed)
        picks = [protocol.random_real_indices(real, ipc, generator) for _ in range(args.rounds)]
        began = time.perf_counter()
        baselines[ipc] = evaluate(normalize(real.images, mean, std), real.labels, test_x,
                                                       test.labels, round_indices=picks, **common)
        rows.append((ipc, "random real (fresh subsets)", baselines[ipc], time.perf_counter() - began))
    print_table(args, rows, baselines)


def print_table(args, rows, baselines) -> None:
    """One markdown row per training set; against random real at the same IPC, the gap in its std."""
    print(f"IPC {args.ipc}, {args.epochs} epochs, {args.rounds} rounds, seed {args.seed}")
    print("| IPC | training set | accuracy % | random real % | gap / std of random real | seconds |")
    print("|---:|---|---:|---:|---:|---:|")
    for ipc, name, result, seconds in sorted(rows, key=lambda row: row[0]):
        base = baselines.get(ipc)
        real = f"{100 * base['mean']:.2f} ± {100 * base['std']:.2f}" if base else "-"
        gap = f"{(result['mean'] - base['mean']) / base['std']:+.1f}" if base and base["std"] > 0 else "-"
        accuracy = f"{100 * result['mean']:.2f} ± {100 * result['std']:.2f}"
        print(f"| {ipc} | {name} | {accuracy} | {real} | {gap} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
