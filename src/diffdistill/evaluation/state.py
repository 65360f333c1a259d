"""Resume state of a long evaluation: finished rounds and the running round's newest epoch.

An evaluation of a large pool or the full real set on the challenge schedule (1001 epochs, 3 rounds)
runs for hours, so a killed or pre-empted job should not start over. One folder holds

- ``rounds.json``: the test accuracy and seconds of every finished round;
- ``round_<r>.pt``: the running round's model, optimizer, learning rate, generator state and last
  finished epoch, rewritten every ``every`` epochs (atomically, so a kill never leaves half a file);
- ``rounds_<a>-<b>.pt``: the same for a chunk of rounds trained together (:mod:`diffdistill.evaluation.stacked_rounds`),
  with every round's generator state.

Both carry the job's :class:`~diffdistill.resume.JobKey` (its settings and its data); state with
another key is not used (:mod:`diffdistill.resume`), so a changed config or a resampled pool starts
afresh. With a seed the resumed run draws the same batches and augmentations as an uninterrupted one
and ends with the same accuracies.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from diffdistill import atomic
from diffdistill.errors import DiffdistillError
from diffdistill.resume import JobKey

log = logging.getLogger(__name__)


class EvaluationState:
    """Resume state in ``folder`` for the job identified by ``key``.

    State of another key is left where it is and overwritten as this job writes its own: rounds.json
    is rewritten whole with this job's key at its first finished round and each round file at its first
    save, and every read checks the key, so old and new state are never mixed (and nothing has to be
    moved aside before the folder's one job can run).
    """

    def __init__(self, folder: str | os.PathLike, key: JobKey, every: int = 50):
        if every < 1:
            raise DiffdistillError(f"checkpoint every {every} epochs: must be >= 1")
        self.folder, self.every, self.key = Path(folder), int(every), key
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
        if not isinstance(saved, dict) or not self.key.fits(saved.get("key"), str(self.rounds_file)):
            return {}
        return {int(r): value for r, value in saved["rounds"].items()}

    def finish_round(self, r: int, accuracy: float, seconds: float) -> None:
        known = self._rounds if self._rounds is not None else self._read_rounds()  # no re-read per round
        self._rounds = {**known, r: {"accuracy": accuracy, "seconds": seconds}}
        rounds = {str(k): v for k, v in sorted(self._rounds.items())}
        atomic.write_json(self.rounds_file, {"key": self.key.to_dict(), "rounds": rounds})
        self.round_file(r).unlink(missing_ok=True)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0

    def save_epoch(self, r: int, epoch: int, model, optimizer, lr: float, generator) -> None:
        state = {"epoch": epoch, "lr": lr, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state() if generator is not None else None}
        self._save(self.round_file(r), state)

    def load_epoch(self, r: int) -> dict | None:
        """The running round's state, or None when there is none for this key (or it is unreadable)."""
        return self._load(self.round_file(r), f"round {r + 1}")

    def chunk_file(self, rounds) -> Path:
        return self.folder / f"rounds_{rounds[0]}-{rounds[-1]}.pt"

    def save_chunk(self, rounds, state: dict) -> None:
        """A chunk of stacked rounds after an epoch: epoch, lr, model, optimizer, generators (one per round)."""
        self._save(self.chunk_file(rounds), state)

    def load_chunk(self, rounds) -> dict | None:
        return self._load(self.chunk_file(rounds), f"rounds {rounds[0] + 1}-{rounds[-1] + 1}")

    def finish_chunk(self, rounds, accuracies, seconds) -> None:
        """Rounds of a chunk done: recorded as finished rounds, the chunk's state removed."""
        for r, accuracy, took in zip(rounds, accuracies, seconds):
            self.finish_round(r, accuracy, took)
        self.chunk_file(rounds).unlink(missing_ok=True)

    def _save(self, path: Path, state: dict) -> None:
        atomic.torch_save({"key": self.key.to_dict(), **state}, path)

    def _load(self, path: Path, what: str) -> dict | None:
        if not path.exists():
            return None
        try:
            state = atomic.read_torch(path, "evaluation round checkpoint")
        except DiffdistillError as err:  # our own cache, not the user's input: redo rather than stop
            log.warning("%s; starting %s afresh", err, what)
            return None
        if not isinstance(state, dict) or not self.key.fits(state.get("key"), f"{path} ({what})"):
            return None
        return state

    def clear(self) -> None:
        """Remove the folder once the result is written."""
        shutil.rmtree(self.folder, ignore_errors=True)
