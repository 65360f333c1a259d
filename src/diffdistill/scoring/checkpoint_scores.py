"""Checkpoint scoring and selection (the paper picks its checkpoint by FID: docs/reference.md, "Method";
docs/reference.md, "FID").

Every checkpoint is scored the same way: its EMA weights sample ``num_images`` class-balanced images
from one fixed seed (so every checkpoint starts from the same noise and labels), the images go
through a feature extractor, and the Fréchet distance to the real training set's cached statistics
is the score. The score is called "FID" only with Inception features; with the evaluation ConvNet
it is "FD-ConvNet". Scores depend strongly on ``num_images``, so selection refuses to compare
scores made at different counts. Lower is better; ties go to the earliest step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from diffdistill import atomic, settings, speed
from diffdistill.diffusion import checkpoint, sampler_settings, sampling
from diffdistill.errors import DiffdistillError
from diffdistill.records import CheckpointScore
from diffdistill.scoring import fid, inception_features
from diffdistill.scoring.feature_convnet import load_feature_convnet
from diffdistill.settings import setting, stage_gpus

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["step", "score", "score_kind", "num_images", "checkpoint", "seconds"]


@dataclass
class ScoringSettings:
    """How each checkpoint is scored (its feature space:
    :class:`~diffdistill.scoring.feature_convnet.ReferenceSettings`)."""

    num_images: int = setting(minimum=2, description=(
        "samples per checkpoint: the same count and noise for every checkpoint"))
    batch_size: int = setting(minimum=1)
    gpus: int | None = stage_gpus()
    sampler: sampler_settings.SamplerSettings | None = setting(None, flag=False, schema_default=False, description=(
        "the sampler of scoring; no default: the top-level sampler when absent"))

    def __post_init__(self):
        settings.check(self, "scoring settings")


def build_extractor(kind: str, device, *, inception_weights=None, convnet_path=None):
    """The extractor named in the config: "inception" (FID) or "convnet" (FD-ConvNet, needs its file)."""
    if kind == "inception":
        return inception_features.InceptionExtractor(device, weights_path=inception_weights)
    if kind == "convnet":
        if convnet_path is None:
            raise DiffdistillError("extractor 'convnet' needs the feature ConvNet file (--convnet)")
        return load_feature_convnet(convnet_path, device)
    raise DiffdistillError(f"extractor must be one of {sorted(fid.SCORE_KINDS)}, got {kind!r}")


# --------------------------------------------------------------------------- scoring one checkpoint


def sample_for_scoring(model, num_images: int, batch_size: int, settings: sampler_settings.SamplerSettings, *,
                       device, seed: int, modes: torch.Tensor | None = None) -> torch.Tensor:
    """``num_images`` class-balanced samples from one generator seeded with ``seed``: uint8 (N, C, H, W).
    ``modes``: the class modes of mode guidance, as for :func:`diffdistill.diffusion.sampling.sample_budgeted`."""
    if num_images < 2 or batch_size < 1:
        raise DiffdistillError(f"num_images must be >= 2 and batch_size >= 1, got {num_images} and {batch_size}")
    if getattr(model, "num_classes", 0) < 1:
        raise DiffdistillError("scoring samples class-balanced images: expected a class-conditional model")
    labels = sampling.balanced_labels(model.num_classes, num_images)  # (N,)
    generator = torch.Generator(device=torch.device(device)).manual_seed(int(seed))
    model = speed.sampling_network(model, settings.compile)
    images, _ = sampling.generate_halving(model, labels, settings, device=device, generator=generator,
                                          batch_size=batch_size, mode_targets=sampling.mode_targets_of(modes, labels))
    return images


def score_checkpoint(checkpoint_path: str | os.PathLike, reference: fid.FeatureStats, extractor, *,
                     num_images: int, batch_size: int, sampler: sampler_settings.SamplerSettings, device,
                     seed: int, modes: torch.Tensor | None = None) -> dict:
    """Sample with the checkpoint's EMA weights and return its Fréchet distance to ``reference``.

    Returns step, score, score_kind, num_images, checkpoint, seconds (total) and the sampling and
    feature times.
    """
    name = getattr(extractor, "name", None)
    if name != reference.extractor:
        raise DiffdistillError(f"reference statistics are {reference.extractor} features; the extractor is {name}")
    began = time.perf_counter()
    ckpt = checkpoint.load_checkpoint(checkpoint_path, mmap=True)  # the EMA weights alone are read
    model = checkpoint.model_from_checkpoint(ckpt, weights="ema", device=device).eval()
    images = sample_for_scoring(model, num_images, batch_size, sampler, device=device, seed=seed, modes=modes)
    sampled = time.perf_counter()
    stats = fid.compute_stats(extractor, images, batch_size)
    score = stats.distance_to(reference)
    done = time.perf_counter()
    log.info("%s step %d: %s %.4f on %d images (%.1f s)", checkpoint_path, ckpt["step"], reference.score_kind,
             score, num_images, done - began)
    return {"step": int(ckpt["step"]), "score": score, "score_kind": reference.score_kind,
            "num_images": int(num_images), "checkpoint": str(checkpoint_path), "seconds": done - began,
            "sampling_s": sampled - began, "features_s": done - sampled}


# --------------------------------------------------------------------------- selection


def select_best(scores: Sequence[CheckpointScore]) -> tuple[CheckpointScore, pd.DataFrame]:
    """The lowest score (ties: earliest step) and a table of all scores sorted by step.

    Refuses an empty list, duplicate steps, mixed score kinds and mixed sample counts (scores made
    at different counts are not comparable). A NaN score (a diverged checkpoint) is never best.
    """
    table = _score_table(scores)
    best_step = _best_step(table)
    return next(s for s in scores if s.step == best_step), table


def _best_step(table: pd.DataFrame) -> int:
    finite = table[table["score"].map(lambda v: math.isfinite(float(v)))]
    if finite.empty:
        raise DiffdistillError("every checkpoint score is NaN or infinite: nothing to select")
    return int(finite.sort_values(["score", "step"], kind="stable").iloc[0]["step"])


def _score_table(scores: Sequence[CheckpointScore]) -> pd.DataFrame:
    """The scores as a table sorted by step, after checking that they are comparable."""
    if not scores:
        raise DiffdistillError("no checkpoint scores to select from")
    table = pd.DataFrame([{col: getattr(s, col) for col in SCORE_COLUMNS} for s in scores])
    table = table.sort_values("step", kind="stable").reset_index(drop=True)
    for column in ("score_kind", "num_images"):
        if table[column].nunique(dropna=False) > 1:
            values = sorted(map(str, table[column].unique()))
            raise DiffdistillError(f"checkpoint scores mix {column} values {values}: "
                                   "only scores of one kind at one sample count are comparable")
    repeated = table.loc[table["step"].duplicated(), "step"].tolist()
    if repeated:
        raise DiffdistillError(f"checkpoint scores repeat steps {sorted(repeated)}")
    return table


def plot_scores(table: pd.DataFrame, path: str | os.PathLike, score_kind: str) -> None:
    """Score against training step with the best point marked (the paper's Fig. 3); PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    best = table[table["step"] == _best_step(table)].iloc[0]
    figure = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(figure)  # Agg canvas without touching pyplot's global backend
    axes = figure.add_subplot()
    axes.plot(table["step"], table["score"], marker="o", label=score_kind)
    axes.scatter([best["step"]], [best["score"]], s=120, facecolors="none", edgecolors="red", zorder=3,
                 label=f"best: step {best['step']} ({best['score']:.3g})")
    axes.set_xlabel("training step")
    axes.set_ylabel(f"{score_kind} (lower is better)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
