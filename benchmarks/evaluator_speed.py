"""Evaluator speed: rounds of the challenge protocol three ways on the same data and epochs: a loop in
the organisers' style, diffdistill.evaluation.protocol (rounds one after another) and
diffdistill.evaluation.stacked_rounds (all rounds at once); seconds per round, accuracy, time ratio.

    python benchmarks/evaluator_speed.py --device cuda --train train.pt --test test.pt --dataset cifar100 --epochs 20
    python benchmarks/evaluator_speed.py --digits-ipc 1 10 50 --pool 2000 --rounds 5 --epochs 10

The organisers' style (docs/reference.md, "Challenge protocol" and "DSA augmentation"; the
challenge repository's utils.py, as the dataset-condensation code it comes from): a DataLoader over a
TensorDataset (per-sample indexing and stacking), DSA mode 'S' drawn per batch with the scale and
rotate matrices built in per-sample Python loops, the loss read with .item() and the accuracy
through .cpu().numpy() on every batch, SGD rebuilt at the lr drop, the test set in eval mode. All
paths train the same ConvNet with the same protocol; only the implementation differs. Without
--train/--test, class-coded random images are made (each class its own mean colour plus noise);
with --digits-ipc, scikit-learn's digits (a random real subset per round, the same for every path)
and with --pool a class-balanced pool drawn with replacement from the digits' training split. The
ratio is the first path's seconds per round over each path's; with the organisers' loop and the
stacked path a line gives their difference of mean accuracy in standard errors.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from diffdistill import host_memory, speed
from diffdistill.cli import resolve_device
from diffdistill.data import load_images
from diffdistill.data.digits import load_digits_split
from diffdistill.data.normalize import normalize
from diffdistill.evaluation import protocol, stacked_rounds
from diffdistill.evaluation.convnet import ConvNet
from diffdistill.evaluation.dsa import DSAParams


# ---- the organisers' style: DSA as in their utils.py ------------------------------------------


def rand_scale(x, p):
    sx = torch.rand(x.shape[0]) * (p.ratio_scale - 1.0 / p.ratio_scale) + 1.0 / p.ratio_scale
    sy = torch.rand(x.shape[0]) * (p.ratio_scale - 1.0 / p.ratio_scale) + 1.0 / p.ratio_scale
    theta = [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])]  # per-sample Python loop
    theta = torch.tensor(theta, dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def rand_rotate(x, p):
    theta = (torch.rand(x.shape[0]) - 0.5) * 2 * p.ratio_rotate / 180 * float(np.pi)
    theta = [[[torch.cos(theta[i]), torch.sin(-theta[i]), 0], [torch.sin(theta[i]), torch.cos(theta[i]), 0]]
             for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def rand_flip(x, p):
    randf = torch.rand(x.size(0), 1, 1, 1, device=x.device)
    return torch.where(randf < p.prob_flip, x.flip(3), x)


def rand_brightness(x, p):
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5) * p.brightness


def rand_saturation(x, p):
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) * p.saturation) + x_mean


def rand_contrast(x, p):
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device) + p.contrast) + x_mean


def rand_crop(x, p):
    shift_x, shift_y = int(x.size(2) * p.ratio_crop_pad + 0.5), int(x.size(3) * p.ratio_crop_pad + 0.5)
    tx = torch.randint(-shift_x, shift_x + 1, size=[x.size(0), 1, 1], device=x.device)
    ty = torch.randint(-shift_y, shift_y + 1, size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(x.size(0), dtype=torch.long, device=x.device),
                                torch.arange(x.size(2), dtype=torch.long, device=x.device),
                                torch.arange(x.size(3), dtype=torch.long, device=x.device), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def rand_cutout(x, p):
    size = int(x.size(2) * p.ratio_cutout + 0.5), int(x.size(3) * p.ratio_cutout + 0.5)
    ox = torch.randint(0, x.size(2) + (1 - size[0] % 2), size=[x.size(0), 1, 1], device=x.device)
    oy = torch.randint(0, x.size(3) + (1 - size[1] % 2), size=[x.size(0), 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(x.size(0), dtype=torch.long, device=x.device),
                                torch.arange(size[0], dtype=torch.long, device=x.device),
                                torch.arange(size[1], dtype=torch.long, device=x.device), indexing="ij")
    gx = torch.clamp(gx + ox - size[0] // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


AUGMENT_FNS = {"color": [rand_brightness, rand_saturation, rand_contrast], "crop": [rand_crop],
               "cutout": [rand_cutout], "flip": [rand_flip], "scale": [rand_scale], "rotate": [rand_rotate]}


def diff_augment(x, params: DSAParams):
    """Mode 'S': one family per batch, drawn with .item() on the CPU RNG."""
    families = params.strategy.split("_")
    family = families[torch.randint(0, len(families), size=(1,)).item()]
    for fn in AUGMENT_FNS[family]:
        x = fn(x, params)
    return x.contiguous()


def organisers_epoch(mode, loader, net, optimizer, criterion, device, aug):
    loss_avg, acc_avg, num_exp = 0.0, 0, 0
    net.train() if mode == "train" else net.eval()
    for images, labels in loader:
        img, lab = images.float().to(device), labels.long().to(device)
        if aug:
            img = diff_augment(img, DSAParams())
        output = net(img)
        loss = criterion(output, lab)
        acc = np.sum(np.equal(np.argmax(output.cpu().data.numpy(), axis=-1), lab.cpu().data.numpy()))
        loss_avg += loss.item() * lab.shape[0]
        acc_avg += acc
        num_exp += lab.shape[0]
        if mode == "train":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss_avg / num_exp, acc_avg / num_exp


def organisers_round(train_x, train_y, test_x, test_y, *, num_classes, epochs, batch_size, device) -> float:
    """evaluate_synset: SGD 0.01 / 0.9 / 5e-4, epochs 0..E, lr x0.1 after E//2+1 by a new optimizer."""
    net = ConvNet(train_x.shape[1], num_classes, 128, 3, tuple(train_x.shape[2:])).to(device)
    images, labels = train_x.to(device), train_y.to(device)
    lr = 0.01
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    criterion = nn.CrossEntropyLoss().to(device)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, num_workers=0)
    for ep in range(epochs + 1):
        organisers_epoch("train", loader, net, optimizer, criterion, device, aug=True)
        if ep == epochs // 2 + 1:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    test_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=256, shuffle=False, num_workers=0)
    with torch.no_grad():
        _, acc = organisers_epoch("test", test_loader, net, optimizer, criterion, device, aug=False)
    return float(acc)


# ---- the comparison ----------------------------------------------------------------------------

PATHS = ("organisers", "diffdistill", "stacked")


def toy_split(num_classes: int, per_class: int, side: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(123))  # per class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = colours[labels] + 0.3 * torch.randn(len(labels), 3, side, side, generator=g)
    return (x - 0.5) / 0.25, labels


def load_data(args):
    if args.train:
        train, test = load_images(args.train), load_images(args.test)
        mean, std = protocol.normalization_stats(args.dataset, train)
        return (normalize(train.images, mean, std), train.labels, normalize(test.images, mean, std), test.labels,
                train.num_classes)
    train_x, train_y = toy_split(args.classes, args.per_class, args.size, 0)
    test_x, test_y = toy_split(args.classes, max(args.per_class // 2, 1), args.size, 1)
    return train_x, train_y, test_x, test_y, args.classes


def digits_sets(args):
    """(name, train_x, train_y, test_x, test_y, classes, round_indices) on scikit-learn's digits: per IPC a
    fresh random real subset per round (the same subsets for every path), and a pool of ``--pool`` images
    drawn with replacement from the training split, class-balanced, that every round trains on whole."""
    train, test = load_digits_split("train"), load_digits_split("test")
    mean, std = protocol.normalization_stats("digits", train)
    x, y, tx, ty = normalize(train.images, mean, std), train.labels, normalize(test.images, mean, std), test.labels
    generator = torch.Generator().manual_seed(0)
    for ipc in args.digits_ipc:
        subsets = [protocol.random_real_indices(train, ipc, generator) for _ in range(args.rounds)]
        yield f"digits ipc {ipc}", x, y, tx, ty, train.num_classes, subsets
    if args.pool:
        per_class = args.pool // train.num_classes
        picks = [members[torch.randint(len(members), (per_class,), generator=generator)]
                 for members in ((y == c).nonzero().flatten() for c in range(train.num_classes))]
        pool = torch.cat(picks)  # (pool,), with replacement
        yield f"digits pool {len(pool)}", x[pool], y[pool], tx, ty, train.num_classes, None


def data_sets(args):
    if args.digits_ipc or args.pool:
        return list(digits_sets(args))
    train_x, train_y, test_x, test_y, classes = load_data(args)
    name = "files" if args.train else "class-coded random"
    return [(name, train_x, train_y, test_x, test_y, classes, None)]


def timed(fn):
    began = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - began


def run_path(path, data, args, device):
    """(accuracies, seconds per round) of ``args.rounds`` rounds on one set."""
    _, train_x, train_y, test_x, test_y, classes, subsets = data
    common = dict(num_classes=classes, epochs=args.epochs, batch_size=args.batch_size, device=device)
    speed.synchronize(device)
    if path == "organisers":
        accuracies, seconds = [], 0.0
        for r in range(args.rounds):
            torch.manual_seed(r)
            pick = slice(None) if subsets is None else subsets[r]
            acc, s = timed(lambda: organisers_round(train_x[pick], train_y[pick], test_x, test_y, **common))
            accuracies.append(acc)
            seconds += s
        return accuracies, seconds / args.rounds
    evaluate = protocol.train_and_evaluate if path == "diffdistill" else stacked_rounds.train_and_evaluate_stacked
    result, seconds = timed(lambda: evaluate(train_x, train_y, test_x, test_y, channel=train_x.shape[1],
                                             im_size=train_x.shape[2:], rounds=args.rounds, seed=0,
                                             round_indices=subsets, log_every=0, **common))
    return result["accuracies"], seconds / args.rounds


def warm_up(data, device, batch_size):
    """Untimed warm-up of every path (CUDA context, cuDNN and kernel selection): whichever ran first
    would otherwise pay for it."""
    _, train_x, train_y, test_x, test_y, classes, _ = data
    warm = dict(num_classes=classes, epochs=0, batch_size=batch_size, device=device)
    organisers_round(train_x[:64], train_y[:64], test_x[:64], test_y[:64], **warm)
    for evaluate in (protocol.train_and_evaluate, stacked_rounds.train_and_evaluate_stacked):
        evaluate(train_x[:64], train_y[:64], test_x[:64], test_y[:64], channel=train_x.shape[1],
                 im_size=train_x.shape[2:], rounds=2, seed=0, log_every=0, **warm)


def agreement(rows) -> str:
    """Stacked against the organisers' loop: difference of means, in points, and its standard error."""
    by_path = {path: accuracies for path, accuracies, _ in rows}
    if "organisers" not in by_path or "stacked" not in by_path or len(by_path["stacked"]) < 2:
        return ""
    a, b = np.array(by_path["stacked"]), np.array(by_path["organisers"])
    error = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    gap = a.mean() - b.mean()
    return (f"# agreement: stacked - organisers = {100 * gap:+.2f} points, standard error {100 * error:.2f} "
            f"({abs(gap) / error if error else float('inf'):.1f} SE)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", help="LabeledImages file (with --test); default: class-coded random images")
    p.add_argument("--test")
    p.add_argument("--dataset", default="cifar100", help="normalisation constants of the challenge")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--digits-ipc", type=int, nargs="*", default=[],
                   help="scikit-learn digits at these IPCs (a random real subset per round) instead of --train/toy")
    p.add_argument("--pool", type=int, default=0, help="also a digits pool of this many images (with replacement)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="rounds per path (accuracy spread)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    host_memory.keep_freed_memory()  # as every stage script does, for all three paths alike
    device = resolve_device(args.device)
    sets = data_sets(args)
    warm_up(sets[0], device, args.batch_size)
    print(f"# {args.rounds} rounds per path, {args.epochs} epochs, batch {args.batch_size}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print("loop\tset\ttrain images\tseconds/round\taccuracy\tstd\tratio", flush=True)
    for data in sets:
        rows = []
        train_size = len(data[1]) if data[6] is None else len(data[6][0])
        for path in args.paths:  # each row as soon as its path is done: a long run shows what it has
            rows.append((path, *run_path(path, data, args, device)))
            accuracies, seconds = rows[-1][1:]
            ratio = rows[0][2] / seconds  # the first path's (by default the organisers') time over this one's
            print(f"{path}\t{data[0]}\t{train_size}\t{seconds:.3f}\t{np.mean(accuracies):.4f}\t"
                  f"{np.std(accuracies):.4f}\t{ratio:.2f}", flush=True)
        if agreement(rows):
            print(agreement(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
