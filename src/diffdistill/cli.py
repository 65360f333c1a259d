"""Shared wiring for the stage scripts in ``workflow/scripts``: logging, device, seed, flags.

Each script is ``main(argv) -> int``: parse flags, call :func:`start` (logs the command line, picks
device and seed), call one package function, write its outputs and a typed JSON record
(:mod:`diffdistill.records`, with :func:`environment`). :func:`run_main` turns a
:class:`~diffdistill.errors.DiffdistillError` into a one-line error and exit status 2, and removes the
declared outputs this run created, so a failed run leaves nothing half-made and nothing made before is
lost.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import random
import shlex
import sys
import time
import types
import typing
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from diffdistill import __version__, host_memory, settings
from diffdistill.errors import DiffdistillError
from diffdistill.records import Environment

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


def start(script: str, argv: Sequence[str], log_file=None, device: str = "auto", seed: int | None = None, *,
          trains: bool = False):
    """Common start of every script: logging, the command line, device and seed. A script that
    ``trains`` a network (fine-tuning, the evaluations, the feature ConvNet) keeps freed host memory for
    reuse on a CPU (:mod:`diffdistill.host_memory`): 1.17-1.42x faster there, and nothing gained on a
    GPU or in sampling and scoring, where it only held on to memory (docs/reference.md, "Host
    memory"). Returns the device."""
    setup_logging(log_file)
    log.info("%s %s", script, " ".join(shlex.quote(a) for a in argv))
    dev = resolve_device(device)
    if trains and dev.type == "cpu" and host_memory.keep_freed_memory():
        log.info("host memory: freed blocks kept for reuse (glibc mmap threshold %d MiB, trim threshold %d MiB)",
                 host_memory.MMAP_THRESHOLD_BYTES >> 20, host_memory.TRIM_THRESHOLD_BYTES >> 20)
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


def environment(device=None) -> Environment:
    """Versions and hardware, for records, sidecars and checkpoints."""
    import numpy as np
    import torch

    return Environment(
        diffdistill=__version__, python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
        host=platform.node(), cpu_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        device=None if device is None else str(device), device_name=None if device is None else device_name(device))


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


def add_dataclass_flags(parser, cls) -> None:
    """One flag per setting of the dataclass ``cls`` that is a script flag (:mod:`diffdistill.settings`;
    ``--t-min`` for ``t_min``), typed by its annotation, with its default and description (shown by
    ``--help``); a setting without a default is a required flag. ``bool`` is a switch (``--hflip`` /
    ``--no-hflip``); a list or tuple of numbers is written comma-separated (``--betas 0.99,0.999``) and an
    optional value as ``none`` when absent, as the workflow writes them (common.smk's cli_flag)."""
    hints = typing.get_type_hints(cls)
    for item in settings.flag_fields(cls):
        flag, default = "--" + item.name.replace("_", "-"), settings.default_of(item)
        about = item.metadata.get("description", "")
        options: dict = {"required": True, "help": about} if default is dataclasses.MISSING else {
            "default": default, "help": f"{about}{'; ' if about else ''}default: {_flag_text(default)}"}
        kind = hints[item.name]
        if item.metadata.get("choices") is not None:
            options["choices"] = item.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag, type=_flag_parser(kind, f"{cls.__name__}.{item.name}"), **options)


def dataclass_from_args(cls, args):
    """The ``cls`` given by the flags of :func:`add_dataclass_flags` (checked by its own ``__post_init__``)."""
    return cls(**{item.name: getattr(args, item.name) for item in settings.flag_fields(cls)})


def _flag_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _flag_parser(kind, name: str) -> Callable[[str], object]:
    """int, float and str parse as themselves; list[int] / tuple[float, ...] from "a,b,c"; an optional
    type from "none" as None, else as its type."""
    if kind in (int, float, str):
        return kind
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        inner = _flag_parser(next(a for a in args if a is not type(None)), name)
        return lambda text: None if text == "none" else inner(text)
    items = set(args) - {Ellipsis}
    if typing.get_origin(kind) in (list, tuple) and len(items) == 1 and items <= {int, float}:
        number = items.pop()
        return lambda text: [number(part) for part in text.split(",") if part]
    raise TypeError(f"{name}: no command-line flag for type {kind!r}")
