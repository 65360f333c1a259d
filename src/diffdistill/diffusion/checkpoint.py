"""Checkpoints: our own training checkpoints, and transfer from the public U-ViT weights.

Our format is ONE ``torch.save`` file holding a plain dict that loads with ``weights_only=True``::

    {"format": "diffdistill-checkpoint", "version": 1, "step": int,
     "model": state_dict, "ema": state_dict | None, "optimizer": optimizer state_dict | None,
     "config": {"model": UViT constructor kwargs, ...plain types...}, "extra": {...}}

:func:`load_pretrained` starts a model from a public flat state_dict (``cifar10_uvit_small.pth``:
unconditional S/2, ``imagenet64_uvit_mid.pth``: 1000-class M/4) or from one of our checkpoints,
following the transfer rules of the paper: the label layer is never transferred, and an
unconditional source's ``pos_embed`` (time + patches) is shifted one row down to make room for the
target's label token. Nothing is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from diffdistill import atomic
from diffdistill.diffusion.uvit import UViT
from diffdistill.errors import DiffdistillError

log = logging.getLogger(__name__)

FORMAT = "diffdistill-checkpoint"
VERSION = 1
_KEYS = ("format", "version", "step", "model", "ema", "optimizer", "config", "extra")
_PLAIN = (str, int, float, bool, type(None))
_WRAPPER_KEYS = ("state_dict", "model")  # common wrappers around a state_dict in public files
_DROPPED_PREFIX = "label_emb."  # the label layer is never transferred (paper, docs/reference.md, "U-ViT")
# The public weights the paper's configs start from: file name -> what it holds (docs/reference.md, "Method").
PUBLIC_WEIGHTS = {
    "cifar10_uvit_small.pth": "CIFAR-10 U-ViT-S/2, unconditional; for cifar100",
    "imagenet64_uvit_mid.pth": "ImageNet-64 U-ViT-M/4; for tinyimagenet",
}
PUBLIC_WEIGHTS_SOURCE = "the U-ViT repository's published checkpoints, github.com/baofff/U-ViT"
WEIGHTS_FOLDER = "resources/weights/"


# --------------------------------------------------------------------------- our own checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: UViT,
    step: int,
    config: Mapping[str, Any],
    ema: nn.Module | Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write one checkpoint file atomically; every tensor is moved to the CPU.

    ``config`` must hold plain types; its ``"model"`` entry is filled from ``model.config`` (and must
    equal it when given) so that :func:`model_from_checkpoint` can rebuild the network.
    ``ema`` and ``optimizer`` may be modules/optimizers or their state dicts.
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise DiffdistillError(f"{path}: checkpoint step must be an int, got {type(step).__name__}")
    model_state = _state_dict(model)
    ema_state = None if ema is None else _state_dict(ema)
    if ema_state is not None and list(ema_state) != list(model_state):
        raise DiffdistillError(f"{path}: the EMA state_dict keys differ from the model's (expected the same network)")
    full_config = _checkpoint_config(path, model, config)
    extra = dict(extra or {})
    _require_plain(extra, f"{path}: extra", allow_tensors=True)
    optimizer_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    obj = {
        "format": FORMAT, "version": VERSION, "step": step, "model": _to_cpu(model_state),
        "ema": _to_cpu(ema_state), "optimizer": _to_cpu(optimizer_state), "config": full_config,
        "extra": _to_cpu(extra),
    }
    atomic.torch_save(obj, path)
    log.info("saved checkpoint %s (step %d, ema %s)", path, step, ema_state is not None)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Read and validate a file written by :func:`save_checkpoint`.

    ``mmap``: the tensors stay in the file until used, so that a reader of the EMA weights alone
    (scoring, sampling) does not read the optimizer state, half of a fine-tuning checkpoint.
    """
    obj = atomic.read_torch(path, "a diffdistill checkpoint", map_location, mmap=mmap)
    _validate_checkpoint(obj, path)
    return obj


def model_from_checkpoint(
    ckpt_or_path: Mapping[str, Any] | str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu"
) -> UViT:
    """Rebuild the UViT of a checkpoint and load its ``"ema"`` (default) or raw ``"model"`` weights strictly."""
    if isinstance(ckpt_or_path, Mapping):
        ckpt, source = ckpt_or_path, "checkpoint dict"
        _validate_checkpoint(ckpt, source)
    else:
        ckpt, source = load_checkpoint(ckpt_or_path), ckpt_or_path
    if weights not in ("ema", "model"):
        raise DiffdistillError(f"{source}: weights must be 'ema' or 'model', got {weights!r}")
    state = ckpt[weights]
    if state is None:
        raise DiffdistillError(f"{source}: has no EMA weights (ema is None); use weights='model' for the raw weights")
    try:
        model = UViT(**ckpt["config"]["model"])
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DiffdistillError(f"{source}: config['model'] does not rebuild the saved network ({err})") from err
    return model.to(device)


def _checkpoint_config(path, model: UViT, config: Mapping[str, Any]) -> dict:
    if not isinstance(config, Mapping):
        raise DiffdistillError(f"{path}: checkpoint config must be a dict, got {type(config).__name__}")
    full = dict(config)
    model_config = dict(getattr(model, "config", {}) or {})
    if "model" in full and dict(full["model"]) != model_config:
        raise DiffdistillError(f"{path}: config['model'] {full['model']} differs from model.config {model_config}")
    full["model"] = dict(full.get("model", model_config))
    if not full["model"]:
        raise DiffdistillError(f"{path}: config['model'] is empty (expected the UViT constructor kwargs)")
    _require_plain(full, f"{path}: config", allow_tensors=False)
    return full


def _validate_checkpoint(obj: Any, source) -> None:
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise DiffdistillError(f"{source}: not a diffdistill checkpoint (expected a dict with format={FORMAT!r})")
    if obj.get("version") != VERSION:
        raise DiffdistillError(f"{source}: checkpoint version {obj.get('version')!r}, expected {VERSION}")
    missing = [key for key in _KEYS if key not in obj]
    if missing:
        raise DiffdistillError(f"{source}: checkpoint lacks keys {missing}")
    if not isinstance(obj["model"], Mapping) or not isinstance(obj["config"], Mapping) or "model" not in obj["config"]:
        raise DiffdistillError(f"{source}: checkpoint needs a 'model' state_dict and config['model'] (UViT kwargs)")


def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(obj.state_dict() if isinstance(obj, nn.Module) else obj)


def _to_cpu(obj: Any) -> Any:
    """Detached CPU copies of every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


def _require_plain(obj: Any, where: str, *, allow_tensors: bool) -> None:
    """Reject anything ``torch.load(weights_only=True)`` could not read back (or a reader could not use)."""
    if isinstance(obj, _PLAIN) or (allow_tensors and isinstance(obj, torch.Tensor)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise DiffdistillError(f"{where}: key {key!r} is not a str or int")
            _require_plain(value, f"{where}[{key!r}]", allow_tensors=allow_tensors)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _require_plain(value, f"{where}[{index}]", allow_tensors=allow_tensors)
    else:
        kinds = "plain types or tensors" if allow_tensors else "plain types (str, int, float, bool, None, dict, list)"
        raise DiffdistillError(f"{where}: {type(obj).__name__} is not allowed, expected {kinds}")


# --------------------------------------------------------------------------- transfer from public weights


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: target keys loaded, source keys skipped, target keys left fresh."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    pos_embed_remapped: bool = False

    def summary(self) -> str:
        remap = "; pos_embed shifted by one row for the label token" if self.pos_embed_remapped else ""
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, skipped {len(self.skipped)} "
            f"({', '.join(self.skipped) or 'none'}), initialised fresh {len(self.initialised)} "
            f"({', '.join(self.initialised) or 'none'}){remap}"
        )


def load_pretrained(model: UViT, path: str | os.PathLike) -> LoadReport:
    """Initialise ``model`` in place from public U-ViT weights or one of our checkpoints.

    ``label_emb.*`` of the source is always dropped. When the source is unconditional (one extra
    token, the time) and the model conditional (label + time), ``pos_embed`` row 0 keeps the model's
    fresh init and rows 1.. get the source rows 0... Every other key must match in name and shape,
    otherwise the error lists every problem; the model is only modified once all checks pass.
    """
    if not Path(path).is_file():
        raise DiffdistillError(missing_weights_message(path))
    obj = atomic.read_torch(path, "a U-ViT state_dict or a diffdistill checkpoint")
    source = _source_state_dict(obj, path)
    target = model.state_dict()
    report = LoadReport(source=str(path))
    values = _plan_transfer(source, target, model.extras, report)
    with torch.no_grad():
        for key, value in values.items():
            if key == "pos_embed" and report.pos_embed_remapped:
                target[key][:, 1:].copy_(value)  # row 0 (label) keeps the model's own init
            else:
                target[key].copy_(value)
    log.info("%s", report.summary())
    return report


def missing_weights_message(path: str | os.PathLike) -> str:
    """What to do when the pretrained weights file is missing: where the public files come from and
    where they go."""
    files = "; ".join(f"{name} ({what})" for name, what in PUBLIC_WEIGHTS.items())
    return (f"{path}: pretrained weights file not found. The public U-ViT weights come from "
            f"{PUBLIC_WEIGHTS_SOURCE}, by file name: {files}. Put the file in {WEIGHTS_FOLDER} "
            "(or where the config key pretrained.path points).")


def _source_state_dict(obj: Any, path) -> dict[str, torch.Tensor]:
    """The flat state_dict inside a loaded file: ours (EMA first), wrapped, or ``module.``-prefixed."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        _validate_checkpoint(obj, path)
        obj = obj["ema"] if obj["ema"] is not None else obj["model"]
    for _ in range(2):  # unwrap {"state_dict": {...}} / {"model": {...}}, possibly twice
        if isinstance(obj, Mapping) and not _all_tensors(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            obj = inner if inner is not None else obj
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        raise DiffdistillError(f"{path}: not a U-ViT state_dict (expected a non-empty dict of name -> tensor)")
    return {key.removeprefix("module."): value for key, value in obj.items()}


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def _plan_transfer(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], extras: int, report: LoadReport
) -> dict[str, torch.Tensor]:
    """Match source to target keys, filling ``report``; raise listing every mismatch."""
    values: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    report.skipped = [key for key in source if key.startswith(_DROPPED_PREFIX)]
    for key, value in source.items():
        if key.startswith(_DROPPED_PREFIX):
            continue
        if key not in target:
            problems.append(f"{key}: in the file {tuple(value.shape)}, not in the model")
        elif key == "pos_embed" and _is_uncond_to_cond(value.shape, target[key].shape, extras):
            values[key] = value  # (1, 1 + N, D): becomes model rows 1..N+1
            report.pos_embed_remapped = True
        elif value.shape != target[key].shape:
            problems.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            values[key] = value
    for key, value in target.items():
        if key not in source and not key.startswith(_DROPPED_PREFIX):
            problems.append(f"{key}: in the model {tuple(value.shape)}, not in the file")
    if problems:
        raise DiffdistillError(
            f"{report.source}: does not fit the model ({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    report.loaded = list(values)
    report.initialised = [key for key in target if key.startswith(_DROPPED_PREFIX)]
    if report.pos_embed_remapped:
        report.initialised.append("pos_embed[0]")
    return values


def _is_uncond_to_cond(source_shape: torch.Size, target_shape: torch.Size, extras: int) -> bool:
    """Source pos_embed (1, 1 + N, D) from an unconditional model into a conditional (1, 2 + N, D)."""
    return (
        extras == 2 and len(source_shape) == 3 and source_shape[0] == 1 and source_shape[2] == target_shape[2]
        and source_shape[1] == target_shape[1] - 1
    )
