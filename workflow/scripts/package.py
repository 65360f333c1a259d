"""Make the challenge submission file from a sampled pool: IPC per class, class-major, normalised.

Writes ``<out-dir>/<dataset>.pt`` (a bare float tensor, validated against the official contract),
a JSON sidecar and, with ``--pool-out``, the whole pool normalised the same way (for full-pool evaluation).
"""

import argparse
import sys
from pathlib import Path

from diffdistill import atomic, cli
from diffdistill.data import load_images
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import protocol
from diffdistill.packaging import selection, submission
from diffdistill.records import PackageJob, PackageRecord, ValidatorCheck
from diffdistill.scoring import feature_convnet


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pool", required=True, help="LabeledImages file of sampled images")
    p.add_argument("--dataset", required=True)
    p.add_argument("--ipc", type=int, required=True)
    cli.add_dataclass_flags(p, selection.PackageSettings)
    p.add_argument("--feature-convnet", help="real-data ConvNet of reference_stats (for --rule herding/coverage)")
    p.add_argument("--real-train", help="real training split (statistics of non-challenge data sets)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--pool-out", help="whole pool, normalised, as a dict (the submission's job writes it)")
    p.add_argument("--meta", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log")
    return p.parse_args(argv)


def feature_inputs(args, pool, real) -> dict:
    """What rules herding and coverage need from the real-data feature ConvNet (checked flags first)."""
    if args.rule not in selection.FEATURE_RULES:
        return {}
    if not args.feature_convnet:
        raise DiffdistillError(f"--rule {args.rule} needs --feature-convnet (written by reference_stats)")
    if real is None:
        raise DiffdistillError(f"--rule {args.rule} needs --real-train (its real features are the targets)")
    convnet = feature_convnet.load_feature_convnet(args.feature_convnet, "cpu")
    inputs = selection.selection_inputs(convnet.classify, pool, real, args.rule)
    cli.log.info("feature ConvNet puts %.1f%% of the pool in its sampled class",
                 100 * float((inputs["predictions"] == pool.labels).float().mean()))
    return inputs


def main(argv=None) -> int:
    args = parse(argv)
    cli.start("package", sys.argv[1:] if argv is None else argv, args.log, "cpu", args.seed)
    out = Path(args.out_dir) / submission.submission_filename(args.dataset)
    with cli.cleanup_on_failure([out, args.pool_out, args.meta]):
        pool = load_images(args.pool)
        real = load_images(args.real_train) if args.real_train else None
        mean, std = protocol.normalization_stats(args.dataset, real)
        index = selection.select_indices(pool, args.ipc, args.rule, args.seed, **feature_inputs(args, pool, real))
        tensor = selection.package(pool, args.dataset, args.ipc, mean=mean, std=std, rule=args.rule, seed=args.seed,
                                    index=index)
        contract = dict(num_classes=pool.num_classes, ipc=args.ipc, image_shape=tuple(pool.images.shape[1:]),
                        mean=mean, std=std)
        submission.validate(tensor, args.dataset, **contract)  # fail before anything is written
        checks = submission.save_package(tensor, out, args.dataset, **contract)
        if args.pool_out:
            atomic.torch_save(selection.normalized_pool(pool, mean, std), args.pool_out)
        PackageRecord(
            settings=PackageJob(dataset=args.dataset, ipc=args.ipc, rule=args.rule, seed=args.seed, pool=args.pool,
                                real_train=args.real_train),
            package=str(out), shape=list(tensor.shape), mean=list(mean), std=list(std), classes=pool.classes,
            pool_counts=pool.counts(), pool_images=len(pool), chosen_indices=index.tolist(),
            checks=[ValidatorCheck(**check) for check in checks],
            environment=cli.environment()).write(args.meta)
    cli.log.info("wrote %s %s (pool of %d images)", out, list(tensor.shape), len(pool))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
