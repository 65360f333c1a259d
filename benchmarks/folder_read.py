"""How fast a folder data set is read: writes N small images (half PNG, half JPEG; colour and grey mixed)
into a temporary folder in the ImageFolder layout, then times decoding them all with 1 worker and with a
process pool, and prints images/s per row and the time 100,000 images would take. Usage::

    python benchmarks/folder_read.py --images 10000 --source-side 32 --side 32 --workers 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from diffdistill.data import folder


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000, help="images written (split over the classes)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--source-side", type=int, default=32, help="side of the images written")
    p.add_argument("--side", type=int, default=32, help="side they are read at")
    p.add_argument("--channels", type=int, default=0, choices=(0, 1, 3), help="0: inferred")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--extrapolate", type=int, default=100_000, help="report the time for this many images")
    return p.parse_args(argv)


def write_images(root: Path, count: int, classes: int, side: int, seed: int = 0) -> list[Path]:
    """``count`` random images under root/train/<class>/: even ones PNG, odd ones JPEG; every third grey."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        img = Image.fromarray(pixels[:, :, 0], "L") if i % 3 == 0 else Image.fromarray(pixels, "RGB")
        path = root / "train" / f"class_{i % classes:03d}" / f"{i:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        paths.append(path)
    return paths


def main(argv=None) -> list[dict]:
    args = parse(argv)
    settings = folder.FolderSettings(side=args.side, channels=args.channels)
    rows = []
    with tempfile.TemporaryDirectory(prefix="folder_read_") as tmp:
        began = time.perf_counter()
        paths = write_images(Path(tmp), args.images, args.classes, args.source_side)
        print(f"wrote {len(paths)} images of {args.source_side}x{args.source_side} in {time.perf_counter() - began:.1f} s")
        began = time.perf_counter()
        listed = folder.list_split(Path(tmp) / "train")
        listing_s = time.perf_counter() - began
        for workers in args.workers:
            began = time.perf_counter()
            images, _ = folder.decode_images(listed.paths_and_labels()[0], settings, workers)
            seconds = time.perf_counter() - began
            rate = len(paths) / seconds
            rows.append({"workers": workers, "images": len(paths), "seconds": seconds, "images_per_s": rate,
                         "extrapolated_s": args.extrapolate / rate, "shape": tuple(images.shape)})
    print(f"listing {len(paths)} files: {listing_s:.2f} s")
    print(f"{'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9} {f'{args.extrapolate} images (s)':>20}  shape")
    for row in rows:
        print(f"{row['workers']:>7} {row['images']:>7} {row['seconds']:>8.2f} {row['images_per_s']:>9.0f} "
              f"{row['extrapolated_s']:>20.1f}  {row['shape']}")
    return rows


if __name__ == "__main__":
    main()
