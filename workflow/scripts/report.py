"""Report stage: sample grid, summary.json and report.md from the outputs of the other stages.

    python workflow/scripts/report.py --dataset digits --best results/digits/scoring/best.json \
        --scores results/digits/scoring/scores.csv --curve results/digits/scoring/score_curve.png \
        --pool results/digits/samples/pool.pt --pool-meta results/digits/samples/pool.json \
        --evaluations results/digits/evaluation/*.json --ipc 10 \
        --report results/digits/report.md --summary results/digits/summary.json \
        --grid results/digits/sample_grid.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from diffdistill import atomic, cli, report
from diffdistill.data import load_images
from diffdistill.errors import DiffdistillError
from diffdistill.sampling_summary import SamplingSummary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    for flag in ("--best", "--scores", "--curve", "--pool", "--pool-meta", "--report", "--summary", "--grid"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--evaluations", nargs="+", required=True, help="<kind>.json files of the evaluate stage")
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    cli.start("report", sys.argv[1:] if argv is None else argv, args.log)

    with cli.cleanup_on_failure([args.report, args.summary, args.grid]):
        evaluations = {Path(p).stem: atomic.read_json(p, "an evaluation JSON") for p in args.evaluations}
        best = atomic.read_json(args.best, "select_checkpoint's best.json")
        sampling = SamplingSummary.read(args.pool_meta)
        pool = load_images(args.pool)
        grid = report.sample_grid(pool, per_class=10, pixel_scale=report.grid_scale(pool.images.shape[-1]))
        with atomic.atomic_path(args.grid) as tmp:
            grid.save(tmp, format="PNG")
        try:
            summary = report.build_summary(dataset=args.dataset, best=best, sampling=sampling, accuracy=evaluations)
        except (KeyError, ValueError) as err:
            raise DiffdistillError(f"stage outputs incomplete for the summary: {err}") from err
        scores = pd.read_csv(args.scores).to_dict("records")
        report_dir = Path(args.report).parent
        figures = {"curve": os.path.relpath(args.curve, report_dir), "grid": os.path.relpath(args.grid, report_dir)}
        details = {kind: ev.get("settings", {}) | {k: ev[k] for k in ("rounds", "epochs") if k in ev}
                   for kind, ev in evaluations.items()}
        text = report.render_markdown(summary, ipc=args.ipc, scores=scores, sampling=sampling,
                                      figures=figures, accuracy_details=details)
        atomic.write_json(args.summary, summary)
        atomic.write_text(args.report, text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
