"""Shared wiring for the stage scripts in ``workflow/scripts``: logging, device, seed, sidecars.

Each script is ``main(argv) -> int``: parse flags, call :func:`start` (logs the command line, picks
device and seed), call one package function, write its outputs and a JSON sidecar with
:func:`write_sidecar`. :func:`run_main` turns a :class:`~diffdistill.errors.DiffdistillError` into a
one-line error and exit status 2, and removes the declared outputs this run created, so a failed
run leaves nothing half-made and nothing made before is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import __version__, atomic
from .errors import DiffdistillError

log = logging.getLogger("diffdistill")


def setup_logging(log_file: str | os.PathLike | None = None) -> None:
    """Log INFO lines with timestamps to stderr and, when given, to ``log_file`` (appended)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def resolve_device(name: str = "auto"):
    """``auto`` picks CUDA when available, else CPU; an explicit ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffdistillError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start(script: str, argv: Sequence[str], log_file=None, device: str = "auto", seed: int | None = None):
    """Common start of every script: logging, the command line, device and seed. Returns the device."""
    setup_logging(log_file)
    log.info("%s %s", script, " ".join(shlex.quote(a) for a in argv))
    dev = resolve_device(device)
    if seed is not None:
        seed_everything(seed)
    log.info("device %s (%s), seed %s", dev, device_name(dev), seed)
    return dev


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), or '' elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def environment(device=None) -> dict:
    """Versions and hardware, for sidecars and checkpoints."""
    import numpy as np
    import torch

    env = {
        "diffdistill": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device is not None:
        env["device"] = str(device)
        env["device_name"] = device_name(device)
    return env


def write_sidecar(path, *, settings: dict, timings: dict | None = None, device=None, **extra) -> None:
    """The JSON beside an output: resolved settings, results, timings, versions and device."""
    doc = {"settings": settings, **extra, "timings_s": timings or {}, "environment": environment(device)}
    atomic.write_json(path, doc)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


@contextlib.contextmanager
def cleanup_on_failure(outputs: Iterable[str | os.PathLike]) -> Iterator[None]:
    """On an exception, delete those of ``outputs`` that did not exist before; re-raise."""
    paths = [Path(p) for p in outputs if p]
    existed = {p for p in paths if p.exists()}
    try:
        yield
    except BaseException:
        for p in paths:
            if p not in existed and p.is_file():
                p.unlink()
        raise


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``: bad input becomes one clear line and exit status 2."""
    try:
        return main(argv)
    except DiffdistillError as err:
        print(f"error: {err}", file=sys.stderr)
        _log_to_files_only(f"error: {err}")  # the terminal already has the line above
        return 2


def _log_to_files_only(message: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def add_sampler_flags(parser) -> None:
    """--steps, --order, --method, ... : one flag per field of SamplerSettings, with its default."""
    from .sampling import SamplerSettings

    for key, value in SamplerSettings().to_dict().items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)


def sampler_settings(args):
    """The SamplerSettings given by the flags of :func:`add_sampler_flags` (validated)."""
    from .sampling import SamplerSettings

    return SamplerSettings(**{key: getattr(args, key) for key in SamplerSettings().to_dict()})
