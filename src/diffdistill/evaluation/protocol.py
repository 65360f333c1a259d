"""The challenge's train/test protocol: a ConvNet trained on a (synthetic) set, tested on real data.

Follows the challenge's ``evaluate.py`` / ``utils.evaluate_synset`` (docs/reference.md, "Challenge protocol"): SGD with
lr 0.01, momentum 0.9, weight decay 5e-4, shuffled batches of 256 (the last one partial),
cross-entropy on hard labels, DSA mode 'S' on every training batch. ``epochs`` is the reference's
``Epoch`` argument: it runs the passes 0..epochs (1001 for the default 1000) and after pass
``epochs // 2 + 1`` (501) the learning rate is multiplied by 0.1 by building a *new* SGD optimizer,
as the reference does, which also drops the momentum buffers. The model is then tested on the whole
test set in eval mode; each round starts from a fresh ConvNet and the mean and std (population,
``np.std``) of the rounds' test accuracies (fractions in [0, 1]) are reported.

Four cases use it: the packaged file (labels by position, class-major blocks), the full synthetic
pool (explicit labels), a random real subset at the same IPC and the full real training set.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffdistill.data import LabeledImages, load_images
from diffdistill.data.normalize import normalize, stats_for
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation.convnet import ConvNet
from diffdistill.evaluation.dsa import DSAParams, apply_params, draw_family, draw_params
from diffdistill.evaluation.state import EvaluationState
from diffdistill.packaging import submission

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict], None]
CHALLENGE_BATCH = 256  # the challenge's SGD batch (docs/reference.md, "Challenge protocol")


def random_real_indices(real: LabeledImages, ipc: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``ipc`` images per class drawn without replacement, class-major (the random baseline)."""
    picks = []
    for c in range(real.num_classes):
        members = (real.labels == c).nonzero().flatten()  # (n_c,)
        if len(members) < ipc:
            raise DiffdistillError(f"{real.name or 'real data'}: class {c} ({real.classes[c]}) has "
                                   f"{len(members)} images; expected at least ipc = {ipc}")
        picks.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(picks)  # (K * ipc,)


def normalization_stats(dataset: str, real_train: LabeledImages | None):
    """The challenge constants, else the real training split's own (which must then be given)."""
    return stats_for(dataset, None if real_train is None else real_train.images)


def load_training_set(path: str | os.PathLike, train_format: str, test: LabeledImages, mean, std, *,
                      ipc: int | None = None, random_ipc: int | None = None, rounds: int = 1,
                      seed: int | None = None):
    """(x, y, description, round_indices) of a training set, normalised like the test split: a package
    (``train_format`` "package", labels by position, ``ipc``) or a labelled image file ("images").
    With ``random_ipc`` every round trains on its own random subset of that many images per class
    (``round_indices``, one per round): the random-real baseline is an average over subsets, whose
    spread is larger than that of retraining on one subset. Otherwise ``round_indices`` is None."""
    if train_format == "package":
        if ipc is None or random_ipc is not None:
            raise DiffdistillError("a package training set needs ipc (and takes no random_ipc)")
        x, y = submission.load_package(path, test.num_classes, ipc, test.images.shape[1:])
        return x, y, f"package ipc {ipc}", None
    train = load_images(path)
    if train.classes != test.classes or train.images.shape[1:] != test.images.shape[1:]:
        raise DiffdistillError(f"{path}: classes or image shape differ from the test split {test.name or ''}")
    round_indices = None
    if random_ipc is not None:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        round_indices = [random_real_indices(train, random_ipc, generator) for _ in range(rounds)]
    what = f"random real ipc {random_ipc}, a fresh subset per round" if random_ipc else f"images ({len(train)})"
    return normalize(train.images, mean, std), train.labels, what, round_indices


def check_split(name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, shape: tuple) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point() or tuple(x.shape[1:]) != shape or len(x) == 0:
        raise DiffdistillError(f"{name} images: expected a non-empty float tensor (N, {', '.join(map(str, shape))}), "
                               f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if y.shape != (x.shape[0],) or y.is_floating_point():
        raise DiffdistillError(f"{name} labels: expected {x.shape[0]} integer labels, got {y.dtype} {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DiffdistillError(f"{name} labels: expected values in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")


def lr_drop_epoch(epochs: int) -> int:
    """The pass after which the reference multiplies the lr by 0.1 (501 for 1000 epochs)."""
    return epochs // 2 + 1


def new_model(num_classes, channel, im_size, net_width, net_depth, init_seed) -> ConvNet:
    """Default PyTorch initialisation, from the global RNG or, with a seed, from a private one."""
    if init_seed is None:
        return ConvNet(channel, num_classes, net_width, net_depth, im_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return ConvNet(channel, num_classes, net_width, net_depth, im_size)


def sgd(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to CUDA through pinned memory, so the host does not wait."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def epoch_draws(n: int, batch_size: int, use_dsa: bool, dsa_params, generator, shape, device):
    """The epoch's random draws, in the order a batch-by-batch loop makes them (the sample order, then
    per batch a DSA family and its per-sample parameters), drawn up front on the generator's device
    and moved to ``device`` without a host synchronisation. Returns (order, [(family, params)])."""
    source = generator.device if generator is not None else device
    order = torch.randperm(n, generator=generator, device=source)  # (N,)
    plans = []
    for start in range(0, n if use_dsa else 0, batch_size):
        family = draw_family(generator, dsa_params)
        drawn = draw_params(family, (min(batch_size, n - start), *shape), generator, source, dsa_params)
        plans.append((family, {k: _to_device(v, device) for k, v in drawn.items()}))
    return _to_device(order, device), plans


def _train_epoch(model, optimizer, x, y, batch_size, use_dsa, dsa_params, generator) -> tuple[float, float]:
    """One shuffled pass (last batch partial), DSA on each batch. Returns (mean loss, train accuracy).

    No host synchronisation per batch (docs/reference.md, "DSA augmentation": per-batch Python and
    waiting costs more than DSA itself): draws are made up front, loss and accuracy summed on the device.
    """
    model.train()
    order, plans = epoch_draws(len(x), batch_size, use_dsa, dsa_params, generator, x.shape[1:], x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i, start in enumerate(range(0, len(x), batch_size)):
        index = order[start:start + batch_size]  # (B,)
        images, labels = x[index], y[index]  # (B, C, H, W), (B,)
        if use_dsa:
            images = apply_params(images, *plans[i], dsa_params)
        logits = model(images)  # (B, classes)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Summed on the device so the loop never waits for the GPU.
        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(1) == labels).sum()
    return float(loss_sum) / len(x), float(correct) / len(x)


def train_convnet(train_x: torch.Tensor, train_y: torch.Tensor, *, num_classes: int, channel: int,
                  im_size: Sequence[int], epochs: int = 1000, lr: float = 0.01, momentum: float = 0.9,
                  weight_decay: float = 5e-4, batch_size: int = CHALLENGE_BATCH, dsa: bool = True, device,
                  generator: torch.Generator | None = None, init_seed: int | None = None,
                  net_width: int = 128, net_depth: int = 3, dsa_params: DSAParams = DSAParams(),
                  on_epoch: EpochCallback | None = None, log_every: int = 50, log_prefix: str = "",
                  state: EvaluationState | None = None, round_index: int = 0) -> ConvNet:
    """Train a fresh challenge ConvNet on normalised images with the reference schedule; returns it.

    ``generator`` (CPU or on ``device``) drives shuffling and DSA; ``init_seed`` the initial weights;
    both default to the global RNGs (the reference uses no seeds). ``on_epoch`` gets a dict per pass:
    epoch, lr, loss, acc, seconds, optimizer, model. With ``state`` the round ``round_index``
    continues from its newest saved epoch and saves every ``state.every`` epochs.
    """
    shape = (channel, int(im_size[0]), int(im_size[1]))
    check_split("training", train_x, train_y, num_classes, shape)
    model = new_model(num_classes, channel, im_size, net_width, net_depth, init_seed).to(device)
    x = train_x.to(device=device, dtype=torch.float32)  # (N, C, H, W)
    y = train_y.to(device=device, dtype=torch.long)  # (N,)
    optimizer = sgd(model, lr, momentum, weight_decay)
    first = 0
    saved = state.load_epoch(round_index) if state is not None else None
    if saved is not None:
        first, lr = saved["epoch"] + 1, saved["lr"]
        optimizer = restore(saved, model, generator, lr, momentum, weight_decay)
        log.info("%sresumed after epoch %d of %d", log_prefix, saved["epoch"], epochs)
    began = time.perf_counter()
    for epoch in range(first, epochs + 1):
        loss, acc = _train_epoch(model, optimizer, x, y, batch_size, dsa, dsa_params, generator)
        seconds = time.perf_counter() - began
        info = dict(epoch=epoch, lr=optimizer.param_groups[0]["lr"], loss=loss, acc=acc, seconds=seconds)
        if on_epoch is not None:
            on_epoch({**info, "optimizer": optimizer, "model": model})
        if log_every and (epoch % log_every == 0 or epoch == epochs):
            eta = seconds / (epoch + 1) * (epochs - epoch)
            log.info("%sepoch %d/%d lr %.4g loss %.4f train acc %.4f (%.0f s, ETA %.0f s)",
                     log_prefix, epoch, epochs, info["lr"], loss, acc, seconds, eta)
        if epoch == lr_drop_epoch(epochs):
            lr *= 0.1
            optimizer = sgd(model, lr, momentum, weight_decay)  # re-created, as the reference does
        if state is not None and state.due(epoch) and epoch < epochs:
            state.save_epoch(round_index, epoch, model, optimizer, lr, generator)
    return model


def restore(saved: dict, model, generator, lr: float, momentum: float, weight_decay: float):
    """Model weights, generator state and a new SGD optimizer with the saved momentum buffers."""
    model.load_state_dict(saved["model"])
    optimizer = sgd(model, lr, momentum, weight_decay)
    optimizer.load_state_dict(saved["optimizer"])
    if generator is not None and saved["generator"] is not None:
        generator.set_state(saved["generator"])
    return optimizer


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device,
                      batch_size: int = 1024) -> float:
    """Top-1 accuracy (fraction) on the whole set, in eval mode, batch by batch."""
    model.eval()
    correct = torch.zeros((), device=device)
    for start in range(0, len(x), batch_size):
        images = x[start:start + batch_size].to(device=device, dtype=torch.float32)  # (B, C, H, W)
        labels = y[start:start + batch_size].to(device)  # (B,)
        correct += (model(images).argmax(1) == labels).sum()
    return float(correct) / len(x)


def check_rounds(rounds: int, epochs: int, round_indices) -> None:
    """At least one round, no negative epochs, and one index tensor per round when subsets are given."""
    if rounds < 1 or epochs < 0:
        raise DiffdistillError(f"rounds must be >= 1 and epochs >= 0, got rounds={rounds}, epochs={epochs}")
    if round_indices is not None and len(round_indices) != rounds:
        raise DiffdistillError(f"round_indices: one index tensor per round expected, got {len(round_indices)} for {rounds}")


def round_seeds(seed: int | None, rounds: int) -> list[tuple[int | None, torch.Generator | None]]:
    """Per round: (init seed, generator for shuffling and DSA), independent streams; none without a seed."""
    if seed is None:
        return [(None, None)] * rounds
    states = [child.generate_state(2) for child in np.random.SeedSequence(seed).spawn(rounds)]
    return [(int(init), torch.Generator().manual_seed(int(data))) for init, data in states]


def train_and_evaluate(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       *, num_classes: int, channel: int, im_size: Sequence[int], epochs: int = 1000,
                       rounds: int = 3, device, seed: int | None = None,
                       round_indices: Sequence[torch.Tensor] | None = None, on_epoch: EpochCallback | None = None,
                       state: EvaluationState | None = None, **train_kwargs) -> dict:
    """``rounds`` fresh ConvNets trained on (train_x, train_y), each tested on the whole test set.

    ``round_indices[r]`` (optional) picks round r's training images from train_x, e.g. a fresh random
    real subset per round. ``train_kwargs`` go to :func:`train_convnet` (lr, momentum, weight_decay,
    batch_size, dsa, log_every, net_width, net_depth, dsa_params). ``on_epoch`` also gets the round
    index. With ``state`` finished rounds are taken from it and a running one continues (see
    :mod:`diffdistill.evaluation.state`). Returns mean, std, accuracies (fractions), epochs, rounds,
    train_size, seconds (and per round), resumed_rounds.
    """
    check_split("test", test_x, test_y, num_classes, (channel, int(im_size[0]), int(im_size[1])))
    check_rounds(rounds, epochs, round_indices)
    accuracies, times = [], []
    finished = state.finished_rounds() if state is not None else {}
    for r, (init_seed, generator) in enumerate(round_seeds(seed, rounds)):
        if r in finished:
            accuracies.append(finished[r]["accuracy"])
            times.append(finished[r]["seconds"])
            log.info("round %d/%d: test accuracy %.4f (finished by an earlier run)", r + 1, rounds, accuracies[-1])
            continue
        began = time.perf_counter()
        pick = slice(None) if round_indices is None else round_indices[r]
        callback = None if on_epoch is None else (lambda info, r=r: on_epoch({**info, "round": r}))
        model = train_convnet(train_x[pick], train_y[pick], num_classes=num_classes, channel=channel,
                              im_size=im_size, epochs=epochs, device=device, generator=generator,
                              init_seed=init_seed, on_epoch=callback, log_prefix=f"round {r + 1}/{rounds} ",
                              state=state, round_index=r, **train_kwargs)
        accuracies.append(evaluate_accuracy(model, test_x, test_y, device))
        times.append(time.perf_counter() - began)
        if state is not None:
            state.finish_round(r, accuracies[-1], times[-1])
        log.info("round %d/%d: test accuracy %.4f (%.0f s; ETA %.0f s)", r + 1, rounds, accuracies[-1],
                 times[-1], np.mean(times) * (rounds - r - 1))
    train_size = len(train_x) if round_indices is None else len(round_indices[0])
    return dict(mean=float(np.mean(accuracies)), std=float(np.std(accuracies)), accuracies=accuracies,
                epochs=epochs, rounds=rounds, train_size=train_size, seconds=float(sum(times)),
                seconds_per_round=times, resumed_rounds=sorted(finished))
