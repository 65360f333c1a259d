"""Export a package as an image folder: <out>/train/<class>/<index>.png, de-normalised to 8-bit pixels.

    python workflow/scripts/export_images.py --package results/digits/package/digits.pt \
        --meta results/digits/package/package.json --out results/digits/package/images

It loads with torchvision's ImageFolder, with our folder reader, and as a set you bring (config key
external); reading it back and normalising gives the package's tensor again.
"""

import argparse
import sys

from diffdistill import cli
from diffdistill.packaging import image_folder, submission
from diffdistill.records import PackageRecord


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", required=True, help="a package file written by package")
    p.add_argument("--meta", required=True, help="its record (package.json): classes, IPC and normalisation")
    p.add_argument("--out", required=True, help="the folder to write (replaced when it exists)")
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cli.start("export_images", sys.argv[1:] if argv is None else argv, args.log, "cpu")
    record = PackageRecord.read(args.meta)
    x, _ = submission.load_package(args.package, len(record.classes), record.settings.ipc, record.shape[1:])
    count = image_folder.export_image_folder(x, record.classes, record.mean, record.std, args.out)
    cli.log.info("wrote %d images to %s/train/<class>/", count, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
