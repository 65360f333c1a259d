"""The one rule for resume state: a state fits a job when the job's settings and its input data are
the ones the state was made with.

Training checkpoints and evaluation rounds are stored with a :class:`JobKey`: a fingerprint of the
settings that decide the result and one of the input data. On resume the stored key is compared with
the job's own; a state whose key differs is not used (a log line names the part that differs) and
the job starts afresh, so one job's folder never mixes the work of two configurations or two data sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

log = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 24  # summed in float64 chunks of this many elements (128 MiB)


def data_fingerprint(*parts, samples: int = 4096) -> str:
    """A cheap identity of the data: for each tensor its shape, dtype, sum and an evenly spaced sample of
    rows; any other part (e.g. class names) as JSON."""
    digest = hashlib.sha1()
    for part in parts:
        if not isinstance(part, torch.Tensor):
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
            continue
        tensor = part.detach().cpu().reshape(-1) if part.dim() == 0 else part.detach().cpu()
        stride = max(1, len(tensor) // samples)
        # Summed in chunks: a float64 copy of a whole large pool would double its memory.
        rows = max(1, _CHUNK_ELEMENTS // max(1, tensor[:1].numel()))
        total = sum(float(chunk.double().sum()) for chunk in tensor.split(rows))
        digest.update(repr((tuple(tensor.shape), str(tensor.dtype), total)).encode())
        digest.update(tensor[::stride].contiguous().numpy().tobytes())
    return digest.hexdigest()


def settings_fingerprint(settings: Mapping) -> str:
    """The identity of a JSON-able mapping of settings (key order does not matter; tuples equal lists)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class JobKey:
    """What a job's result depends on: fingerprints of its settings and of its input data."""

    settings: str
    data: str

    @classmethod
    def of(cls, settings: Mapping, *data) -> "JobKey":
        """The key of a job with these settings on these data (tensors, or JSON-able parts)."""
        return cls(settings_fingerprint(settings), data_fingerprint(*data))

    def to_dict(self) -> dict:
        return asdict(self)

    def differs(self, saved) -> str | None:
        """None when a state stored with ``saved`` (a :meth:`to_dict`) fits this job, else what differs:
        "settings", "data" or "settings and data" (a state without a key fits nothing)."""
        saved = saved if isinstance(saved, Mapping) else {}
        parts = [name for name, value in self.to_dict().items() if saved.get(name) != value]
        return " and ".join(parts) or None

    def fits(self, saved, where: str) -> bool:
        """Whether the state ``where`` (stored with key ``saved``) fits; when not, a log line says why."""
        differs = self.differs(saved)
        if differs:
            log.warning("%s was made with other %s than this job's: not resumed, starting afresh", where, differs)
        return differs is None
