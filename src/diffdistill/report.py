"""The last stage: a sample grid, ``summary.json`` (plain numbers) and ``report.md`` (for people).

``summary.json`` is a :class:`~diffdistill.records.RunSummary` record, a contract other tools read:
the best checkpoint and its score, the pool's size and speed, every accuracy evaluation by kind, the
IPC grid, and the budget curve and the sampler sweep when their studies are on (empty lists when
off; an empty budget prefix has accuracy null).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict

import torch

from diffdistill import atomic
from diffdistill.data import LabeledImages
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import field_scores
from diffdistill.evaluation.field_scores import score_text
from diffdistill.records import (BestCheckpoint, BudgetPoint, EvaluationResult, ExternalResult, ExternalSet,
                                 ExternalSummary, FieldScores, IpcRow, IpcScores, MeanStd, RunSummary, SetAccuracy,
                                 SweepRow)

ACCURACY_ROWS = {  # kind (a kind with {ipc}: one per IPC of the grid) -> row label
    "synthetic_ipc{ipc}": "synthetic, IPC-{ipc} package",
    "real_ipc{ipc}": "real, random IPC-{ipc} subsets (a fresh one per round)",
    "synthetic_pool": "synthetic, full pool ({pool} images)",
    "real_full": "real, full training set",
}


def accuracy_rows(ipc_grid, pool_images: int) -> dict[str, str]:
    """kind -> row label of every accuracy evaluation: both IPC kinds for each IPC of the grid (in
    ascending order), then the pool and the full real set."""
    rows = {}
    for ipc in sorted(ipc_grid):
        rows |= {kind.format(ipc=ipc): label.format(ipc=ipc) for kind, label in ACCURACY_ROWS.items() if "{ipc}" in kind}
    return rows | {kind: label.format(pool=pool_images) for kind, label in ACCURACY_ROWS.items() if "{" not in kind}


def sample_grid(data: LabeledImages, per_class: int = 10, *, pixel_scale: int = 1, max_classes: int = 100):
    """A PIL image with one row per class (the first ``per_class`` images of it), like the paper's Fig. 5."""
    from PIL import Image

    num_classes = min(data.num_classes, max_classes)
    channels, height, width = data.images.shape[1:]
    canvas = torch.full((channels, num_classes * (height + 1), per_class * (width + 1)), 255, dtype=torch.uint8)
    for label in range(num_classes):
        index = torch.nonzero(data.labels == label).flatten()[:per_class]
        for col, i in enumerate(index.tolist()):
            top, left = label * (height + 1), col * (width + 1)
            canvas[:, top : top + height, left : left + width] = data.images[i]
    array = canvas.permute(1, 2, 0).numpy()  # (H, W, C)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    if pixel_scale > 1:
        image = image.resize((image.width * pixel_scale, image.height * pixel_scale), Image.NEAREST)
    return image


def grid_scale(image_side: int) -> int:
    """Upscale small images (8x8 digits) so a grid is readable; 32x32 and up stay as they are."""
    return max(1, math.ceil(32 / image_side))


NOAUG = "_noaug"  # the suffix of an evaluation kind trained without DSA (evaluation.ars)


def build_summary(*, dataset: str, best: BestCheckpoint, sampling: SamplingSummary,
                  accuracy: dict[str, EvaluationResult], ipc_grid, budget_curve: list[BudgetPoint] = (),
                  sweep: list[SweepRow] = ()) -> RunSummary:
    """summary.json from the stage outputs; ``accuracy``: the evaluation of each kind of
    :func:`accuracy_rows` for ``ipc_grid`` (the IPCs), and with evaluation.ars the IPC kinds without DSA
    (``<kind>_noaug``); ``budget_curve`` and ``sweep`` as made by :func:`budget_curve` and :func:`sweep_rows`."""
    kinds = accuracy_rows(ipc_grid, sampling.images)
    missing = [key for key in kinds if key not in accuracy]
    if missing:
        raise DiffdistillError(f"accuracy results missing for {missing}: expected evaluation/<kind>.json of each")
    acc = {key: mean_std(accuracy[key]) for key in kinds}
    return RunSummary(
        dataset=dataset, best_step=best.step, best_score=float(best.score), score_kind=best.score_kind,
        pool_images=sampling.images, sampling_images_per_s=sampling.images_per_s,
        sampling_images_per_s_per_shard=sampling.images_per_s_per_shard, budget_s=sampling.budget_s,
        accuracy=acc,
        ipc_grid=[IpcRow(ipc, acc[f"synthetic_ipc{ipc}"], acc[f"real_ipc{ipc}"]) for ipc in sorted(ipc_grid)],
        scores=[_ipc_scores(accuracy, ipc) for ipc in sorted(ipc_grid)],
        budget_curve=list(budget_curve), sweep=list(sweep))


def _ipc_scores(accuracy: dict[str, EvaluationResult], ipc: int) -> IpcScores:
    synthetic, real = f"synthetic_ipc{ipc}", f"real_ipc{ipc}"
    return IpcScores(ipc, scores_of(accuracy[synthetic], accuracy[real], accuracy.get(synthetic + NOAUG),
                                    accuracy.get(real + NOAUG), full_real=accuracy["real_full"]))


def mean_std(result: EvaluationResult) -> MeanStd:
    """An evaluation's mean and std; null for an evaluation that had nothing to train on."""
    return MeanStd(*(None if value is None else float(value) for value in (result.mean, result.std)))


def scores_of(synthetic: EvaluationResult, random_real: EvaluationResult,
              synthetic_noaug: EvaluationResult | None = None, random_real_noaug: EvaluationResult | None = None, *,
              full_real: EvaluationResult) -> FieldScores:
    """The field's scores of a distilled set from its evaluations' per-round accuracies (ARS when the two
    evaluations without DSA are given)."""
    plain = {} if synthetic_noaug is None or random_real_noaug is None else {
        "synthetic_noaug": synthetic_noaug.accuracies, "random_real_noaug": random_real_noaug.accuracies}
    return field_scores.field_scores(synthetic.accuracies, random_real.accuracies, full_real.accuracies, **plain)


def set_accuracy(synthetic: EvaluationResult, random_real: EvaluationResult,
                 full_real: EvaluationResult) -> SetAccuracy:
    """A distilled set's accuracy beside random real of its IPC and the full real split, with the protocol
    (``augmentation``: DSA, the protocol's; the evaluations without it only enter ARS)."""
    return SetAccuracy(synthetic=mean_std(synthetic), random_real=mean_std(random_real),
                       full_real=mean_std(full_real), epochs=synthetic.epochs, full_real_epochs=full_real.epochs,
                       rounds=synthetic.rounds, augmentation="DSA")


def budget_curve(evaluations: dict[str, EvaluationResult]) -> list[BudgetPoint]:
    """The budget curve from evaluate's results of budget prefixes (file -> result), by fraction."""
    points = []
    for where, result in evaluations.items():
        prefix = result.budget_prefix
        if prefix is None:
            raise DiffdistillError(f"{where}: field 'budget_prefix' is null, expected the result of a budget prefix "
                                   "(evaluate --budget-fraction)")
        points.append(BudgetPoint(float(prefix.fraction), float(prefix.seconds), prefix.images, mean_std(result)))
    return sorted(points, key=lambda point: point.fraction)


def sweep_rows(variants: list[tuple[str, SamplingSummary, EvaluationResult]]) -> list[SweepRow]:
    """One row per sampler variant from (name, its pool's sampling summary, evaluate's result of the pool);
    ``settings`` are the variant's sampler settings (those of the summary's settings)."""
    return [SweepRow(name, sampling.sampler, sampling.images, sampling.images_per_s, mean_std(result))
            for name, sampling, result in variants]


def accuracy_table(summary: RunSummary):
    """The accuracy table as a DataFrame (percent), for a TSV beside report.md."""
    import pandas as pd

    kinds = accuracy_rows([row.ipc for row in summary.ipc_grid], summary.pool_images)
    rows = [{"training set": label, "accuracy mean (%)": 100 * summary.accuracy[key].mean,
             "accuracy std (%)": 100 * summary.accuracy[key].std} for key, label in kinds.items()]
    return pd.DataFrame(rows)


def sweep_table(sweep: list[SweepRow]):
    """The sweep as a DataFrame: variant, its settings, images made, images/s and accuracy (percent)."""
    import pandas as pd

    return pd.DataFrame([{"variant": row.name, **asdict(row.settings), "images": row.images,
                          "images/s": row.images_per_s, "accuracy mean (%)": _percent(row.accuracy.mean),
                          "accuracy std (%)": _percent(row.accuracy.std)} for row in sweep])


def _percent(value):
    return None if value is None else 100 * value


def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)  # Agg canvas without touching pyplot's global backend
    return figure, figure.subplots(1, columns)


def _save(figure, path: str | os.PathLike) -> None:
    figure.tight_layout()
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def plot_budget_curve(curve: list[BudgetPoint], references: dict[str, MeanStd], path: str | os.PathLike) -> None:
    """Accuracy against sampling seconds (error bars: std over rounds), the images made on a second
    axis, and ``references`` (label -> {mean, std}) as horizontal lines; PNG, atomic."""
    figure, axes = _figure(6, 4)
    scored = [p for p in curve if p.accuracy.mean is not None]
    axes.errorbar([p.seconds for p in scored], [100 * p.accuracy.mean for p in scored],
                  yerr=[100 * p.accuracy.std for p in scored], marker="o", capsize=3,
                  label="synthetic: the pool's images made so far")
    for (label, acc), style in zip(references.items(), ("--", ":", "-.")):
        axes.axhline(100 * acc.mean, linestyle=style, color="grey", label=label)
    axes.set_xlabel("sampling seconds")
    axes.set_ylabel("ConvNet test accuracy (%)")
    axes.grid(alpha=0.3)
    images = axes.twinx()
    images.plot([p.seconds for p in curve], [p.images for p in curve], color="tab:orange", marker="s",
                linestyle="none", label="images made")
    images.set_ylabel("images made", color="tab:orange")
    images.set_ylim(bottom=0)
    lines = [*axes.get_legend_handles_labels()[0], *images.get_legend_handles_labels()[0]]
    axes.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    _save(figure, path)


def plot_ipc_grid(grid: list[IpcRow], full_real: MeanStd, path: str | os.PathLike) -> None:
    """Accuracy against IPC (log axis) of the synthetic packages and the random real subsets (error bars:
    std over rounds), the full real training set (``full_real`` {mean, std}) as a horizontal line; PNG, atomic."""
    figure, axes = _figure(6, 4)
    ipcs = [row.ipc for row in grid]
    for key, label, marker in (("synthetic", "synthetic package", "o"), ("real", "random real subsets", "s")):
        values = [getattr(row, key) for row in grid]
        axes.errorbar(ipcs, [100 * v.mean for v in values], yerr=[100 * v.std for v in values],
                      marker=marker, capsize=3, label=label)
    axes.axhline(100 * full_real.mean, linestyle="--", color="grey", label=ACCURACY_ROWS["real_full"])
    axes.set_xscale("log")
    axes.set_xticks(ipcs, [str(ipc) for ipc in ipcs])
    axes.set_xlabel("images per class (IPC)")
    axes.set_ylabel("ConvNet test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    _save(figure, path)


def plot_sweep(sweep: list[SweepRow], path: str | os.PathLike) -> None:
    """Per sampler variant: images made within the budget (left) and accuracy of its pool (right); PNG, atomic."""
    figure, (made, accuracy) = _figure(max(6, 1.2 * len(sweep) + 2), 3.5, columns=2)
    names = [row.name for row in sweep]
    made.bar(names, [row.images for row in sweep], color="tab:orange")
    made.set_ylabel("images made in the budget")
    scored = [row for row in sweep if row.accuracy.mean is not None]
    accuracy.errorbar([row.name for row in scored], [100 * row.accuracy.mean for row in scored],
                      yerr=[100 * row.accuracy.std for row in scored], fmt="o", capsize=3)
    accuracy.set_ylabel("ConvNet test accuracy (%)")
    for axes in (made, accuracy):
        axes.tick_params(axis="x", labelrotation=45, labelsize=8)
        axes.grid(axis="y", alpha=0.3)
    _save(figure, path)


def render_markdown(summary: RunSummary, *, scores: list[dict], sampling: SamplingSummary,
                    figures: dict[str, str], evaluations: dict[str, EvaluationResult]) -> str:
    """report.md: what was chosen, how fast it sampled, the accuracy table (with each evaluation's rounds
    and epochs) and accuracy against IPC, with figure links."""
    acc = summary.accuracy
    kinds = accuracy_rows([row.ipc for row in summary.ipc_grid], summary.pool_images)
    lines = [
        f"# diffdistill report: {summary.dataset}",
        "",
        "## Checkpoint selection",
        "",
        f"Every checkpoint was scored by **{summary.score_kind}** (lower is better) on a fixed number of "
        f"samples; the best is step **{summary.best_step}** with {summary.score_kind} "
        f"**{summary.best_score:.3f}**.",
        "",
        "| step | " + summary.score_kind + " |",
        "|---:|---:|",
        *[f"| {row['step']} | {row['score']:.3f}{' ←' if row['step'] == summary.best_step else ''} |" for row in scores],
        "",
        f"![score curve]({figures['curve']})",
        "",
        "## Budgeted sampling",
        "",
        f"{summary.pool_images} labelled images in {sampling.sampling_s:.1f} s of a "
        f"{summary.budget_s:.0f} s budget{_shard_text(summary)}: **{summary.sampling_images_per_s:.1f} images/s** on "
        f"{sampling.device_name} ({_solver_text(sampling.sampler)}). Model loading took "
        f"{sampling.load_s:.1f} s and is not part of the budget.",
        "",
        f"![samples, one row per class]({figures['grid']})",
        "",
        "## ConvNet accuracy on the real test set",
        "",
        "The challenge's ConvNet (depth 3, width 128, DSA), trained on each set and tested on the real test split; "
        "mean ± std over rounds.",
        "",
        "| training set | accuracy (%) | rounds | epochs |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {_accuracy_text(acc[key])} | {evaluations[key].rounds} | {evaluations[key].epochs} |"
          for key, label in kinds.items()],
    ]
    lines += _ipc_grid_lines(summary, figures) + score_lines([(row.ipc, row.scores) for row in summary.scores])
    lines += _budget_curve_lines(summary, figures) + _sweep_lines(summary, figures)
    lines += ["", "Plain numbers: `summary.json`.", ""]
    return "\n".join(lines)


def _ipc_grid_lines(summary: RunSummary, figures: dict[str, str]) -> list[str]:
    return [
        "", "## Accuracy against IPC", "",
        "The synthetic package and random real subsets of each IPC (images per class); the full real training set "
        f"reaches {_accuracy_text(summary.accuracy['real_full'])} %.", "",
        "| IPC | synthetic package (%) | random real (%) |", "|---:|---:|---:|",
        *[f"| {row.ipc} | {_accuracy_text(row.synthetic)} | {_accuracy_text(row.real)} |"
          for row in summary.ipc_grid],
        "", f"![accuracy against IPC]({figures['ipc']})" if "ipc" in figures else "",
    ]


SCORES_TEXT = (
    "The field's scores (DD-Ranking): HLR = full real − synthetic and IOR = synthetic − random real, in accuracy "
    "points; LRS = norm(IOR/2 − HLR/2) and ARS = norm(IOR/2 + IOR without DSA/2) in [0, 1], norm(a) = "
    "(e^a − e^−1)/(e − e^−1); each per round, then mean ± std (docs/reference.md, \"The field's scores\").")


def score_lines(rows: list[tuple], label: str = "IPC") -> list[str]:
    """The table of the field's scores, one row per (IPC or set name, its scores)."""
    lines = ["", "## The field's scores", "", SCORES_TEXT, "",
             f"| {label} | HLR (points) | IOR (points) | LRS | ARS |", "|---|---:|---:|---:|---:|"]
    for name, scores in rows:
        ars = "not run (evaluation.ars)" if scores.ars is None else score_text("ars", scores.ars)
        lines.append(f"| {name} | {score_text('hlr', scores.hlr)} | {score_text('ior', scores.ior)} | "
                     f"{score_text('lrs', scores.lrs)} | {ars} |")
    return lines


def _accuracy_text(acc: MeanStd) -> str:
    return "no images" if acc.mean is None else f"{100 * acc.mean:.2f} ± {100 * acc.std:.2f}"


def _budget_curve_lines(summary: RunSummary, figures: dict[str, str]) -> list[str]:
    curve = summary.budget_curve
    if not curve:
        return []
    return [
        "", "## What the budget buys", "",
        f"The pool's images made within the first part of the {summary.budget_s:.0f} s budget, each set evaluated "
        "like the full pool; the lines are the random real IPC and full real accuracies.", "",
        "| fraction | seconds | images | accuracy (%) |", "|---:|---:|---:|---:|",
        *[f"| {p.fraction:g} | {p.seconds:.1f} | {p.images} | {_accuracy_text(p.accuracy)} |"
          for p in curve],
        "", f"![accuracy against sampling seconds]({figures['budget']})" if "budget" in figures else "",
    ]


def _sweep_lines(summary: RunSummary, figures: dict[str, str]) -> list[str]:
    sweep = summary.sweep
    if not sweep:
        return []
    return [
        "", "## Sampler sweep", "",
        f"Each variant sampled from the same checkpoint for the same {summary.budget_s:.0f} s budget; its "
        "whole pool evaluated like the main pool.", "",
        "| variant | solver | images | images/s | accuracy (%) |", "|---|---|---:|---:|---:|",
        *[f"| {row.name} | {_solver_text(row.settings)} | {row.images} | {row.images_per_s:.1f} | "
          f"{_accuracy_text(row.accuracy)} |" for row in sweep],
        "", f"![images made and accuracy per variant]({figures['sweep']})" if "sweep" in figures else "",
    ]


def _shard_text(summary: RunSummary) -> str:
    per_shard = summary.sampling_images_per_s_per_shard
    if len(per_shard) < 2:
        return ""
    return f" in each of {len(per_shard)} parallel shards ({', '.join(f'{r:.1f}' for r in per_shard)} images/s)"


def _solver_text(solver: SamplerSettings) -> str:
    """``solver``: a sampling summary's sampler settings (:attr:`SamplingSummary.sampler`)."""
    return (f"DPM-Solver {solver.method} {solver.algorithm} order {solver.order}, {solver.steps} steps, "
            f"guidance w={solver.guidance_scale}, {solver.precision}")


# --------------------------------------------------------------------------- sets you bring (config key external)


def external_result(record: ExternalSet, synthetic: EvaluationResult, random_real: EvaluationResult,
                    full_real: EvaluationResult, synthetic_noaug: EvaluationResult | None = None,
                    random_real_noaug: EvaluationResult | None = None) -> ExternalResult:
    """One set you brought: its evaluations beside random real of its IPC, and the field's scores."""
    return ExternalResult(
        name=record.name, source=record.source, form=record.form, ipc=record.ipc, sha256=record.sha256,
        accuracy=set_accuracy(synthetic, random_real, full_real),
        scores=scores_of(synthetic, random_real, synthetic_noaug, random_real_noaug, full_real=full_real))


def render_external_markdown(summary: ExternalSummary) -> str:
    """external/report.md: each set's accuracy beside random real of its IPC, then the field's scores."""
    full = summary.sets[0].accuracy.full_real
    lines = [
        f"# diffdistill: distilled sets evaluated on {summary.dataset}", "",
        "The challenge's ConvNet (depth 3, width 128, DSA) trained on each set and on random real subsets of the "
        f"same IPC (a fresh subset per round), tested on the real test split; the full real training split reaches "
        f"{_accuracy_text(full)} %. Mean ± std over rounds.", "",
        "| set | form | IPC | accuracy (%) | random real, same IPC (%) | rounds | epochs | sha256 |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *[f"| {row.name} | {row.form} | {row.ipc} | {_accuracy_text(row.accuracy.synthetic)} | "
          f"{_accuracy_text(row.accuracy.random_real)} | {row.accuracy.rounds} | {row.accuracy.epochs} | "
          f"`{row.sha256[:12]}` |"
          for row in summary.sets],
    ]
    lines += score_lines([(row.name, row.scores) for row in summary.sets], label="set")
    return "\n".join(lines + ["", "Plain numbers: `summary.json`; one record per set: `<name>/result.json`.", ""])
