"""Write a package's datasheet: datasheet.json (a Datasheet record), datasheet.md (a card for people)
and a picture grid (one row per class), from the records of the stages that made and evaluated it.

    python workflow/scripts/datasheet.py --package results/digits/package/digits.pt \
        --meta results/digits/package/package.json --best results/digits/scoring/best.json \
        --pool-meta results/digits/samples/pool.json --prepared results/digits/data/prepare.json \
        --training results/digits/checkpoints/train.json --seed 0 \
        --synthetic results/digits/evaluation/synthetic_ipc10.json \
        --random-real results/digits/evaluation/real_ipc10.json \
        --full-real results/digits/evaluation/real_full.json \
        --out results/digits/package/datasheet.json --card results/digits/package/datasheet.md \
        --grid results/digits/package/datasheet.png

With --synthetic-noaug and --random-real-noaug (evaluation.ars) it holds the ARS score too.
"""

import argparse
import sys
from pathlib import Path

from diffdistill import atomic, cli, report
from diffdistill.data import LabeledImages
from diffdistill.data.normalize import denormalize
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.packaging import datasheet, submission
from diffdistill.records import BestCheckpoint, EvaluationResult, PackageRecord, PreparedData, TrainingRun


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--package", "--meta", "--best", "--pool-meta", "--prepared", "--training", "--synthetic",
                 "--random-real", "--full-real", "--out", "--card", "--grid"):
        p.add_argument(flag, required=True)
    p.add_argument("--synthetic-noaug")
    p.add_argument("--random-real-noaug")
    p.add_argument("--seed", type=int, required=True, help="the pipeline's seed (config key seed)")
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cli.start("datasheet", sys.argv[1:] if argv is None else argv, args.log, "cpu")
    with cli.cleanup_on_failure([args.out, args.card, args.grid]):
        package = PackageRecord.read(args.meta)
        ipc = package.settings.ipc
        x, labels = submission.load_package(args.package, len(package.classes), ipc, package.shape[1:])
        images = LabeledImages(denormalize(x, package.mean, package.std), labels, package.classes)
        with atomic.atomic_path(args.grid) as tmp:
            report.sample_grid(images, per_class=min(ipc, 10), pixel_scale=report.grid_scale(x.shape[-1])).save(
                tmp, format="PNG")
        sheet = build(args, package, ipc)
        sheet.write(args.out)
        atomic.write_text(args.card, datasheet.render_card(sheet))
    cli.log.info("datasheet of %s: %s", args.package, args.card)
    return 0


def build(args, package: PackageRecord, ipc: int) -> datasheet.Datasheet:
    """The datasheet from the stage records (package, checkpoint, sampling, data, training, evaluations)."""
    best, sampling = BestCheckpoint.read(args.best), SamplingSummary.read(args.pool_meta)
    prepared, training = PreparedData.read(args.prepared), TrainingRun.read(args.training)
    synthetic, random_real, full_real = (EvaluationResult.read(path)
                                         for path in (args.synthetic, args.random_real, args.full_real))
    return datasheet.Datasheet(
        package=Path(args.package).name, sha256=atomic.sha256_of(args.package), shape=package.shape, ipc=ipc,
        dataset=package.settings.dataset, classes=package.classes,
        splits={split: info.count for split, info in prepared.splits.items()},
        data_source=prepared.splits["train"].source, mean=package.mean, std=package.std,
        model_preset=training.settings.preset, model_overrides=training.settings.model_overrides,
        checkpoint_step=best.step, checkpoint_score=best.score, score_kind=best.score_kind,
        sampler=sampling.sampler, sampling_budget_s=sampling.budget_s, pool_images=sampling.images,
        rule=package.settings.rule, seed=args.seed,
        accuracy=report.set_accuracy(synthetic, random_real, full_real),
        scores=report.scores_of(synthetic, random_real, *(EvaluationResult.read(path) if path else None for path in
                                                          (args.synthetic_noaug, args.random_real_noaug)),
                                full_real=full_real),
        grid=Path(args.grid).name, software=package.environment)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
