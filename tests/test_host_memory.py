"""Freed host memory kept for reuse (diffdistill.host_memory): counted in page faults, each case in a
fresh process, because glibc's thresholds move as a process allocates and cannot be put back.

A cycle allocates four 8 MiB tensors and frees them, as a training step does with its activations.
Both cases start from glibc's initial thresholds (128 KiB), fixed, so the baseline does not depend
on how far the dynamic ones have moved. By hand: 32 MiB is 8,192 pages of 4 KiB, so an allocator
that returns the memory to the kernel faults about 8,192 times per cycle; one that keeps it faults
(almost) never. The median cycle is compared: a heap that grows once (a late first touch of new
pages) faults in one cycle, not in every one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffdistill import cli, host_memory
from helpers import REPO

CYCLES = """
import resource, sys, torch
from diffdistill import host_memory
libc = host_memory.glibc()
libc.mallopt(host_memory.M_MMAP_THRESHOLD, 128 * 1024)
libc.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
def cycle():
    tensors = [torch.ones(2 * 2**20) for _ in range(4)]  # 4 x 8 MiB
    del tensors
faults = []
for _ in range(23):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults[3:])[10])  # the median cycle after 3 of warm-up
"""

glibc_only = pytest.mark.skipif(host_memory.glibc() is None, reason="the thresholds are glibc's")


def faults_per_cycle(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, float(faults)


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    kept, faults = faults_per_cycle("keep")
    assert kept == "True"
    assert faults < 100


@glibc_only
def test_initial_thresholds_fault_on_every_cycle():
    """The premise: without the call the same cycle pays for its pages again (8,192 per cycle)."""
    kept, faults = faults_per_cycle("initial")
    assert kept == "None"
    assert faults > 4000


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False


@glibc_only
def test_scripts_that_train_keep_freed_memory_from_the_start_and_the_others_do_not(tmp_path):
    trains, samples = tmp_path / "train.log", tmp_path / "sample.log"
    cli.start("train", ["--flag"], log_file=trains, device="cpu", seed=0, trains=True)
    assert "host memory: freed blocks kept for reuse" in trains.read_text()
    cli.start("sample_budget", ["--flag"], log_file=samples, device="cpu", seed=0)
    assert "host memory" not in samples.read_text()


@pytest.mark.parametrize("script, trains", [("train", True), ("evaluate", True), ("reference_stats", True),
                                            ("sample_budget", False), ("score_checkpoint", False),
                                            ("package", False), ("report", False)])
def test_only_the_training_scripts_ask_for_kept_memory(script, trains):
    source = (REPO / "workflow" / "scripts" / f"{script}.py").read_text()
    assert ("trains=True" in source) == trains
