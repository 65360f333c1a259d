"""The summary of budgeted sampling: one JSON layout for a single sampling job and for the merge of
several shards.

The file holds what was measured and nothing twice: the settings every shard shares (solver,
``budget_s``, batch size, checkpoint, ...), the class names, and one entry per shard (its index,
seed, images per class, sampling and loading seconds, device, batches). The pool's totals (images,
images/s of all shards together, the slowest shard's time) are derived from the shards, so a single
job is simply a summary with one shard.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.errors import DiffdistillError
from diffdistill.records import Environment, Record


@dataclass
class BatchTime:
    """One finished sampling batch: its images, its seconds, and when it finished (``end_s``, seconds
    from the budget clock's start: what budget prefixes are cut by)."""

    size: int
    seconds: float
    end_s: float


@dataclass
class ShardRun:
    """One sampling job's figures: images per class, sampling and loading seconds, device, batches."""

    shard: int
    seed: int
    counts: list[int]
    sampling_s: float
    load_s: float
    device_name: str
    dropped_images: int = 0  # made after the budget ran out, not kept
    batch_size_final: int = 0
    # Every finished batch, in sampling order; a dropped batch (ended past the budget) is the last one.
    batches: list[BatchTime] = field(default_factory=list)
    compile_s: float | None = None  # sampler compile: the first network call, inside sampling_s

    @property
    def images(self) -> int:
        return sum(self.counts)

    def images_finished_within(self, seconds: float, where: str = "shard") -> int:
        """How many of the kept images (the first ones of this shard's pool, in sampling order) were in
        batches that finished within ``seconds`` of the budget clock's start."""
        kept, count = 0, 0
        for batch in self.batches:
            if kept >= self.images:
                break  # the rest (a dropped batch) is not in the pool
            kept += batch.size
            if batch.end_s <= seconds:
                count = kept
        if kept != self.images:
            raise DiffdistillError(f"{where}: its batches hold {kept} kept images, its counts {self.images}")
        return count

    @property
    def images_per_s(self) -> float:
        return self.images / self.sampling_s if self.sampling_s > 0 else math.inf


@dataclass
class SamplingJob:
    """The settings every shard of a pool shares: the sampler's, the precision it resolved to on the
    device, the budget and batch (sample_budget's flags) and the checkpoint sampled."""

    sampler: SamplerSettings
    precision_used: str
    budget_s: float
    batch_size: int
    max_images: int | None
    weights: str
    num_shards: int
    checkpoint: str


@dataclass
class SamplingSummary(Record):
    """The settings shared by every shard, the class names and one :class:`ShardRun` per shard; the
    pool's totals are properties. ``sources`` names the shard files of a merged pool."""

    FORMAT: ClassVar[str] = "diffdistill-sampling-summary"
    VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "a sampling summary written by sample_budget or merge_samples"

    settings: SamplingJob
    classes: list[str]
    shards: list[ShardRun]
    environment: Environment
    sources: list[str] = field(default_factory=list)

    @property
    def budget_s(self) -> float:
        return self.settings.budget_s

    @property
    def counts(self) -> list[int]:
        return [sum(column) for column in zip(*(s.counts for s in self.shards))]

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def images_per_s(self) -> float:
        """All shards together: they run in parallel on their own devices, so their rates add up."""
        return sum(s.images_per_s for s in self.shards)

    @property
    def images_per_s_per_shard(self) -> list[float]:
        return [s.images_per_s for s in self.shards]

    @property
    def sampling_s(self) -> float:
        """The slowest shard's sampling time (the pool's wall time)."""
        return max(s.sampling_s for s in self.shards)

    @property
    def load_s(self) -> float:
        return max(s.load_s for s in self.shards)

    @property
    def device_name(self) -> str:
        return ", ".join(sorted({s.device_name for s in self.shards}))

    def finished_within(self, seconds: float) -> list[int]:
        """Positions in the pool (the shards' images one after another, in shard order) of the images
        whose batch finished within ``seconds`` of the budget clock's start; each shard's clock
        started at its own first batch."""
        positions, offset = [], 0
        for i, shard in enumerate(self.shards):
            positions += range(offset, offset + shard.images_finished_within(seconds, f"shards[{i}]"))
            offset += shard.images
        return positions

    def budget_prefix(self, fraction: float) -> tuple[float, list[int]]:
        """(seconds, pool positions) of the images made within the first ``fraction`` of the budget."""
        if not 0.0 < fraction <= 1.0:
            raise DiffdistillError(f"budget fraction must be in (0, 1], got {fraction}")
        seconds = fraction * self.budget_s
        return seconds, self.finished_within(seconds)

    @property
    def sampler(self) -> SamplerSettings:
        return self.settings.sampler

    def check(self, where: str) -> None:
        if not self.shards:
            raise DiffdistillError(f"{where}: field 'shards' is empty, expected at least one shard")

    @classmethod
    def merge(cls, parts: list["SamplingSummary"], *, environment: Environment,
              sources: list[str] | None = None) -> "SamplingSummary":
        """One summary of the shards' summaries: same settings and classes required; shards kept in order."""
        if not parts:
            raise DiffdistillError("no shard summaries to merge")
        for i, part in enumerate(parts[1:], 1):
            if part.settings != parts[0].settings:
                mine, first = _flat(part.settings), _flat(parts[0].settings)
                differ = sorted(k for k in {*mine, *first} if mine.get(k) != first.get(k))
                raise DiffdistillError(f"shard summary {i}: settings {differ} differ from shard summary 0's")
            if part.classes != parts[0].classes:
                raise DiffdistillError(f"shard summary {i}: classes differ from shard summary 0's")
        return cls(settings=parts[0].settings, classes=list(parts[0].classes),
                   shards=[s for part in parts for s in part.shards], environment=environment,
                   sources=list(sources or []))


def _flat(job: SamplingJob) -> dict:
    """The job's settings by name, the sampler's as ``sampler.<name>`` (to name the ones that differ)."""
    flat = asdict(job)
    return {**{f"sampler.{k}": v for k, v in flat.pop("sampler").items()}, **flat}
