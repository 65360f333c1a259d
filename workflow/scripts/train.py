"""Train stage: (fine-)tune a U-ViT, resumably, with a checkpoint at each configured step.

    [torchrun --nproc_per_node N --] workflow/scripts/train.py --data train.pt --preset uvit_digits \\
        [--init pretrained.pt] --total-steps 2000 --checkpoint-steps 500,1000 --checkpoint-dir ckpt

A rerun continues from the newest complete checkpoint. --batch-size is the global batch. The "--"
stops torchrun from reading --log as an abbreviation of its own options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffdistill import atomic, cli
from diffdistill.cli import run_main
from diffdistill.data import load_images
from diffdistill.diffusion import checkpoint, training, uvit
from diffdistill.errors import DiffdistillError
from diffdistill.records import LossPoint, TrainingJob, TrainingRun


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared image file (LabeledImages)")
    p.add_argument("--preset", required=True, choices=sorted(uvit.PRESETS))
    p.add_argument("--model-overrides", type=json.loads, default={}, help="JSON of U-ViT constructor keywords")
    p.add_argument("--num-classes", type=int, default=None, help="0 = unconditional; default: classes in --data")
    p.add_argument("--init", default=None, help="pretrained weights (public U-ViT file or our checkpoint)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint-dir", help="checkpoints go to DIR/step_{step:07d}.pt")
    where.add_argument("--checkpoints", nargs="+", help="explicit files, one per step in ascending order")
    cli.add_dataclass_flags(p, training.TrainConfig)  # --total-steps, --lr, --betas, ... --seed
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    p.add_argument("--resume-dir", help="keep the resumable checkpoints here and copy them to the outputs at the "
                   "end (Snakemake deletes a job's declared outputs before a rerun)")
    for flag, default in (("--device", "auto"), ("--sidecar", None), ("--log", None)):
        p.add_argument(flag, default=default)
    return p.parse_args(argv)


def checkpoint_paths(args, config: training.TrainConfig) -> dict:
    if args.checkpoint_dir:
        return training.checkpoint_paths_in(args.checkpoint_dir, config.checkpoint_steps)
    if len(args.checkpoints) != len(config.checkpoint_steps):  # steps ascending, total_steps included
        raise DiffdistillError(f"--checkpoints: {len(args.checkpoints)} files for steps {config.checkpoint_steps}")
    return dict(zip(config.checkpoint_steps, args.checkpoints))


def training_record(args, config, model, report, summary: dict, device) -> TrainingRun:
    """train.json: the settings, the run's figures, the checkpoints, the loss history and the timing."""
    settings = TrainingJob(data=args.data, preset=args.preset, model_overrides=args.model_overrides,
                           num_classes=model.num_classes, init=args.init, device=args.device, resume=args.resume,
                           training=config.to_dict(), model=model.config,
                           init_summary=report.summary() if report else None)
    run = {k: v for k, v in summary.items() if k not in ("train_seconds", "checkpoints", "loss_history")}
    return TrainingRun(settings=settings, **run, loss_history=[LossPoint(**p) for p in summary["loss_history"]],
                       checkpoints={str(step): path for step, path in summary["checkpoints"].items()},
                       timings_s={"train": summary["train_seconds"]}, environment=cli.environment(device))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    device = cli.start("train", argv, log_file=args.log if rank == 0 else None, device=args.device, seed=args.seed,
                       trains=True)
    config = cli.dataclass_from_args(training.TrainConfig, args)
    paths = checkpoint_paths(args, config)
    state = training.checkpoint_paths_in(args.resume_dir, config.checkpoint_steps) if args.resume_dir else paths
    data = load_images(args.data)
    num_classes = data.num_classes if args.num_classes is None else args.num_classes
    # On failure remove only what a rerun cannot resume from: with --resume-dir every declared output
    # is a copy; without it the intermediate checkpoints are the resume state and stay.
    declared = list(paths.values()) if args.resume_dir else [paths[config.total_steps]]
    outputs = [*declared, args.sidecar] if rank == 0 else []
    with cli.cleanup_on_failure(outputs), training.distributed_context(device) as ctx:
        model = uvit.build(args.preset, **{**args.model_overrides, "num_classes": num_classes})
        report = checkpoint.load_pretrained(model, args.init) if args.init else None
        summary = training.train(model, data, config, state, device=ctx.device, resume=args.resume,
                                 init_report=report)
        if ctx.is_main and args.resume_dir:  # the finished checkpoints become the declared outputs
            for step, path in paths.items():
                atomic.publish(state[step], path)
        if ctx.is_main and args.sidecar:
            training_record(args, config, model, report, summary, ctx.device).write(args.sidecar)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
