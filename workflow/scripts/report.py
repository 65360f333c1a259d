"""Report stage: sample grid, summary.json and report.md from the outputs of the other stages.

    python workflow/scripts/report.py --dataset digits --best results/digits/scoring/best.json \
        --scores results/digits/scoring/scores.csv --curve results/digits/scoring/score_curve.png \
        --pool results/digits/samples/pool.pt --pool-meta results/digits/samples/pool.json \
        --evaluations results/digits/evaluation/*.json --ipc 1 10 \
        --report results/digits/report.md --summary results/digits/summary.json \
        --grid results/digits/sample_grid.png --accuracy-table results/digits/accuracy.tsv \
        --ipc-plot results/digits/ipc_grid.png

--evaluations holds synthetic_ipc<n>.json and real_ipc<n>.json for each IPC n of --ipc (the grid), and
synthetic_pool.json and real_full.json.

With a budget curve, add --budget-evaluations (evaluate's budget_<fraction>.json) and --budget-plot; with
a sampler sweep, --sweep-metas (sweep/<name>/pool.json), --sweep-evaluations (sweep_<name>.json, same
order), --sweep-plot and --sweep-table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from diffdistill import atomic, cli, report
from diffdistill.data import load_images
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.errors import DiffdistillError
from diffdistill.records import BestCheckpoint, EvaluationResult


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    for flag in ("--best", "--scores", "--curve", "--pool", "--pool-meta", "--report", "--summary", "--grid",
                 "--accuracy-table", "--ipc-plot"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--evaluations", nargs="+", required=True, help="<kind>.json files of the evaluate stage")
    for flag in ("--budget-evaluations", "--sweep-metas", "--sweep-evaluations"):
        parser.add_argument(flag, nargs="*", default=[])
    for flag in ("--budget-plot", "--sweep-plot", "--sweep-table"):
        parser.add_argument(flag)
    parser.add_argument("--ipc", type=int, nargs="+", required=True, help="the IPC grid")
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    cli.start("report", sys.argv[1:] if argv is None else argv, args.log)

    outputs = [args.report, args.summary, args.grid, args.accuracy_table, args.ipc_plot, args.budget_plot,
               args.sweep_plot, args.sweep_table]
    with cli.cleanup_on_failure(outputs):
        evaluations = {Path(p).stem: EvaluationResult.read(p) for p in args.evaluations}
        curve, sweep = budget_and_sweep(args)
        best = BestCheckpoint.read(args.best)
        sampling = SamplingSummary.read(args.pool_meta)
        pool = load_images(args.pool)
        grid = report.sample_grid(pool, per_class=10, pixel_scale=report.grid_scale(pool.images.shape[-1]))
        with atomic.atomic_path(args.grid) as tmp:
            grid.save(tmp, format="PNG")
        summary = report.build_summary(dataset=args.dataset, best=best, sampling=sampling, accuracy=evaluations,
                                       ipc_grid=args.ipc, budget_curve=curve, sweep=sweep)
        scores = pd.read_csv(args.scores).to_dict("records")
        report_dir = Path(args.report).parent
        figures = {"curve": os.path.relpath(args.curve, report_dir), "grid": os.path.relpath(args.grid, report_dir)}
        figures |= plots(args, summary, report_dir)
        atomic.write_text(args.accuracy_table, report.accuracy_table(summary).to_csv(sep="\t", index=False))
        text = report.render_markdown(summary, scores=scores, sampling=sampling, figures=figures,
                                      evaluations=evaluations)
        summary.write(args.summary)
        atomic.write_text(args.report, text)
    return 0


def budget_and_sweep(args):
    """The budget curve and the sweep rows from their evaluate results and sampling summaries."""
    if len(args.sweep_metas) != len(args.sweep_evaluations):
        raise DiffdistillError(f"{len(args.sweep_metas)} --sweep-metas but {len(args.sweep_evaluations)} "
                               "--sweep-evaluations")
    curve = report.budget_curve({path: EvaluationResult.read(path) for path in args.budget_evaluations})
    variants = [(Path(meta).parent.name, SamplingSummary.read(meta), EvaluationResult.read(result))
                for meta, result in zip(args.sweep_metas, args.sweep_evaluations)]
    return curve, report.sweep_rows(variants)


def plots(args, summary, report_dir) -> dict:
    """The IPC grid's figure, the budget curve and sweep figures (and the sweep's TSV) that were asked for; their
    links."""
    report.plot_ipc_grid(summary.ipc_grid, summary.accuracy["real_full"], args.ipc_plot)
    figures = {"ipc": os.path.relpath(args.ipc_plot, report_dir)}
    if args.budget_plot:
        labels = report.accuracy_rows([max(args.ipc)], summary.pool_images)  # the largest IPC's random real line
        references = {labels[key]: summary.accuracy[key] for key in (f"real_ipc{max(args.ipc)}", "real_full")}
        report.plot_budget_curve(summary.budget_curve, references, args.budget_plot)
        figures["budget"] = os.path.relpath(args.budget_plot, report_dir)
    if args.sweep_plot:
        report.plot_sweep(summary.sweep, args.sweep_plot)
        figures["sweep"] = os.path.relpath(args.sweep_plot, report_dir)
    if args.sweep_table:
        atomic.write_text(args.sweep_table, report.sweep_table(summary.sweep).to_csv(sep="\t", index=False))
    return figures


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
