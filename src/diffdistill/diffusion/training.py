"""Training and fine-tuning of a U-ViT noise predictor: resumable, EMA, warmup, bf16, DDP.

Determinism without saved RNG state: every random draw of optimizer step k (the global batch's
sample indices, flips, t, noise and label dropout) comes from generators seeded by (seed, k), and
the sample order from an epoch permutation seeded by (seed, epoch). A run resumed from a checkpoint
therefore replays exactly the draws of an uninterrupted run. Under DDP every rank draws the same
global batch and keeps its contiguous slice (gradient accumulation splits that slice the same way),
so N processes with global batch B follow the trajectory of one process with batch B, up to the
order of the fp32 gradient reduction.

Learning rate (U-ViT recipe, docs/reference.md, "U-ViT"): optimizer step k (counted from 1) uses
``lr * min(k / warmup_steps, 1)``, i.e. a linear ramp from 0 that reaches ``lr`` at step
``warmup_steps`` and stays constant. AdamW decays all parameters. The EMA (fp32) is updated after
every optimizer step: ``ema = rate * ema + (1 - rate) * param``; buffers are copied.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from diffdistill import settings
from diffdistill.data import LabeledImages, to_model_range
from diffdistill.diffusion.checkpoint import load_checkpoint, save_checkpoint
from diffdistill.diffusion.schedule import TIME_SCALE, VPSchedule
from diffdistill.errors import DiffdistillError
from diffdistill.resume import JobKey
from diffdistill.settings import setting
from diffdistill.speed import tf32

log = logging.getLogger(__name__)

# Seed-sequence streams, so that the epoch permutations and the per-step draws never share a seed.
_STREAM_EPOCH, _STREAM_STEP = 0, 1


@dataclass
class TrainConfig:
    """Training settings, plain types only (they go into every checkpoint); defaults: the default run's
    fine-tuning (config/config.yaml; U-ViT's CIFAR-10 recipe is lr 2e-4, warmup 2500, EMA 0.9999, hflip).
    The ``resume`` settings change the training trajectory: a checkpoint written with other values is
    not continued (diffdistill.resume); the others (the steps: extending a run is fine; how the same
    global batch is computed; logging) may change between runs."""

    total_steps: int = setting(minimum=1)
    checkpoint_steps: list[int] = setting([], minimum=1, unique=True,
                                          description="steps that keep a checkpoint; the last step always does")
    batch_size: int = setting(128, minimum=1, resume=True,
                              description="global: summed over processes and accumulation micro-batches")
    grad_accum: int = setting(1, minimum=1)
    lr: float = setting(2e-3, exclusive_minimum=0, resume=True, description="after a linear warmup, constant")
    betas: tuple[float, float] = setting((0.99, 0.999), minimum=0, exclusive_maximum=1, resume=True)
    weight_decay: float = setting(0.03, minimum=0, resume=True)
    warmup_steps: int = setting(100, minimum=0, resume=True)
    ema_rate: float = setting(0.995, minimum=0, maximum=1, resume=True)
    label_dropout: float = setting(0.1, minimum=0, exclusive_maximum=1, resume=True, description=(
        "labels replaced by the null class this often (classifier-free guidance); pretrained.training: 0"))
    hflip: bool = setting(False, resume=True, description="horizontal flips (not for digits: not mirror-symmetric)")
    seed: int = setting(0, minimum=0, resume=True, config=False)
    t_min: float = setting(1e-5, minimum=0, exclusive_maximum=1, resume=True,
                           description="training times t ~ U(t_min, 1): a small eps keeps the noise level off 0")
    bf16: bool = setting(True, config=False, description="autocast on CUDA only; CPU runs stay in fp32")
    log_every: int = setting(100, minimum=1, config=False)
    compile: bool = setting(False, description="torch.compile of the network (forward and backward)")
    fused_adamw: bool = setting(False, description="AdamW's fused kernel")
    tf32: bool = setting(False, description="TF32 tensor cores for fp32 matmuls (CUDA only)")
    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.checkpoint_steps = sorted({int(s) for s in self.checkpoint_steps} | {int(self.total_steps)})
        settings.check(self, "training config")
        if self.checkpoint_steps[-1] != self.total_steps:
            raise DiffdistillError(f"training config: checkpoint_steps {self.checkpoint_steps} go past "
                                   f"total_steps {self.total_steps}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainingJob:
    """A training block's keys for the scheduler and the launcher (no trainer flags); defaults: fine-tuning's."""

    gpus: int = setting(0, minimum=0, flag=False, description="GPUs (torchrun processes) for the job; 0 = CPU")
    processes: int = setting(1, minimum=1, flag=False, description="torchrun processes when gpus is 0 (CPU, gloo)")
    runtime_min: int = setting(1440, minimum=1, flag=False, description="the job's time limit on a cluster, minutes")
    mem_mb: int = setting(32000, minimum=256, flag=False, description="the job's memory on a cluster, MB")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (counted from 1): linear warmup, then constant."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(step / config.warmup_steps, 1.0)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """``ema = rate * ema + (1 - rate) * model`` for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - rate)  # lerp is exact at weight 1 (rate 0: ema = model)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def checkpoint_paths_in(directory: str | os.PathLike, steps) -> dict[int, Path]:
    """The conventional checkpoint files ``DIR/step_{step:07d}.pt`` for the given steps."""
    return {int(s): Path(directory) / f"step_{int(s):07d}.pt" for s in steps}


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    """Where this process sits in a torchrun job; world_size 1 without torchrun."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed_context(device: str | torch.device) -> Iterator[DistContext]:
    """Join the torchrun job described by WORLD_SIZE / RANK / LOCAL_RANK (gloo on CPU, nccl on CUDA).

    On CUDA each process takes the GPU of its LOCAL_RANK. Without torchrun (or WORLD_SIZE 1) this is
    a single-process context. A process group this context starts is destroyed on exit.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world <= 1 or dist.is_initialized():
        yield DistContext(device, world, rank, local)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    log.info("process group %s: rank %d of %d, device %s", backend, rank, world, device)
    try:
        yield DistContext(device, world, rank, local)
    finally:
        dist.destroy_process_group()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _device_ids(device: torch.device) -> list[int] | None:
    if device.type != "cuda":
        return None
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- random draws


def _seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class StepDraws:
    """All random draws of one optimizer step for the whole global batch (B samples)."""

    index: torch.Tensor  # (B,) int64 sample indices into the data set
    flip: torch.Tensor  # (B,) bool horizontal flips
    t: torch.Tensor  # (B,) continuous times in [t_min, 1)
    noise: torch.Tensor  # (B, C, H, W) standard normal
    drop: torch.Tensor  # (B,) bool label dropped to the null class


class BatchSampler:
    """Draws step k's global batch from generators seeded by (seed, k) and (seed, epoch)."""

    def __init__(self, config: TrainConfig, num_images: int, image_shape, device: torch.device):
        self.config, self.num_images = config, num_images
        self.image_shape, self.device = tuple(image_shape), device
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one cached epoch: consecutive steps mostly share it
            g = torch.Generator().manual_seed(_seed(self.config.seed, _STREAM_EPOCH, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_images, generator=g)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Sample positions (step-1)*B .. step*B-1 of the endless sequence of epoch permutations."""
        B, N = self.config.batch_size, self.num_images
        positions = torch.arange((step - 1) * B, step * B)  # (B,)
        epochs = positions // N
        out = torch.empty(B, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % N]
        return out

    def draw(self, step: int) -> StepDraws:
        c, B = self.config, self.config.batch_size
        g = torch.Generator(device=self.device).manual_seed(_seed(c.seed, _STREAM_STEP, step))
        kw = dict(generator=g, device=self.device)
        flip = torch.rand(B, **kw) < 0.5  # (B,)
        t = torch.rand(B, **kw) * (1.0 - c.t_min) + c.t_min  # (B,)
        noise = torch.randn((B, *self.image_shape), **kw)  # (B, C, H, W)
        drop = torch.rand(B, **kw) < c.label_dropout  # (B,)
        return StepDraws(self.indices(step).to(self.device), flip & c.hflip, t, noise, drop)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run: model (DDP-wrapped when distributed), fp32 EMA, AdamW, data on the device."""

    def __init__(self, model: nn.Module, data: LabeledImages, config: TrainConfig, device: torch.device):
        self.config, self.device = config, device
        self.world, self.rank = _world()
        self.model = model.to(device)
        # DDP broadcasts rank 0's weights at construction, so the EMA copy is taken afterwards.
        self.net = nn.parallel.DistributedDataParallel(model, device_ids=_device_ids(device)) if self.world > 1 else model
        self.ema = copy.deepcopy(model).float().requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay, fused=config.fused_adamw or None)
        if config.compile:  # the EMA and the checkpoints keep using the plain module's parameters
            self.net = torch.compile(self.net)
        self.images = data.images.to(device)  # (N, C, H, W) uint8, indexed per micro-batch
        self.labels = data.labels.to(device) if model.num_classes > 0 else None  # (N,)
        self.null_label = model.null_label
        self.sampler = BatchSampler(config, len(data), data.images.shape[1:], device)
        self.schedule = VPSchedule()
        self.autocast = config.bf16 and device.type == "cuda"

    def load_state(self, ckpt: Mapping) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def _clean_images(self, draws: StepDraws, rows: slice) -> torch.Tensor:
        x0 = to_model_range(self.images[draws.index[rows]])  # (b, C, H, W) in [-1, 1]
        return torch.where(draws.flip[rows].view(-1, 1, 1, 1), x0.flip(-1), x0)

    def micro_loss(self, draws: StepDraws, rows: slice) -> torch.Tensor:
        """Noise-prediction MSE of the global-batch rows ``rows``, from the pre-drawn randomness."""
        x0 = self._clean_images(draws, rows)  # (b, C, H, W) in [-1, 1]
        t, noise = draws.t[rows], draws.noise[rows]  # (b,), (b, C, H, W)
        x_t = self.schedule.add_noise(x0, t, noise)  # (b, C, H, W)
        y = None
        if self.labels is not None:
            y = self.labels[draws.index[rows]]  # (b,)
            if self.null_label is not None:
                y = torch.where(draws.drop[rows], torch.full_like(y, self.null_label), y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            prediction = self.net(x_t, t * TIME_SCALE, y)  # (b, C, H, W)
        return F.mse_loss(prediction.float(), noise)

    def step(self, step: int) -> torch.Tensor:
        """Optimizer step ``step`` (from 1); returns this rank's mean loss as a 0-d tensor."""
        draws = self.sampler.draw(step)
        local = self.config.batch_size // self.world
        micro = local // self.config.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i in range(self.config.grad_accum):
            start = self.rank * local + i * micro
            last = i == self.config.grad_accum - 1
            # Gradients are all-reduced only on the last micro-batch; DDP averages over ranks, and
            # dividing by grad_accum makes the result the mean over the global batch.
            sync = contextlib.nullcontext() if last or self.world == 1 else self.net.no_sync()
            with sync:
                loss = self.micro_loss(draws, slice(start, start + micro)) / self.config.grad_accum
                loss.backward()
            total += loss.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.config)
        self.optimizer.step()
        update_ema(self.ema, self.model, self.config.ema_rate)
        return total

    def global_mean(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return float(value)


class _Progress:
    """Windowed mean loss, images/s and ETA, logged every ``log_every`` steps and at the end."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.config = trainer, trainer.config
        self.window_loss = torch.zeros((), device=trainer.device)
        self.window_steps, self.window_start = 0, time.perf_counter()
        self.history: list[dict] = []

    def update(self, step: int, loss: torch.Tensor) -> None:
        self.window_loss += loss
        self.window_steps += 1
        if step % self.config.log_every and step != self.config.total_steps:
            return
        mean = self.trainer.global_mean(self.window_loss) / self.window_steps  # collective on all ranks
        seconds = time.perf_counter() - self.window_start
        per_step = seconds / self.window_steps
        rate = self.config.batch_size / per_step
        eta = per_step * (self.config.total_steps - step)
        self.history.append({"step": step, "loss": mean, "images_per_s": rate})
        if self.trainer.rank == 0:
            log.info("step %d/%d  loss %.4f  %.1f img/s  lr %.2e  ETA %s", step, self.config.total_steps, mean,
                     rate, lr_at(step, self.config), _hms(eta))
        self.window_loss.zero_()
        self.window_steps, self.window_start = 0, time.perf_counter()

    @property
    def last_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- checks and resume


def _run_config(model: nn.Module, data: LabeledImages, config: TrainConfig) -> dict:
    """What goes into every checkpoint: model, settings, data and the job's key (:func:`_job_key`)."""
    data_info = {"name": data.name, "classes": list(data.classes), "num_images": len(data)}
    return {"model": dict(model.config), "training": config.to_dict(), "data": data_info,
            "job_key": _job_key(model, data, config).to_dict()}


def _job_key(model: nn.Module, data: LabeledImages, config: TrainConfig) -> JobKey:
    """What a checkpoint must have been made with to be continued: the same network and settings of the
    trajectory (the ``resume`` settings of :class:`TrainConfig`), and the same input data: the training
    images and the initial weights (the pretrained file and the seeded fresh layers), as the model comes
    in before training."""
    keys = settings.resume_keys(TrainConfig)
    trajectory = {"model": dict(model.config), **{key: getattr(config, key) for key in keys}}
    return JobKey.of(trajectory, data.images, data.labels, list(data.classes), *model.state_dict().values())


def _check_inputs(model, data: LabeledImages, config: TrainConfig, paths: Mapping, world: int) -> None:
    if sorted(paths) != config.checkpoint_steps:
        raise DiffdistillError(f"checkpoint paths are given for steps {sorted(paths)}, "
                               f"but checkpoint_steps is {config.checkpoint_steps}")
    if config.batch_size % (world * config.grad_accum):
        raise DiffdistillError(f"batch_size {config.batch_size} is not divisible by world_size {world} "
                               f"x grad_accum {config.grad_accum}")
    mc = model.config
    expected = (mc["in_chans"], mc["img_size"], mc["img_size"])
    if len(data) == 0 or tuple(data.images.shape[1:]) != expected:
        raise DiffdistillError(f"data set {data.name!r}: images {tuple(data.images.shape)}, the model expects "
                               f"(N>0, {', '.join(map(str, expected))})")
    if model.num_classes > 0:
        if int(data.labels.max()) >= model.num_classes or int(data.labels.min()) < 0:
            raise DiffdistillError(f"data set {data.name!r}: labels span {int(data.labels.min())}.."
                                   f"{int(data.labels.max())}, the model has num_classes {model.num_classes}")
        if config.label_dropout > 0 and model.null_label is None:
            raise DiffdistillError(f"label_dropout {config.label_dropout} needs a model with a null class "
                                   "(null_class=True)")


def _find_resume(paths: Mapping[int, Path], run_config: dict) -> dict | None:
    """The newest readable checkpoint among ``paths`` made by this job (same key), None if there is none.

    A checkpoint of other settings or data is passed over (logged) and overwritten when this run reaches
    its step, not moved aside: each checkpoint carries its own key, so a folder holding both (a changed
    run killed half-way) still resumes only from this job's own, and the older steps of a fitting
    checkpoint were all written by the same job on its way there.
    """
    key = JobKey(**run_config["job_key"])
    for step in sorted(paths, reverse=True):
        path = Path(paths[step])
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except DiffdistillError as err:
            log.warning("ignoring unreadable checkpoint: %s", err)
            continue
        if int(ckpt["step"]) != step:
            raise DiffdistillError(f"{path}: holds step {ckpt['step']}, expected step {step}")
        if key.fits(ckpt.get("config", {}).get("job_key"), str(path)):
            ckpt["path"] = str(path)
            return ckpt
    return None


def _report_dict(report) -> dict | None:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    return {"summary": str(report)}


# ----------------------------------------------------------------------------- entry point


def train(model: nn.Module, data: LabeledImages, config: TrainConfig, checkpoint_paths: Mapping[int, str | os.PathLike],
          *, device: str | torch.device, resume: bool = True, init_report=None) -> dict:
    """Train ``model`` (in place) on ``data``, writing a checkpoint at every configured step.

    With ``resume`` the newest complete checkpoint among ``checkpoint_paths`` (step -> file) is
    continued; when the last one exists nothing is trained (``model`` just gets its weights). Runs under DDP when a process group is
    initialised (see :func:`distributed_context`); only rank 0 writes. Returns a summary dict.
    """
    device = torch.device(device)
    world, _ = _world()
    paths = {int(s): Path(p) for s, p in checkpoint_paths.items()}
    _check_inputs(model, data, config, paths, world)
    run_config = _run_config(model, data, config)
    ckpt = _find_resume(paths, run_config) if resume else None
    start = int(ckpt["step"]) if ckpt else 0
    summary = {"world_size": world, "start_step": start, "resumed_from": ckpt["path"] if ckpt else None,
               "init_report": _report_dict(init_report), "checkpoints": {s: str(p) for s, p in paths.items()}}
    if start >= config.total_steps:
        log.info("all %d checkpoints exist (%s): nothing to train", len(paths), ckpt["path"])
        model.load_state_dict(ckpt["model"])  # the caller gets the final weights either way
        extra = ckpt.get("extra") or {}
        return {**summary, "final_step": start, "steps_run": 0, "final_loss": extra.get("loss"),
                "images_per_s": None, "train_seconds": 0.0, "loss_history": []}
    trainer = Trainer(model, data, config, device)
    if ckpt:
        trainer.load_state(ckpt)
        log.info("resuming from %s at step %d", ckpt["path"], start)
    del ckpt
    return {**summary, **_loop(trainer, start, paths, run_config, summary["init_report"])}


def _loop(trainer: Trainer, start: int, paths: Mapping[int, Path], run_config: dict, init_report) -> dict:
    config = trainer.config
    progress = _Progress(trainer)
    t0 = time.perf_counter()
    trainer.model.train()
    with tf32(config.tf32, trainer.device):
        _steps(trainer, start, paths, run_config, init_report, progress)
    seconds = time.perf_counter() - t0
    steps = config.total_steps - start
    return {"final_step": config.total_steps, "steps_run": steps, "final_loss": progress.last_loss,
            "images_per_s": steps * config.batch_size / seconds if seconds > 0 else math.nan,
            "train_seconds": seconds, "loss_history": progress.history}


def _steps(trainer: Trainer, start: int, paths: Mapping[int, Path], run_config: dict, init_report,
           progress: _Progress) -> None:
    config = trainer.config
    for step in range(start + 1, config.total_steps + 1):
        progress.update(step, trainer.step(step))
        if step in paths:
            if trainer.rank == 0:
                extra = {"loss": progress.last_loss, "init_report": init_report, "world_size": trainer.world}
                save_checkpoint(paths[step], model=trainer.model, step=step, config=run_config, ema=trainer.ema,
                                optimizer=trainer.optimizer, extra=extra)
                log.info("checkpoint step %d -> %s", step, paths[step])
            _barrier(trainer.world)  # no rank runs ahead (or exits) before the file is complete
