"""Sample as many class-balanced labelled images as fit a wall-clock budget (Track 2, 10 minutes).

The budget clock starts at the first sampling batch; model loading is timed and reported apart.
"""

import argparse
import sys

from diffdistill import cli
from diffdistill.data import LabeledImages, save_images
from diffdistill.diffusion import checkpoint, modes, sampler_settings, sampling
from diffdistill.diffusion.sampling_summary import SamplingJob, SamplingSummary
from diffdistill.errors import DiffdistillError
from diffdistill.records import BestCheckpoint


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file to sample from")
    source.add_argument("--best", help="best.json of select_checkpoint (its 'checkpoint' is used)")
    p.add_argument("--out", required=True, help="LabeledImages file of the samples")
    p.add_argument("--meta", required=True, help="JSON sidecar")
    cli.add_dataclass_flags(p, sampling.SamplingSettings)
    cli.add_dataclass_flags(p, sampler_settings.SamplerSettings)
    p.add_argument("--real-train", help="real training split, the class modes' source (with --mode-guidance > 0)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", type=int, default=0, help="this job's shard index (seed + shard, classes shifted)")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--log")
    return p.parse_args(argv)


def checkpoint_path(args) -> str:
    """--checkpoint, or the checkpoint named by select_checkpoint's best.json."""
    if args.checkpoint:
        return args.checkpoint
    return BestCheckpoint.read(args.best).checkpoint


def main(argv=None) -> int:
    args = parse(argv)
    device = cli.start("sample_budget", sys.argv[1:] if argv is None else argv, args.log, args.device, args.seed)
    cli.dataclass_from_args(sampling.SamplingSettings, args)  # checks the budget, batch and cap
    settings = cli.dataclass_from_args(sampler_settings.SamplerSettings, args)
    with cli.cleanup_on_failure([args.out, args.meta]):
        args.checkpoint = checkpoint_path(args)
        with cli.Timer() as load:
            ckpt = checkpoint.load_checkpoint(args.checkpoint, mmap=True)  # only the weights used are read
            model = checkpoint.model_from_checkpoint(ckpt, weights=args.weights, device=device).eval()
        data_config = ckpt["config"].get("data") or {}
        classes = list(data_config.get("classes") or [str(k) for k in range(model.num_classes)])
        if model.num_classes < 1 or len(classes) != model.num_classes:
            raise DiffdistillError(f"{args.checkpoint}: expected a class-conditional model with "
                                   f"config['data']['classes'] of its {model.num_classes} classes")
        result = sampling.sample_budgeted(
            model, model.num_classes, settings, budget_s=args.budget_s, batch_size=args.batch_size,
            device=device, seed=args.seed + args.shard, max_images=args.max_images,
            label_offset=sampling.shard_label_offset(args.shard, args.num_shards, model.num_classes),
            modes=modes.modes_for(settings, args.real_train))
        save_images(LabeledImages(result.images, result.labels, classes, str(data_config.get("name", "")),
                                  "synthetic"), args.out)
        shared = SamplingJob(sampler=settings, precision_used=settings.on_device(device).precision,
                             budget_s=args.budget_s, batch_size=args.batch_size, max_images=args.max_images,
                             weights=args.weights, num_shards=args.num_shards, checkpoint=args.checkpoint)
        run = result.shard_run(shard=args.shard, seed=args.seed + args.shard, load_s=load.seconds,
                               device_name=cli.device_name(device))
        SamplingSummary(shared, classes, [run], environment=cli.environment(device)).write(args.meta)
    cli.log.info("%d images in %.1f s (%.1f images/s), model load %.1f s",
                 len(result), result.sampling_s, result.images_per_s, load.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
