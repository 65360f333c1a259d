"""Read a distilled set you bring (a challenge-layout file or a folder of class folders), check it
against the data set, and write it as the normalised class-major tensor the evaluation trains on.

    python workflow/scripts/external_set.py --source my_set.pt --name my_set --dataset digits \
        --test results/digits/data/test.pt --real-train results/digits/data/train.pt \
        --out results/digits/external/my_set/set.pt --record results/digits/external/my_set/set.json

Every check runs before anything is written: a row count that is not a multiple of the class count,
another channel count or image side, class folders that are not the data set's, a file that is not a
tensor (read with torch.load(weights_only=True), so a pickle that would run code is refused).
"""

import argparse
import sys

from diffdistill import atomic, cli
from diffdistill.data import load_images
from diffdistill.evaluation import external, protocol
from diffdistill.records import ExternalSet


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="a package file in the challenge layout, or a folder")
    p.add_argument("--name", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--test", required=True, help="the real test split: its classes and image shape")
    p.add_argument("--real-train", help="the real train split, for the normalisation of data sets without "
                                        "challenge constants (a folder set's pixels are normalised with it)")
    p.add_argument("--out", required=True, help="the set as a normalised class-major tensor")
    p.add_argument("--record", required=True, help="JSON (an ExternalSet record)")
    p.add_argument("--log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cli.start("external_set", sys.argv[1:] if argv is None else argv, args.log, "cpu")
    with cli.cleanup_on_failure([args.out, args.record]):
        test = load_images(args.test)
        real = load_images(args.real_train) if args.real_train else None
        mean, std = protocol.normalization_stats(args.dataset, real)
        x, ipc, form = external.read_external_set(args.source, test, mean, std)
        atomic.torch_save(x.contiguous(), args.out)
        ExternalSet(name=args.name, source=args.source, form=form, ipc=ipc, classes=test.classes,
                    image_shape=list(x.shape[1:]), sha256=atomic.sha256_of(args.source),
                    environment=cli.environment()).write(args.record)
    cli.log.info("%s (%s): %d images, IPC %d of %d classes", args.source, form, len(x), ipc, test.num_classes)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
