"""Sampling labelled images from a trained class-conditional U-ViT, one batch or against a time budget.

:func:`generate` is the one place that turns (model, labels, solver settings) into uint8 images; the
budgeted sampler (Track 2 of the challenge, docs/reference.md, "Challenge protocol") and the scoring stage both call it.

:func:`sample_budgeted` samples class-balanced batches until a wall-clock budget would be overrun.
The clock starts at the first sampling batch, after the model is loaded (one participant's harness
measured the 10 minutes that way); the caller times loading separately. Before each batch its
duration is estimated from the batches already done and the batch is only started when it is
expected to finish inside the budget, so every kept image was made within the budget (up to the
estimate's error) and no finished batch is thrown away.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from diffdistill import settings, speed
from diffdistill.data import from_model_range
from diffdistill.diffusion import dpm_solver
from diffdistill.diffusion.guidance import guided_noise_fn
from diffdistill.diffusion.modes import ModePull, balanced_mode_indices
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling_summary import BatchTime, ShardRun
from diffdistill.errors import DiffdistillError
from diffdistill.settings import setting, stage_gpus

log = logging.getLogger(__name__)

BUDGET_S = 600.0  # the challenge's 10 minutes of generation (docs/reference.md, "Challenge protocol")


@dataclass
class SamplingSettings:
    """The budgeted sampling stage (the sampler itself: :class:`SamplerSettings`)."""

    budget_s: float = setting(BUDGET_S, exclusive_minimum=0, description=(
        "seconds of sampling, counted from the first batch after model loading (the challenge: 600)"))
    batch_size: int = setting(500, minimum=1)
    max_images: int | None = setting(None, minimum=1, description=(
        "cap on the pool size; null: whatever fits the budget"))
    shards: int = setting(1, minimum=1, flag=False, description=(
        "independent sampling jobs, each with its share of the classes and its own seed; 1 = the challenge's "
        "single-GPU rule"))
    runtime_min: int = setting(30, minimum=1, flag=False, description="each job's time limit on a cluster, minutes")
    gpus: int | None = stage_gpus()
    seed: int | None = setting(None, minimum=0, flag=False, description=(
        "the pool's draw: the sampling jobs' seed; null: derived from the run's seed. Another value draws a new "
        "pool from the same fine-tuned model and reruns only sampling, packages and their evaluations"))

    def __post_init__(self):
        settings.check(self, "sampling settings")


def image_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images a U-ViT makes, from its constructor config."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "in_chans" not in config or "img_size" not in config:
        raise DiffdistillError("model has no U-ViT config with 'in_chans' and 'img_size'")
    return config["in_chans"], config["img_size"], config["img_size"]


def generate(
    model: torch.nn.Module,
    labels: torch.Tensor,
    settings: SamplerSettings,
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    mode_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One batch: x_T ~ N(0, I), DPM-Solver on the guided noise prediction -> uint8 (N, C, H, W) on CPU.

    The noise comes from ``generator`` (which must live on ``device``), else from a fresh generator
    seeded with ``seed``, else from torch's global generator. The model is used as it is (the caller
    puts it in eval mode on ``device``). ``mode_targets`` (N, C, H, W) in [-1, 1]: each image's mode,
    needed with ``settings.mode_guidance`` > 0 and unused without.
    """
    device = torch.device(device)
    settings = settings.on_device(device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    labels = labels.to(device=device, dtype=torch.long)  # (N,)
    try:
        noise_fn = guided_noise_fn(model, labels, settings.guidance_scale,
                                   null_label=getattr(model, "null_label", None),
                                   autocast_dtype=settings.autocast_dtype)
    except ValueError as err:  # guidance asked of a model without a null class
        raise DiffdistillError(f"guidance_scale: {err}") from err
    shape = (labels.shape[0], *image_shape(model))
    pull = mode_pull(settings, mode_targets, shape, device)
    with torch.inference_mode(), speed.tf32(settings.precision == "tf32", device):
        x_T = torch.randn(shape, generator=generator, device=device)  # (N, C, H, W)
        x_0 = dpm_solver.sample(
            noise_fn, x_T, steps=settings.steps, order=settings.order, method=settings.method,
            algorithm=settings.algorithm, skip_type=settings.skip_type, t_start=1.0, t_end=settings.t_end,
            x0_pull=pull,
        )  # (N, C, H, W) in [-1, 1]
        # NaN would become arbitrary pixel values: refuse the batch (seen with torch.compile's CPU code
        # when ATEN_CPU_CAPABILITY holds ATen below the CPU's own vector width).
        if not bool(torch.isfinite(x_0).all()):
            raise DiffdistillError(f"the sampler produced non-finite values (NaN or inf) in a batch of {shape[0]} "
                                   "images; nothing of it is kept (one known cause: a compiled network, "
                                   "sampler.compile)")
        # .cpu() also waits for the device, so the caller's clock sees the batch as finished.
        return from_model_range(x_0).cpu()


def mode_pull(settings: SamplerSettings, mode_targets: torch.Tensor | None, shape: tuple, device) -> ModePull | None:
    """The solver's pull towards ``mode_targets`` under these settings; None without mode guidance."""
    if settings.mode_guidance == 0:
        return None
    if mode_targets is None or tuple(mode_targets.shape) != tuple(shape):
        got = None if mode_targets is None else tuple(mode_targets.shape)
        raise DiffdistillError(f"sampler key mode_guidance {settings.mode_guidance} needs one mode per image, "
                               f"shape {tuple(shape)}, got {got}")
    return ModePull(mode_targets.to(device=device, dtype=torch.float32), float(settings.mode_guidance),
                    settings.guided_evaluations)


def mode_targets_of(modes: torch.Tensor | None, labels: torch.Tensor, offset: int = 0) -> torch.Tensor | None:
    """Each image's mode for :func:`balanced_labels` ``labels`` (same ``offset``) from ``modes``
    (num_classes, k, C, H, W): image i of a class gets mode i mod k; None without modes."""
    if modes is None:
        return None
    index = balanced_mode_indices(modes.shape[0], labels.numel(), modes.shape[1], offset)  # (N,)
    return modes[labels.cpu(), index]  # (N, C, H, W)


def balanced_labels(num_classes: int, n: int, offset: int = 0) -> torch.Tensor:
    """Labels (offset + i) mod K for i < n: any prefix of the sequence has class counts within 1."""
    if num_classes < 1 or n < 0:
        raise DiffdistillError(f"balanced_labels: need num_classes >= 1 and n >= 0, got {num_classes}, {n}")
    return (torch.arange(n, dtype=torch.long) + offset) % num_classes  # (n,)


@dataclass
class BudgetResult:
    """What a budgeted run made: images, labels, per-class counts, speed and per-batch timings."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    counts: list[int]
    images_per_s: float
    sampling_s: float
    batches: list[BatchTime] = field(default_factory=list)  # every finished batch
    batch_size_final: int = 0
    dropped_images: int = 0  # made after the budget ran out, not kept
    compile_s: float | None = None  # torch.compile's first call (sampler compile), inside sampling_s

    def __len__(self) -> int:
        return self.images.shape[0]

    def shard_run(self, *, shard: int, seed: int, load_s: float, device_name: str) -> ShardRun:
        """Everything but the tensors, as one shard's entry of a :class:`SamplingSummary`."""
        return ShardRun(shard=shard, seed=seed, counts=self.counts, sampling_s=self.sampling_s, load_s=load_s,
                        device_name=device_name, dropped_images=self.dropped_images,
                        batch_size_final=self.batch_size_final, batches=self.batches,
                        compile_s=self.compile_s)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA out-of-memory, whichever way torch reports it."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


def generate_halving(model, labels, settings, *, device, generator, batch_size: int, mode_targets=None):
    """:func:`generate` in chunks of ``batch_size``; on out-of-memory halve it and redo the same labels.

    Returns (uint8 images, the batch size that worked). The generator state is rewound before a
    retry so that a retry draws the same noise stream as the failed attempt. ``mode_targets``: as
    for :func:`generate`, one per label.
    """
    state = generator.get_state() if generator is not None else None
    while True:
        try:
            label_parts = labels.split(batch_size)
            target_parts = [None] * len(label_parts) if mode_targets is None else mode_targets.split(batch_size)
            parts = [generate(model, part, settings, device=device, generator=generator, mode_targets=targets)
                     for part, targets in zip(label_parts, target_parts)]
            return torch.cat(parts), batch_size
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if batch_size <= 1:
                raise DiffdistillError(f"out of memory on {device} even at batch size 1: {err}") from err
            log.warning("out of memory at batch size %d; retrying the same labels at %d",
                        batch_size, batch_size // 2)
            batch_size //= 2
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            if state is not None:
                generator.set_state(state)


def estimate_batch_s(batches: list[BatchTime], size: int) -> float:
    """Expected seconds for a batch of ``size`` from the per-image time of the finished batches.

    The first batch carries one-off costs (kernel selection, torch.compile) and is left out once
    later batches exist; with none finished there is no estimate (0).
    """
    timed = batches[1:] if len(batches) > 1 else batches
    if not timed:
        return 0.0
    per_image = sum(b.seconds for b in timed) / sum(b.size for b in timed)
    return per_image * size


def sample_budgeted(
    model: torch.nn.Module,
    num_classes: int,
    settings: SamplerSettings,
    *,
    budget_s: float = BUDGET_S,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    clock: Callable[[], float] = time.perf_counter,
    max_images: int | None = None,
    label_offset: int = 0,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    modes: torch.Tensor | None = None,
) -> BudgetResult:
    """Class-balanced batches until the next one would overrun ``budget_s`` (or ``max_images``).

    ``clock`` is read at the first batch (the budget starts there) and after every batch; tests pass
    a fake clock. ``on_batch(images, labels)`` sees each kept batch (e.g. to save progress).
    ``label_offset`` shifts the class cycle (shards start at different classes). A batch that ends
    past the budget (only possible when the estimate was wrong, e.g. the first batch) was not made
    within it: it is dropped and counted in ``dropped_images``. ``modes`` (num_classes, k, C, H, W):
    the class modes of mode guidance (:func:`diffdistill.diffusion.modes.modes_for`), each class's images
    assigned to them in turn.
    """
    SamplingSettings(budget_s=budget_s, batch_size=batch_size, max_images=max_images)  # the declared ranges
    model = speed.sampling_network(model, settings.compile)  # compiled in the first batch, inside the budget
    generator = torch.Generator(device=torch.device(device)).manual_seed(int(seed))
    run = _BudgetRun(budget_s, clock, max_images, start=clock())
    while size := run.next_size(batch_size):
        batch_labels = balanced_labels(num_classes, size, offset=run.done + label_offset)  # (size,)
        targets = mode_targets_of(modes, batch_labels, offset=run.done + label_offset)
        began = clock()
        batch_images, batch_size = generate_halving(model, batch_labels, settings, device=device,
                                                    generator=generator, batch_size=batch_size,
                                                    mode_targets=targets)
        if not run.finish(batch_images, batch_labels, began):
            break
        if on_batch is not None:
            on_batch(batch_images, batch_labels)
    result = run.result(num_classes, batch_size)
    result.compile_s = getattr(model, "compile_s", None)  # compile + first forward, part of sampling_s
    return result


@dataclass
class _BudgetRun:
    """The state of one budgeted run: the clock, the finished batches and the images kept so far."""

    budget_s: float
    clock: Callable[[], float]
    max_images: int | None
    start: float
    images: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    batches: list[BatchTime] = field(default_factory=list)  # every finished batch
    done: int = 0
    dropped: int = 0
    kept_until: float = 0.0

    def next_size(self, batch_size: int) -> int:
        """The next batch's size; 0 once ``max_images`` are made or the batch would overrun the budget."""
        if self.max_images is not None and self.done >= self.max_images:
            return 0
        size = batch_size if self.max_images is None else min(batch_size, self.max_images - self.done)
        elapsed = self.clock() - self.start
        if self.batches and elapsed + estimate_batch_s(self.batches, size) > self.budget_s:
            return 0
        return size

    def finish(self, images: torch.Tensor, labels: torch.Tensor, began: float) -> bool:
        """Record a batch begun at ``began``; keep it if it ended within the budget, else drop it (False)."""
        end, size = self.clock(), labels.numel()
        # end_s: when the batch finished, in seconds from the budget clock's start (budget prefixes).
        self.batches.append(BatchTime(size=size, seconds=end - began, end_s=end - self.start))
        if end - self.start > self.budget_s:
            self.dropped = size
            log.warning("a batch of %d images ended %.1f s past the %.1f s budget: dropped", size,
                        end - self.start - self.budget_s, self.budget_s)
            return False
        self.images.append(images)
        self.labels.append(labels)
        self.done, self.kept_until = self.done + size, end - self.start
        _log_progress(self.done, self.kept_until, self.budget_s)
        return True

    def result(self, num_classes: int, batch_size: int) -> BudgetResult:
        if not self.images:
            raise DiffdistillError(f"no batch finished within the {self.budget_s} s budget (the first took "
                                   f"{self.batches[0].seconds:.1f} s): lower the batch size or raise the budget")
        all_labels = torch.cat(self.labels)  # (N,)
        return BudgetResult(
            images=torch.cat(self.images),  # (N, C, H, W)
            labels=all_labels,
            counts=torch.bincount(all_labels, minlength=num_classes).tolist(),
            images_per_s=all_labels.numel() / self.kept_until if self.kept_until > 0 else float("inf"),
            sampling_s=self.kept_until,
            batches=self.batches,
            batch_size_final=batch_size,
            dropped_images=self.dropped,
        )


def _log_progress(done: int, elapsed: float, budget_s: float) -> None:
    rate = done / elapsed if elapsed > 0 else float("inf")
    log.info("%d images, %.1f images/s, %.1f s of %.1f s left", done, rate, max(budget_s - elapsed, 0.0), budget_s)


def shard_label_offset(shard: int, num_shards: int, num_classes: int) -> int:
    """Where shard ``shard`` starts the class cycle, spreading the shards' starts over the classes so
    that the merged pool stays balanced (each shard is balanced on its own)."""
    return (shard * num_classes) // max(num_shards, 1)
