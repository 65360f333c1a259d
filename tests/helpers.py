"""Helpers shared by test modules (tests/ is on sys.path through pytest's rootdir conftest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"


def load_script(name: str):
    """Import ``workflow/scripts/<name>.py`` as a module, so tests can call its ``main(argv)``."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
