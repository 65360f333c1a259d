"""Prepare stage: read one data set's train and test splits into prepared image files.

    python workflow/scripts/prepare_data.py --dataset cifar100 --root data/raw \\
        --train-out results/data/train.pt --test-out results/data/test.pt --sidecar results/data/prepare.json

``digits`` (the default) is embedded in scikit-learn and needs no ``--root``. ``--download`` fetches
CIFAR-100 (torchvision) or Tiny-ImageNet (official zip) into ``--root`` first; it needs network.
"""

from __future__ import annotations

import argparse
import sys

from diffdistill import cli, data, datasets
from diffdistill.cli import run_main
from diffdistill.errors import DiffdistillError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=datasets.DATASETS, required=True)
    p.add_argument("--root", default=None, help="folder holding (or to receive) the raw data set")
    p.add_argument("--download", action="store_true", help="fetch the data set into --root if missing")
    p.add_argument("--train-out", required=True)
    p.add_argument("--test-out", required=True)
    p.add_argument("--sidecar", required=True)
    p.add_argument("--log", default=None)
    return p.parse_args(argv)


def describe(split: data.LabeledImages) -> dict:
    """What the sidecar records about one prepared split."""
    return {"count": len(split), "shape": list(split.images.shape), "num_classes": split.num_classes,
            "counts_per_class": split.counts(), "source": split.extra.get("source", "")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = cli.start("prepare_data", argv, log_file=args.log, device="cpu")
    if args.dataset != "digits" and args.root is None:
        raise DiffdistillError(f"--root is required for --dataset {args.dataset}")
    outputs = [args.train_out, args.test_out, args.sidecar]
    timings, splits = {}, {}
    with cli.cleanup_on_failure(outputs):
        for name, out in (("train", args.train_out), ("test", args.test_out)):
            with cli.Timer() as t:
                # Download at most once: the first split fetches, the second finds the files.
                splits[name] = datasets.prepare_dataset(args.dataset, args.root, name, download=args.download)
                data.save_images(splits[name], out)
            timings[name] = round(t.seconds, 3)
        timings["total"] = round(sum(timings.values()), 3)
        settings = {"dataset": args.dataset, "root": args.root, "download": args.download,
                    "train_out": args.train_out, "test_out": args.test_out}
        cli.write_sidecar(args.sidecar, settings=settings, timings=timings, device=device,
                          classes=splits["train"].classes,
                          splits={name: describe(split) for name, split in splits.items()})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
