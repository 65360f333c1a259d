"""Merge the pools of parallel sampling shards into one pool and one summary.

    python workflow/scripts/merge_samples.py --shards s0.pt s1.pt --metas s0.json s1.json \\
        --out results/digits/samples/pool.pt --meta results/digits/samples/pool.json

Each shard sampled on its own device against the same budget; the merged summary keeps every
shard's figures (its totals add up images and images/s) in the layout of a single job's summary.
"""

from __future__ import annotations

import argparse
import sys

from diffdistill import cli
from diffdistill.data import concat_images, load_images, save_images
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.errors import DiffdistillError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="pool files of the shards")
    p.add_argument("--metas", nargs="+", required=True, help="their JSON sidecars, in the same order")
    p.add_argument("--out", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--log")
    args = p.parse_args(argv)
    cli.start("merge_samples", sys.argv[1:] if argv is None else argv, args.log, device="cpu")
    if len(args.shards) != len(args.metas):
        raise DiffdistillError(f"{len(args.shards)} shard files but {len(args.metas)} JSON files")
    with cli.cleanup_on_failure([args.out, args.meta]):
        pool = concat_images([load_images(path) for path in args.shards], split="synthetic")
        summary = SamplingSummary.merge([SamplingSummary.read(path) for path in args.metas],
                                        environment=cli.environment(), sources=args.shards)
        if summary.images != len(pool):
            raise DiffdistillError(f"the shard JSONs count {summary.images} images, the files hold {len(pool)}")
        save_images(pool, args.out)
        summary.write(args.meta)
    cli.log.info("merged %d shards: %d images, %.1f images/s in total", len(summary.shards), len(pool),
                 summary.images_per_s)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
