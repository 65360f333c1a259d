"""Report on the distilled sets you brought: one result.json per set, summary.json and report.md with a
table of each set's accuracy beside random real of its IPC and the field's scores (HLR, IOR, LRS, ARS).

    python workflow/scripts/external_report.py --dataset digits \
        --sets results/digits/external/my_set/set.json \
        --evaluations results/digits/evaluation/external_my_set.json \
        --random-real results/digits/evaluation/external_my_set_random.json \
        --full-real results/digits/evaluation/real_full.json \
        --results results/digits/external/my_set/result.json \
        --summary results/digits/external/summary.json --report results/digits/external/report.md

--sets, --evaluations, --random-real and --results list the sets in one order; with evaluation.ars,
--evaluations-noaug and --random-real-noaug (in the same order) add ARS.
"""

import argparse
import sys

from diffdistill import atomic, cli, report
from diffdistill.errors import DiffdistillError
from diffdistill.records import EvaluationResult, ExternalSet, ExternalSummary


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    for flag in ("--sets", "--evaluations", "--random-real", "--results"):
        p.add_argument(flag, nargs="+", required=True)
    for flag in ("--evaluations-noaug", "--random-real-noaug"):
        p.add_argument(flag, nargs="*", default=[])
    for flag in ("--full-real", "--summary", "--report"):
        p.add_argument(flag, required=True)
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cli.start("external_report", sys.argv[1:] if argv is None else argv, args.log)
    lists = {"--sets": args.sets, "--evaluations": args.evaluations, "--random-real": args.random_real,
             "--results": args.results}
    if args.evaluations_noaug or args.random_real_noaug:
        lists |= {"--evaluations-noaug": args.evaluations_noaug, "--random-real-noaug": args.random_real_noaug}
    if len({len(paths) for paths in lists.values()}) != 1:
        raise DiffdistillError(f"one file per set expected in each of {list(lists)}: got "
                               f"{ {flag: len(paths) for flag, paths in lists.items()} }")
    with cli.cleanup_on_failure([*args.results, args.summary, args.report]):
        full_real = EvaluationResult.read(args.full_real)
        rows = []
        for i, (record, result) in enumerate(zip(args.sets, args.results)):
            noaug = [EvaluationResult.read(paths[i]) for paths in (args.evaluations_noaug, args.random_real_noaug)
                     if paths]
            row = report.external_result(ExternalSet.read(record), EvaluationResult.read(args.evaluations[i]),
                                         EvaluationResult.read(args.random_real[i]), full_real, *noaug)
            row.write(result)
            rows.append(row)
        summary = ExternalSummary(dataset=args.dataset, sets=rows)
        summary.write(args.summary)
        atomic.write_text(args.report, report.render_external_markdown(summary))
    for row in rows:
        acc = row.accuracy
        cli.log.info("%s: %.2f +- %.2f %% against %.2f +- %.2f %% for random real IPC %d", row.name,
                     100 * acc.synthetic.mean, 100 * acc.synthetic.std, 100 * acc.random_real.mean,
                     100 * acc.random_real.std, row.ipc)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
