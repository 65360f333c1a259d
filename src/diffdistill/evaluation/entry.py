"""The one entry of an evaluation: the challenge protocol's rounds, by whichever evaluator is faster
on the device (rounds stacked into one network on a GPU, one after another on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from diffdistill import settings
from diffdistill.evaluation import protocol, stacked_rounds
from diffdistill.settings import setting, stage_gpus


@dataclass
class EvaluationSettings:
    """The challenge protocol's settings (docs/reference.md, "Challenge protocol"). The ``resume``
    ones decide, with the training set, whether saved rounds may be continued."""

    epochs: int = setting(minimum=1, flag=False, description="ConvNet epochs for the IPC-sized sets (challenge 1000)")
    pool_epochs: int = setting(minimum=1, flag=False, description=(
        "ConvNet epochs for the large sets (full pool, full real)"))
    rounds: int = setting(minimum=1, resume=True, description="fresh initialisations; mean and std are reported")
    batch_size: int = setting(protocol.CHALLENGE_BATCH, minimum=1, resume=True, description="SGD batch")
    gpus: int | None = stage_gpus()
    budget_fractions: list[float] = setting([], exclusive_minimum=0, maximum=1, unique=True, flag=False, description=(
        "budget curve: the pool's images made within each fraction of sampling.budget_s (each shard by its own "
        "clock), each set evaluated like the pool at pool_epochs and rounds, one job each; [] = off"))
    ars: bool = setting(False, flag=False, description=(
        "also evaluate each distilled set and its random real subsets without DSA, for the field's "
        "augmentation-robust score (ARS); doubles the IPC-sized evaluations"))

    def __post_init__(self):
        settings.check(self, "evaluation settings")


def pays_on(device) -> bool:
    """Whether stacking rounds is the faster evaluator on ``device``: on a CUDA GPU (3.3-5.6x the
    organisers' loop on the digits against 1.1-2.3x for rounds one after another, docs/results.md,
    "Evaluation speed and host memory"); not on a CPU, where the convolutions' arithmetic is the cost
    and oneDNN runs grouped ones more slowly than plain ones (:mod:`diffdistill.evaluation.stacked_rounds`)."""
    return torch.device(device).type == "cuda"


def run_rounds(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
               test_y: torch.Tensor, *, channel: int, im_size: Sequence[int], rounds: int, device,
               batch_size: int = protocol.CHALLENGE_BATCH, net_width: int = 128, net_depth: int = 3,
               **kwargs) -> dict:
    """The rounds of the challenge protocol by the faster evaluator on ``device`` (:func:`pays_on`):
    stacked, in chunks that fit the free memory, or one after another. Both train each round alike
    (to float tolerance); the result's ``rounds_at_once`` says how many rounds trained together."""
    common = dict(channel=channel, im_size=im_size, rounds=rounds, device=device, batch_size=batch_size,
                  net_width=net_width, net_depth=net_depth, **kwargs)
    if not pays_on(device):
        return {**protocol.train_and_evaluate(train_x, train_y, test_x, test_y, **common), "rounds_at_once": 1}
    shape = (channel, int(im_size[0]), int(im_size[1]))
    free = stacked_rounds.free_memory(device)
    at_once = stacked_rounds.rounds_that_fit(rounds, batch_size, shape, net_width, net_depth, free)
    result = stacked_rounds.train_and_evaluate_stacked(train_x, train_y, test_x, test_y,
                                                       max_rounds_per_chunk=at_once, **common)
    return {**result, "rounds_at_once": at_once}
