"""Resume state of a long evaluation: finished rounds and the running round's newest epoch.

An evaluation of a large pool or the full real set on the challenge schedule (1001 epochs, 3 rounds)
runs for hours, so a killed or pre-empted job should not start over. One folder holds

- ``rounds.json``: the test accuracy and seconds of every finished round;
- ``round_<r>.pt``: the running round's model, optimizer, learning rate, generator state and last
  finished epoch, rewritten every ``every`` epochs (atomically, so a kill never leaves half a file).

Both carry a key (training settings and a fingerprint of the data); state with another key is
ignored, so a changed config or a resampled pool starts afresh. With a seed the resumed run draws
the same batches and augmentations as an uninterrupted one and ends with the same accuracies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from . import atomic
from .errors import DiffdistillError

log = logging.getLogger(__name__)


def data_fingerprint(*tensors: torch.Tensor, samples: int = 4096) -> str:
    """A cheap identity of the data: shapes, dtypes, sums and an evenly spaced sample of rows."""
    digest = hashlib.sha1()
    for tensor in tensors:
        tensor = tensor.detach().cpu()
        stride = max(1, len(tensor) // samples)
        # Summed in chunks: a float64 copy of a whole large pool would double its memory.
        total = sum(float(part.double().sum()) for part in tensor.split(65536))
        digest.update(repr((tuple(tensor.shape), str(tensor.dtype), total)).encode())
        digest.update(tensor[::stride].contiguous().numpy().tobytes())
    return digest.hexdigest()


class EvaluationState:
    """Resume state in ``folder`` for the run identified by ``key`` (a JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, key: dict, every: int = 50):
        if every < 1:
            raise DiffdistillError(f"checkpoint every {every} epochs: must be >= 1")
        self.folder, self.every = Path(folder), int(every)
        self.key = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rounds: dict[int, dict] | None = None  # rounds.json as last read or written

    @property
    def rounds_file(self) -> Path:
        return self.folder / "rounds.json"

    def round_file(self, r: int) -> Path:
        return self.folder / f"round_{r}.pt"

    def finished_rounds(self) -> dict[int, dict]:
        """Round index -> {"accuracy", "seconds"} of the rounds a previous run finished (read from disk)."""
        self._rounds = self._read_rounds()
        return dict(self._rounds)

    def _read_rounds(self) -> dict[int, dict]:
        if not self.rounds_file.exists():
            return {}
        try:
            saved = atomic.read_json(self.rounds_file, "evaluation resume state")
        except DiffdistillError as err:  # our own cache, not the user's input: redo rather than stop
            log.warning("%s; starting afresh", err)
            return {}
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            log.warning("%s belongs to other settings or data: starting afresh", self.rounds_file)
            return {}
        return {int(r): value for r, value in saved["rounds"].items()}

    def finish_round(self, r: int, accuracy: float, seconds: float) -> None:
        known = self._rounds if self._rounds is not None else self._read_rounds()  # no re-read per round
        self._rounds = {**known, r: {"accuracy": accuracy, "seconds": seconds}}
        rounds = {str(k): v for k, v in sorted(self._rounds.items())}
        atomic.write_json(self.rounds_file, {"key": self.key, "rounds": rounds})
        self.round_file(r).unlink(missing_ok=True)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0

    def save_epoch(self, r: int, epoch: int, model, optimizer, lr: float, generator) -> None:
        state = {"key": self.key, "epoch": epoch, "lr": lr, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state() if generator is not None else None}
        atomic.torch_save(state, self.round_file(r))

    def load_epoch(self, r: int) -> dict | None:
        """The running round's state, or None when there is none for this key (or it is unreadable)."""
        path = self.round_file(r)
        if not path.exists():
            return None
        try:
            state = atomic.read_torch(path, "evaluation round checkpoint")
        except DiffdistillError as err:
            log.warning("%s; starting round %d afresh", err, r + 1)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.warning("%s belongs to other settings or data: starting round %d afresh", path, r + 1)
            return None
        return state

    def clear(self) -> None:
        """Remove the folder once the result is written."""
        shutil.rmtree(self.folder, ignore_errors=True)
