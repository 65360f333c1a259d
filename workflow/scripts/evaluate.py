"""Evaluate a training set with the challenge protocol: ConvNet + DSA, tested on the real test split.

Training sets: a package (``--train-format package``: bare pre-normalised float tensor, labels by
position, ``--ipc``), or a labelled image file (``--train-format images``: the synthetic pool, the
full real train split, or with ``--random-ipc K`` a fresh random real subset of it per round). The
JSON written to ``--out`` is the result (an EvaluationResult record): mean, std, accuracies
(fractions), settings, timings.
"""

import argparse
import sys

import torch

from diffdistill import cli
from diffdistill.data import load_images
from diffdistill.data.normalize import normalize
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import entry, protocol
from diffdistill.evaluation.state import EvaluationState
from diffdistill.records import BudgetPrefix, EvaluationResult
from diffdistill.resume import JobKey
from diffdistill.settings import resume_keys


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="package tensor or labelled image file")
    p.add_argument("--train-format", required=True, choices=["images", "package"])
    p.add_argument("--ipc", type=int, help="images per class of a package (labels by position)")
    p.add_argument("--random-ipc", type=int, help="train each round on its own K random images per class of --train")
    p.add_argument("--budget-fraction", type=float, help="train only on the images of --train made within this "
                   "fraction of the sampling budget (a budget prefix; needs --pool-meta)")
    p.add_argument("--pool-meta", help="sampling summary (pool.json) of --train, for --budget-fraction")
    p.add_argument("--test", required=True, help="real test split (labelled image file)")
    p.add_argument("--dataset", required=True, help="data set name (cifar100/tinyimagenet use fixed stats)")
    p.add_argument("--real-train", help="real train split, for the normalisation stats of other data sets")
    p.add_argument("--epochs", type=int, required=True, help="the challenge uses 1000")
    p.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True,
                   help="DSA augmentation while training (the protocol's); --no-dsa for the field's ARS score")
    cli.add_dataclass_flags(p, entry.EvaluationSettings)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--resume-dir", help="keep resume state here (finished rounds, every --checkpoint-every "
                   "epochs of the running one); removed once the result is written")
    p.add_argument("--checkpoint-every", type=int, default=50, help="epochs between resume checkpoints")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = cli.start("evaluate.py", sys.argv[1:] if argv is None else argv, args.log, args.device, args.seed,
                       trains=True)
    with cli.cleanup_on_failure([args.out]):
        with cli.Timer() as loading:
            test = load_images(args.test)
            real = load_images(args.real_train) if args.real_train else None
            mean, std = protocol.normalization_stats(args.dataset, real)
            x, y, what, round_indices = protocol.load_training_set(
                args.train, args.train_format, test, mean, std, ipc=args.ipc, random_ipc=args.random_ipc,
                rounds=args.rounds, seed=args.seed)
            prefix = None
            if args.budget_fraction is not None:
                x, y, what, prefix = budget_prefix(args, x, y)
        _, channel, height, width = test.images.shape
        settings = {**vars(args), "train_set": what, "mean_std": [mean, std], "num_classes": test.num_classes}
        if len(x) == 0:  # no batch finished within the prefix's time: nothing to train on
            cli.log.warning("%s: no images, no accuracy", what)
            EvaluationResult(settings=settings, mean=None, std=None, accuracies=[], epochs=args.epochs,
                             rounds=args.rounds, train_size=0, budget_prefix=prefix,
                             environment=cli.environment(device)).write(args.out)
            return 0
        state = resume_state(args, x, y, test) if args.resume_dir else None
        result = entry.run_rounds(
            x, y, normalize(test.images, mean, std), test.labels, num_classes=test.num_classes, channel=channel,
            im_size=(height, width), epochs=args.epochs, rounds=args.rounds, device=device, seed=args.seed,
            round_indices=round_indices, batch_size=args.batch_size, dsa=args.dsa, log_every=args.log_every,
            state=state)
        cli.log.info("%s: test accuracy %.4f +- %.4f over %d rounds", what, result["mean"], result["std"], args.rounds)
        timings = {"load": loading.seconds, "train_and_test": result.pop("seconds"),
                   "per_round": result.pop("seconds_per_round")}
        EvaluationResult(settings=settings, **result, budget_prefix=prefix, timings_s=timings,
                         environment=cli.environment(device)).write(args.out)
    if state is not None:
        state.clear()
    return 0


def budget_prefix(args, x, y):
    """The images of the pool made within --budget-fraction of the budget, and what they are."""
    if not args.pool_meta:
        raise DiffdistillError("--budget-fraction needs --pool-meta: the sampling summary (pool.json) of --train")
    summary = SamplingSummary.read(args.pool_meta)
    if args.train_format != "images" or args.random_ipc is not None or summary.images != len(x):
        raise DiffdistillError(f"--budget-fraction: {args.pool_meta} counts {summary.images} images, {args.train} "
                               f"holds {len(x)} (expected the pool and its summary, --train-format images)")
    seconds, positions = summary.budget_prefix(args.budget_fraction)
    index = torch.tensor(positions, dtype=torch.long)  # (n,)
    return (x[index], y[index], f"images made within {seconds:.3g} s: {len(positions)}",
            BudgetPrefix(fraction=args.budget_fraction, seconds=seconds, images=len(positions)))


def resume_state(args, x, y, test) -> EvaluationState:
    """Resume state keyed by what decides the result: the training settings and the data's contents."""
    keys = ("train_format", "ipc", "random_ipc", "dataset", "epochs", "dsa", *resume_keys(entry.EvaluationSettings),
            "seed")
    settings = {key: getattr(args, key) for key in keys}
    key = JobKey.of(settings, x, y, test.images, test.labels)
    return EvaluationState(args.resume_dir, key, every=args.checkpoint_every)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
