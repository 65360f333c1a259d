"""The timeline of one Snakemake run, from its log (.snakemake/log/<date>.snakemake.log): each job's start
and end in seconds from the first job, its threads, and the cores left idle while the run waited.

    python benchmarks/run_timeline.py .snakemake/log/2026-12-07T071002.166011.snakemake.log --cores 2

"idle core-s" counts, between the first start and the last end, the seconds times cores that no job's
threads held: on a 2-core machine a run of W core-seconds of work takes at least W / 2 seconds, and the
idle core-seconds are what the schedule added to that. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
FINISH = re.compile(r"^Finished jobid: (\d+)")


def parse(lines):
    """jobid -> {rule, wildcards, threads, start, end} (datetimes) of the jobs that started in the log."""
    jobs, stamp, current = {}, None, None
    for line in lines:
        line = line.rstrip("\n")
        if match := STAMP.match(line):
            stamp = datetime.strptime(" ".join(match.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif match := START.match(line):
            current = {"rule": match.group(1), "wildcards": "", "threads": 1, "start": stamp, "end": None}
        elif current is not None and (match := re.match(r"^\s+(jobid|wildcards|threads): (.*)$", line)):
            key, value = match.groups()
            if key == "jobid":
                jobs[value] = current
            else:
                current[key] = int(value) if key == "threads" else value
        elif match := FINISH.match(line):
            jobs[match.group(1)]["end"] = stamp
    return jobs


def idle_core_seconds(jobs, cores):
    """Seconds x cores that no job held, between the first start and the last end (1-s resolution)."""
    t0 = min(job["start"] for job in jobs)
    t1 = max(job["end"] for job in jobs)
    busy = [0] * int((t1 - t0).total_seconds())
    for job in jobs:
        for second in range(int((job["start"] - t0).total_seconds()), int((job["end"] - t0).total_seconds())):
            busy[second] += job["threads"]
    return sum(max(0, cores - held) for held in busy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log")
    p.add_argument("--cores", type=int, required=True)
    args = p.parse_args(argv)
    with open(args.log) as handle:
        jobs = sorted((job for job in parse(handle).values() if job["end"]), key=lambda job: job["start"])
    t0 = jobs[0]["start"]
    print("rule\twildcards\tthreads\tstart_s\tend_s\tseconds")
    for job in jobs:
        start, end = ((job[k] - t0).total_seconds() for k in ("start", "end"))
        print(f"{job['rule']}\t{job['wildcards']}\t{job['threads']}\t{start:.0f}\t{end:.0f}\t{end - start:.0f}")
    wall = (max(job["end"] for job in jobs) - t0).total_seconds()
    work = sum(job["threads"] * (job["end"] - job["start"]).total_seconds() for job in jobs)
    print(f"# wall {wall:.0f} s, jobs' core-seconds {work:.0f}, idle core-seconds {idle_core_seconds(jobs, args.cores)}"
          f" on {args.cores} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
