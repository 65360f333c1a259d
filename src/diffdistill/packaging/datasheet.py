"""A package's datasheet: a JSON record and a Markdown card beside it, so that someone handed only the
package can tell what it is, how it was made and how good it is (accuracy against random real of its
IPC and the field's scores), and check that the file is the one described (sha256)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.evaluation.field_scores import score_text
from diffdistill.records import Environment, FieldScores, MeanStd, Record, SetAccuracy


@dataclass(kw_only=True)
class Datasheet(Record):
    """datasheet's record (datasheet.json beside the package)."""

    FORMAT: ClassVar[str] = "diffdistill-datasheet"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "a package's datasheet (datasheet.json) written by datasheet"

    package: str
    sha256: str
    shape: list[int]
    ipc: int
    dataset: str
    classes: list[str]
    splits: dict[str, int]  # images per split of the real data
    data_source: str
    mean: list[float]
    std: list[float]
    model_preset: str
    model_overrides: dict[str, Any]
    checkpoint_step: int
    checkpoint_score: float
    score_kind: str
    sampler: SamplerSettings
    sampling_budget_s: float
    pool_images: int
    rule: str
    seed: int
    accuracy: SetAccuracy
    scores: FieldScores
    grid: str
    software: Environment


def _percent(value: MeanStd) -> str:
    return f"{100 * value.mean:.2f} ± {100 * value.std:.2f} %"


def _score_lines(scores: FieldScores) -> list[str]:
    rows = [("HLR (full real − synthetic; lower is better)", "hlr"), ("IOR (synthetic − random real)", "ior"),
            ("LRS (label-robust score, 0–1)", "lrs"), ("ARS (augmentation-robust score, 0–1)", "ars")]
    return [f"| {name} | {score_text(key, getattr(scores, key))}{' points' if key in ('hlr', 'ior') else ''} |"
            for name, key in rows if getattr(scores, key) is not None]


def render_card(sheet: Datasheet) -> str:
    """The Markdown card: what the file is, how to load it, what made it and how good it is."""
    acc, classes = sheet.accuracy, len(sheet.classes)
    channels, height, width = sheet.shape[1:]
    overrides = f" with {sheet.model_overrides}" if sheet.model_overrides else ""
    sampler = ", ".join(f"{key} {value}" for key, value in asdict(sheet.sampler).items())
    software = sheet.software
    lines = [
        f"# Distilled {sheet.dataset}: {sheet.ipc} image(s) per class", "",
        f"`{sheet.package}`: {sheet.shape[0]} images ({classes} classes × {sheet.ipc}), {channels}×{height}×{width}, "
        f"float32, normalised; sha256 `{sheet.sha256}`.", "",
        "| | |", "|---|---|",
        f"| load | `x = torch.load(\"{sheet.package}\", weights_only=True)`; labels by position: "
        f"`torch.arange({classes}).repeat_interleave({sheet.ipc})` |",
        f"| normalisation | x = (pixel / 255 − mean) / std, mean {sheet.mean}, std {sheet.std} |",
        f"| classes | {', '.join(sheet.classes[:20])}{' …' if classes > 20 else ''} |",
        f"| real data | {sheet.dataset} ({sheet.data_source}): "
        f"{', '.join(f'{split} {count}' for split, count in sheet.splits.items())} images |",
        f"| model | U-ViT `{sheet.model_preset}`{overrides}, checkpoint of step {sheet.checkpoint_step} "
        f"({sheet.score_kind} {sheet.checkpoint_score:.4g}, the lowest of the scored checkpoints) |",
        f"| sampler | DPM-Solver: {sampler} |",
        f"| pool | {sheet.pool_images} images sampled in a {sheet.sampling_budget_s:g} s budget; package rule "
        f"`{sheet.rule}`; pipeline seed {sheet.seed} |",
        f"| accuracy | **{_percent(acc.synthetic)}** against {_percent(acc.random_real)} for random real IPC "
        f"{sheet.ipc} (a fresh subset per round); full real split {_percent(acc.full_real)} |",
        f"| protocol | challenge ConvNet-3, {acc.augmentation}, {acc.epochs} epochs ({acc.full_real_epochs} for the "
        f"full split), {acc.rounds} rounds, tested on the real test split |",
        *_score_lines(sheet.scores),
        f"| software | diffdistill {software.diffdistill}, torch {software.torch}, numpy {software.numpy}, "
        f"Python {software.python} |",
        "", f"![one row per class]({sheet.grid})", "",
    ]
    return "\n".join(lines)

