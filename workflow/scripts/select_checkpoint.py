"""Pick the best checkpoint from its scores: a CSV of step -> score, the best as JSON, the curve.

    python workflow/scripts/select_checkpoint.py --scores scoring/step_*.json --csv scores.csv \
        --best best.json --plot score_curve.png

Lower is better; ties go to the earliest step. Scores of different kinds or sample counts are refused.
"""

import argparse
import sys

from diffdistill import atomic, cli
from diffdistill.records import BestCheckpoint, CheckpointScore
from diffdistill.scoring import checkpoint_scores


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", nargs="+", required=True, help="score JSONs from score_checkpoint.py")
    p.add_argument("--csv", required=True)
    p.add_argument("--best", required=True, help="JSON (a BestCheckpoint record): step, score, score_kind, checkpoint of the best")
    p.add_argument("--plot", required=True, help="PNG of score against step")
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cli.start("select_checkpoint", sys.argv[1:] if argv is None else argv, args.log, "cpu")
    with cli.cleanup_on_failure([args.csv, args.best, args.plot]):
        best, table = checkpoint_scores.select_best([CheckpointScore.read(path) for path in args.scores])
        atomic.write_text(args.csv, table.to_csv(index=False))
        checkpoint_scores.plot_scores(table, args.plot, best.score_kind)
        BestCheckpoint.of(best, settings={"scores": args.scores}, environment=cli.environment()).write(args.best)
    cli.log.info("best: step %d, %s %.4f (%s)", best.step, best.score_kind, best.score, best.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
