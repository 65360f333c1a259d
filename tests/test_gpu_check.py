"""benchmarks/gpu_check.sh: every step's code runs on the CPU in its tiny mode, each step writes its
own file and a summary line, and without a GPU the full check refuses in one line before any work.

Speeds are not asserted (the check reports them); the tiny run takes ~35 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = ["a_env", "b_pytest", "c_rehearsal", "d_sampler", "e_finetune", "f_evaluator"]


def run_check(tmp_path, *flags, env=None):
    environment = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"), **(env or {})}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *flags], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    done = run_check(tmp_path, "--tiny")
    return done, tmp_path / "out"


def test_tiny_mode_runs_every_step_and_summarises_each(tiny_run):
    done, out = tiny_run
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == STEPS
    assert all(": rc 0, " in line for line in summary)
    # The output folder holds the summary and one file per step (and install.log with the wheelhouse).
    assert {p.name for p in out.iterdir()} - {"install.log"} == {"summary.txt", *(f"{s}.txt" for s in STEPS)}


def test_tiny_mode_step_files_hold_their_results(tiny_run):
    _, out = tiny_run
    assert "torch " in (out / "a_env.txt").read_text()
    rehearsal = (out / "c_rehearsal.txt").read_text()
    for stage in ("prepare_data", "finetune", "reference_stats", "score_checkpoint 2", "select_checkpoint",
                  "sample_budget compile none", "package", "evaluate synthetic_ipc", "evaluate real_full"):
        assert f"== stage {stage}: rc 0" in rehearsal
    assert "sampling: 100 images" in rehearsal and "stage seconds" in rehearsal
    lines = (out / "d_sampler.txt").read_text().splitlines()
    sampler = [line.split("\t") for line in lines if not line.startswith("#")]
    assert sampler[0][:2] == ["preset", "device"] and len(sampler) == 1 + 2 * 2 * 2  # batch x precision x w
    assert all(float(row[7]) > 0 for row in sampler[1:])
    finetune = [line for line in (out / "e_finetune.txt").read_text().splitlines() if line.startswith("uvit_")]
    assert len(finetune) == 4 and float(finetune[0].split("\t")[10]) == 1.0  # speed-up against the first row
    evaluator = (out / "f_evaluator.txt").read_text()
    assert "\norganisers\t" in evaluator and "\ndiffdistill\t" in evaluator


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_cuda_the_full_check_refuses_in_one_line(tmp_path):
    done = run_check(tmp_path, env={"GPU_CHECK_TINY": "0"})
    assert done.returncode == 3
    assert done.stdout.strip().count("\n") == 0 and "no CUDA GPU" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]
