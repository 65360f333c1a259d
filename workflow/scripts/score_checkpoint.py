"""Score one checkpoint: EMA-weight samples (fixed count, fixed seed) against the real statistics.

    python workflow/scripts/score_checkpoint.py --checkpoint step_0000500.pt --stats ref.npz \
        --extractor convnet --convnet feature_convnet.pt --num-images 500 --out step_0000500.json

The output JSON (a CheckpointScore record) holds step, score, score_kind ("FID" or "FD-ConvNet"),
num_images, checkpoint and seconds at its top level, plus the settings, timings and environment.
"""

import argparse
import sys

from diffdistill import cli
from diffdistill.diffusion import modes, sampler_settings
from diffdistill.records import CheckpointScore
from diffdistill.scoring import checkpoint_scores, feature_convnet, fid


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--stats", required=True, help="reference statistics from reference_stats.py")
    cli.add_dataclass_flags(p, feature_convnet.ReferenceSettings)
    cli.add_dataclass_flags(p, checkpoint_scores.ScoringSettings)
    p.add_argument("--convnet", help="feature ConvNet file (for --extractor convnet)")
    cli.add_dataclass_flags(p, sampler_settings.SamplerSettings)
    p.add_argument("--real-train", help="real training split, the class modes' source (with --mode-guidance > 0)")
    p.add_argument("--out", required=True, help="score JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="the same seed for every checkpoint: same noise")
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = cli.start("score_checkpoint", sys.argv[1:] if argv is None else argv, args.log, args.device, args.seed)
    settings = cli.dataclass_from_args(sampler_settings.SamplerSettings, args)
    with cli.cleanup_on_failure([args.out]):
        reference = fid.load_stats(args.stats)
        extractor = checkpoint_scores.build_extractor(args.extractor, device, inception_weights=args.inception_weights,
                                            convnet_path=args.convnet)
        result = checkpoint_scores.score_checkpoint(
            args.checkpoint, reference, extractor, num_images=args.num_images, batch_size=args.batch_size,
            sampler=settings, device=device, seed=args.seed, modes=modes.modes_for(settings, args.real_train))
        settings_used = {**vars(args), "sampler": settings.to_dict(), "precision_used": settings.on_device(device).precision}
        CheckpointScore(settings=settings_used, **result,
                        reference_count=reference.count, environment=cli.environment(device),
                        timings_s={k: result[k] for k in ("seconds", "sampling_s", "features_s")}).write(args.out)
    cli.log.info("step %d: %s %.4f", result["step"], result["score_kind"], result["score"])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
