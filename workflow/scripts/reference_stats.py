"""Feature statistics of the real training split, computed once per data set and cached.

    python workflow/scripts/reference_stats.py --real-train results/digits/data/train.pt \
        --extractor convnet --convnet-epochs 30 --convnet-out feature_convnet.pt --stats-out ref.npz

``inception``: pytorch-fid's InceptionV3 pool features (scores are FID). ``convnet``: the evaluation
ConvNet is first trained on the real split with the challenge protocol and saved (scores are
FD-ConvNet, never FID).
"""

import argparse
import sys

from diffdistill import cli
from diffdistill.data import load_images
from diffdistill.errors import DiffdistillError
from diffdistill.records import ReferenceStatsRecord
from diffdistill.scoring import checkpoint_scores, feature_convnet, fid


FEATURE_BATCH = 250  # images per feature batch: memory only, the statistics' sums are float64


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-train", required=True, help="prepared real training split (LabeledImages)")
    cli.add_dataclass_flags(p, feature_convnet.ReferenceSettings)
    p.add_argument("--convnet-out", help="the trained feature ConvNet (required for --extractor convnet)")
    p.add_argument("--stats-out", required=True, help="npz with float64 mu and sigma")
    p.add_argument("--meta", help="optional JSON sidecar (default: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cli.dataclass_from_args(feature_convnet.ReferenceSettings, args)  # checks the settings
    device = cli.start("reference_stats", sys.argv[1:] if argv is None else argv, args.log, args.device, args.seed,
                       trains=True)
    if args.extractor == "convnet" and not args.convnet_out:
        raise DiffdistillError("--extractor convnet needs --convnet-out (the feature ConvNet is reused by scoring)")
    with cli.cleanup_on_failure([args.stats_out, args.convnet_out, args.meta]):
        real = load_images(args.real_train)
        with cli.Timer() as train:
            if args.extractor == "convnet":
                contents = feature_convnet.train_feature_convnet(real, epochs=args.convnet_epochs, device=device,
                                                                 seed=args.seed)
                feature_convnet.save_feature_convnet(args.convnet_out, contents)
        extractor = checkpoint_scores.build_extractor(args.extractor, device, inception_weights=args.inception_weights,
                                            convnet_path=args.convnet_out)
        with cli.Timer() as features:
            stats = fid.compute_stats(extractor, real.images, FEATURE_BATCH)
        stats.meta = {"source": str(args.real_train), "dataset": real.name, "split": real.split}
        fid.save_stats(args.stats_out, stats)
        if args.meta:
            ReferenceStatsRecord(settings=vars(args), count=stats.count, dims=int(stats.mu.size),
                                 score_kind=stats.score_kind, environment=cli.environment(device), timings_s={
                                     "convnet_training_s": train.seconds, "features_s": features.seconds},
                                 ).write(args.meta)
    cli.log.info("%s statistics of %d images (%d-d) -> %s", stats.score_kind, stats.count, stats.mu.size,
                 args.stats_out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
