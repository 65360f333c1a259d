"""The last stage: a sample grid, ``summary.json`` (plain numbers) and ``report.md`` (for people).

The summary keys are a contract other tools read: ``dataset``, ``best_step``, ``best_score``,
``score_kind``, ``pool_images``, ``sampling_images_per_s`` (all shards together),
``sampling_images_per_s_per_shard``, ``budget_s`` and ``accuracy`` ->
{``synthetic_ipc``, ``synthetic_pool``, ``real_ipc``, ``real_full``} -> {``mean``, ``std``}.
"""

from __future__ import annotations

import math

import torch

from .data import LabeledImages
from .sampling_summary import SamplingSummary

ACCURACY_ROWS = {
    "synthetic_ipc": "synthetic, IPC-{ipc} package",
    "synthetic_pool": "synthetic, full pool ({pool} images)",
    "real_ipc": "real, random IPC-{ipc} subsets (a fresh one per round)",
    "real_full": "real, full training set",
}


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


def build_summary(*, dataset: str, best: dict, sampling: SamplingSummary, accuracy: dict[str, dict]) -> dict:
    """The summary.json document from the stage outputs (see the module docstring for keys)."""
    missing = [key for key in ACCURACY_ROWS if key not in accuracy]
    if missing:
        raise ValueError(f"accuracy results missing for {missing}")
    return {
        "dataset": dataset,
        "best_step": int(best["step"]),
        "best_score": float(best["score"]),
        "score_kind": best["score_kind"],
        "pool_images": sampling.images,
        "sampling_images_per_s": sampling.images_per_s,
        "sampling_images_per_s_per_shard": sampling.images_per_s_per_shard,
        "budget_s": sampling.budget_s,
        "accuracy": {key: {"mean": float(accuracy[key]["mean"]), "std": float(accuracy[key]["std"])}
                     for key in ACCURACY_ROWS},
    }


def render_markdown(summary: dict, *, ipc: int, scores: list[dict], sampling: SamplingSummary,
                    figures: dict[str, str],
                    accuracy_details: dict[str, dict] | None = None) -> str:
    """report.md: what was chosen, how fast it sampled, and the accuracy table, with figure links."""
    acc = summary["accuracy"]
    pct = lambda a: f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}"  # noqa: E731
    lines = [
        f"# diffdistill report: {summary['dataset']}",
        "",
        "## Checkpoint selection",
        "",
        f"Every checkpoint was scored by **{summary['score_kind']}** (lower is better) on a fixed number of "
        f"samples; the best is step **{summary['best_step']}** with {summary['score_kind']} "
        f"**{summary['best_score']:.3f}**.",
        "",
        "| step | " + summary["score_kind"] + " |",
        "|---:|---:|",
        *[f"| {row['step']} | {row['score']:.3f}{' ←' if row['step'] == summary['best_step'] else ''} |" for row in scores],
        "",
        f"![score curve]({figures['curve']})",
        "",
        "## Budgeted sampling",
        "",
        f"{summary['pool_images']} labelled images in {sampling.sampling_s:.1f} s of a "
        f"{summary['budget_s']:.0f} s budget{_shard_text(summary)}: **{summary['sampling_images_per_s']:.1f} images/s** on "
        f"{sampling.device_name} ({_solver_text(sampling.settings)}). Model loading took "
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
    ]
    details = accuracy_details or {}
    for key, label in ACCURACY_ROWS.items():
        info = details.get(key, {})
        lines.append(f"| {label.format(ipc=ipc, pool=summary['pool_images'])} | {pct(acc[key])} | "
                     f"{info.get('rounds', '')} | {info.get('epochs', '')} |")
    lines += ["", "Plain numbers: `summary.json`.", ""]
    return "\n".join(lines)


def _shard_text(summary: dict) -> str:
    per_shard = summary["sampling_images_per_s_per_shard"]
    if len(per_shard) < 2:
        return ""
    return f" in each of {len(per_shard)} parallel shards ({', '.join(f'{r:.1f}' for r in per_shard)} images/s)"


def _solver_text(solver: dict) -> str:
    if "steps" not in solver:
        return "solver settings in the sampling metadata"
    return (f"DPM-Solver {solver.get('method', '?')} {solver.get('algorithm', '?')} order {solver.get('order', '?')}, "
            f"{solver.get('steps', '?')} steps, guidance w={solver.get('guidance_scale', '?')}, "
            f"{solver.get('precision', '?')}")
