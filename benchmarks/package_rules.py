"""Which pool images make the best package: each selection rule evaluated with the challenge protocol.

Reads a finished run's folder (``results/<dataset>``: the pool, the real splits and the feature
ConvNet of FD-ConvNet scoring), builds the IPC package with every rule asked for, trains the
challenge ConvNet on each (and on fresh random real IPC subsets, the baseline) for ``--rounds``
seeded rounds and prints accuracy mean +- std per rule. Usage::

    python benchmarks/package_rules.py --run results/digits --rules herding coverage first --rounds 5

Rules "augmented" (generated images and their DSA copies) and "difficulty" (picks matching the real class's
difficulty histogram) are among them (docs/reference.md, "Package rules").
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

from diffdistill import evaluation, feature_convnet, submission
from diffdistill.data import load_images
from diffdistill.normalize import normalize


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run's results/<dataset> folder")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--pool", help="pool file (default: <run>/samples/pool.pt)")
    p.add_argument("--rules", nargs="+", default=list(submission.RULES), choices=submission.RULES)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the random real IPC baseline")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    run = Path(args.run)
    pool = load_images(args.pool or run / "samples" / "pool.pt")
    real, test = load_images(run / "data" / "train.pt"), load_images(run / "data" / "test.pt")
    mean, std = evaluation.normalization_stats(args.dataset, real)
    extractor = feature_convnet.load_feature_convnet(run / "scoring" / "feature_convnet.pt", "cpu")
    classify = functools.lru_cache(maxsize=2)(extractor.classify)  # pool and real outputs once for all rules
    common = dict(num_classes=test.num_classes, channel=test.images.shape[1], im_size=tuple(test.images.shape[2:]),
                  epochs=args.epochs, rounds=args.rounds, device="cpu", seed=args.seed, log_every=0)
    test_x = normalize(test.images, mean, std)
    rows = []
    for rule in args.rules:
        inputs = submission.selection_inputs(classify, pool, real, rule)
        index = submission.select_indices(pool, args.ipc, rule, args.seed, **inputs)
        package = submission.package(pool, args.dataset, args.ipc, mean=mean, std=std, rule=rule, seed=args.seed,
                                     index=index)  # (K * ipc, C, H, W), the DSA copies of rule "augmented" made
        began = time.perf_counter()
        result = evaluation.train_and_evaluate(package, pool.labels[index], test_x, test.labels, **common)
        rows.append((f"synthetic {rule}", result, time.perf_counter() - began))
    if not args.no_baseline:
        generator = torch.Generator().manual_seed(args.seed)
        picks = [evaluation.random_real_indices(real, args.ipc, generator) for _ in range(args.rounds)]
        began = time.perf_counter()
        result = evaluation.train_and_evaluate(normalize(real.images, mean, std), real.labels, test_x, test.labels,
                                               round_indices=picks, **common)
        rows.append(("random real (fresh subsets)", result, time.perf_counter() - began))
    print(f"pool {len(pool)} images, IPC {args.ipc}, {args.epochs} epochs, {args.rounds} rounds, seed {args.seed}")
    print(f"{'training set':32s} {'accuracy %':>16s} {'seconds':>8s}")
    for name, result, seconds in rows:
        print(f"{name:32s} {100 * result['mean']:8.2f} ± {100 * result['std']:5.2f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
