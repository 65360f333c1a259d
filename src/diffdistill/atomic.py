"""File helpers: write-then-rename so that no stage ever leaves a half-written output behind,
and one torch reader whose errors name the file and what was expected.

Every file a stage declares is written to a temporary name in the same folder and moved into place
with ``os.replace`` only once it is complete, so an interrupted or failing job leaves either the
old file or nothing (Snakemake then sees the output as missing, never as done).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tsv(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A header line and one tab-separated line per row (values as ``str``)."""
    lines = ["\t".join(columns)] + ["\t".join(str(v) for v in row) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty JSON (sorted keys are not forced: callers order their dicts for readers)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def publish(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``target`` a copy of the finished file ``source``: a hard link when the file system
    allows it (no extra space), else a copy; atomic either way."""
    import shutil

    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def read_torch(path: str | os.PathLike, what: str, map_location="cpu", *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` (plain tensors and containers, never arbitrary pickles)
    with errors that name the file and what was expected (``what``). With ``mmap`` the tensors are
    mapped from the file and read only when used (a caller that needs a part reads only that part)."""
    import torch

    path = Path(path)
    if not path.is_file():
        from diffdistill.errors import DiffdistillError

        raise DiffdistillError(f"{path}: no such file (expected {what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zips, foreign pickles and refused objects raise many types
        from diffdistill.errors import DiffdistillError

        raise DiffdistillError(
            f"{path}: cannot be read as {what} with torch.load(weights_only=True) ({type(err).__name__}: {err})"
        ) from err


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file, with errors that name the file and what was expected (``what``)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        from diffdistill.errors import DiffdistillError

        raise DiffdistillError(f"{path}: cannot be read as {what} ({type(err).__name__}: {err})") from err


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order)."""
    path, digest = Path(path), hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
