"""Versioned JSON records of stage results, validated when read.

A record is a dataclass whose file holds ``format`` (the record type) and ``version`` beside its
fields. Reading checks both, then every field against its annotation (nested dataclasses and list
items too): a missing or ill-typed field, an unknown key or another record type or version stops the
reader with the file, the field and what was expected, so readers use the fields as they are.
Records here: a checkpoint's score (score_checkpoint), the chosen checkpoint (select_checkpoint's
best.json), an evaluation (evaluate) and the run's summary (report's summary.json); the sampling
summary (:class:`diffdistill.diffusion.sampling_summary.SamplingSummary`) is one too. Every record's
``environment`` is an :class:`Environment` and its ``timings_s`` a mapping of names to seconds.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from diffdistill import atomic
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.errors import DiffdistillError


class Record:
    """Base of a dataclass stored as a versioned JSON record: ``FORMAT`` names the record type,
    ``VERSION`` its layout (raise it when a field changes meaning), ``WHAT`` says what it is in errors."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    WHAT: ClassVar[str]

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, doc, where: str):
        """Read :meth:`to_json`'s layout; errors name ``where`` and the field that is wrong."""
        if not isinstance(doc, dict):
            raise DiffdistillError(f"{where}: is {_found(doc)}, expected a JSON object: {cls.WHAT}")
        if doc.get("format") != cls.FORMAT:
            raise DiffdistillError(f"{where}: field 'format' is {doc.get('format')!r}, expected {cls.FORMAT!r}: "
                                   f"{cls.WHAT}")
        if doc.get("version") != cls.VERSION:
            raise DiffdistillError(f"{where}: field 'version' is {doc.get('version')!r}, expected {cls.VERSION} "
                                   f"(the {cls.FORMAT} layout this diffdistill reads): rerun the stage that wrote it")
        record = cls(**fields_from_json(cls, {k: v for k, v in doc.items() if k not in ("format", "version")}, where))
        record.check(where)
        return record

    def check(self, where: str) -> None:
        """What the field types do not say (a subclass's own rules); raise DiffdistillError naming ``where``."""

    @classmethod
    def read(cls, path: str | os.PathLike):
        return cls.from_json(atomic.read_json(path, cls.WHAT), str(path))

    def write(self, path: str | os.PathLike) -> None:
        atomic.write_json(path, self.to_json())


def fields_from_json(cls, doc, where: str, path: str = "") -> dict:
    """The keyword arguments of dataclass ``cls`` from a JSON object, each checked against its field's
    annotation; a field with a default may be absent; unknown keys are refused. ``path`` prefixes the
    field names in errors (a nested record's place, e.g. ``shards[0].``)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(doc, dict):
        raise DiffdistillError(f"{where}: field {path.rstrip('.') or 'record'!r} is {_found(doc)}, "
                               f"expected {_describe(cls)}")
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise DiffdistillError(f"{where}: unknown fields {[path + name for name in unknown]} "
                               f"(expected {sorted(known)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in known.items():
        if name in doc:
            values[name] = _value(doc[name], hints[name], where, path + name)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise DiffdistillError(f"{where}: field {path + name!r} missing (expected {_describe(hints[name])})")
    return values


def _value(value, hint, where: str, name: str):
    """``value`` checked against the annotation ``hint`` (a nested dataclass is built)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:  # the first whose outer type fits checks the inside
            if _is_instance(value, arg):
                return _value(value, arg, where, name)
    elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
        arguments = fields_from_json(hint, value, where, f"{name}.")
        try:
            return hint(**arguments)
        except DiffdistillError as error:  # a settings class's own range checks
            raise DiffdistillError(f"{where}: field {name!r}: {error}") from None
    elif origin is list and isinstance(value, list):
        return [_value(item, args[0], where, f"{name}[{i}]") for i, item in enumerate(value)] if args else value
    elif origin is dict and isinstance(value, dict):
        return {key: _value(item, args[1], where, f"{name}.{key}") for key, item in value.items()}
    elif _is_instance(value, hint):
        return value
    raise DiffdistillError(f"{where}: field {name!r} is {_found(value)}, expected {_describe(hint)}")


def _is_instance(value, hint) -> bool:
    """Whether ``value`` has the outer type of ``hint`` (a list of anything for ``list[int]``)."""
    kind = dict if dataclasses.is_dataclass(hint) else typing.get_origin(hint) or hint
    if kind is Any:
        return True
    if isinstance(value, bool):  # JSON true/false are not numbers
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in args)
    if dataclasses.is_dataclass(hint):
        return f"an object with {[f.name for f in dataclasses.fields(hint)]}"
    if origin is list:
        return f"a list (each {_describe(args[0])})" if args else "a list"
    if origin is dict:
        return f"an object (each value {_describe(args[1])})"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
             list: "a list", Any: "any value"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _found(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


@dataclass
class Environment:
    """The software and hardware a record was made with (diffdistill.cli.environment)."""

    diffdistill: str
    python: str
    torch: str
    numpy: str
    host: str
    cpu_threads: int
    # The vector width of torch's CPU kernels: results are bit-identical on one machine and move in
    # the last digits between AVX-512 and AVX2 (docs/reference.md, "The default on a CPU"); null in
    # records from before it was kept.
    cpu_capability: str | None = None
    device: str | None = None
    device_name: str | None = None


# Seconds by what they timed; a list for per-round times.
Timings = dict[str, float | list[float]]

# A job's parsed flags by name, as its log's command line gives them: the settings of the records
# that no later stage reads (kept for a reader). A record whose settings a stage reads declares them
# as a dataclass (PackageJob, TrainingJob, PreparedJob, sampling_summary.SamplingJob).
Flags = dict[str, Any]


# --------------------------------------------------------------------------- the stages' records


@dataclass(kw_only=True)
class CheckpointScore(Record):
    """score_checkpoint's result: the Fréchet distance (``score``, of ``score_kind`` FID or FD-ConvNet) of
    ``num_images`` samples of one checkpoint's EMA weights to the real statistics, with its timings."""

    FORMAT: ClassVar[str] = "diffdistill-checkpoint-score"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "a checkpoint score written by score_checkpoint"

    settings: Flags
    step: int
    score: float  # NaN for a diverged checkpoint (never selected)
    score_kind: str
    num_images: int
    checkpoint: str
    seconds: float
    sampling_s: float
    features_s: float
    reference_count: int
    timings_s: Timings
    environment: Environment


@dataclass(kw_only=True)
class BestCheckpoint(Record):
    """select_checkpoint's choice (best.json): the checkpoint with the lowest score and that score."""

    FORMAT: ClassVar[str] = "diffdistill-best-checkpoint"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "the chosen checkpoint (best.json) written by select_checkpoint"

    settings: Flags
    step: int
    score: float
    score_kind: str
    num_images: int
    checkpoint: str
    environment: Environment
    timings_s: Timings = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, score: CheckpointScore, *, settings: Flags, environment: Environment) -> "BestCheckpoint":
        return cls(settings=settings, step=score.step, score=score.score, score_kind=score.score_kind,
                   num_images=score.num_images, checkpoint=score.checkpoint, environment=environment)


@dataclass
class BudgetPrefix:
    """The images of a pool made within ``fraction`` of its sampling budget: ``seconds`` and their count."""

    fraction: float
    seconds: float
    images: int


@dataclass(kw_only=True)
class EvaluationResult(Record):
    """evaluate's result: test accuracies (fractions) of ``rounds`` ConvNets trained on one training set,
    their mean and std (null when the set was empty), and for a budget prefix which images it held."""

    FORMAT: ClassVar[str] = "diffdistill-evaluation"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "an evaluation result written by evaluate"

    settings: Flags
    mean: float | None
    std: float | None
    accuracies: list[float]
    epochs: int
    rounds: int
    train_size: int
    resumed_rounds: list[int] = dataclasses.field(default_factory=list)
    rounds_at_once: int = 1  # rounds trained together (stacked_rounds; 1: one after another)
    environment: Environment
    budget_prefix: BudgetPrefix | None = None
    timings_s: Timings = dataclasses.field(default_factory=dict)


@dataclass
class MeanStd:
    """An evaluation's accuracy (fractions): mean and std over rounds; null for an empty training set."""

    mean: float | None
    std: float | None


@dataclass
class IpcRow:
    """One IPC of the grid: its package and the random real subsets of its size."""

    ipc: int
    synthetic: MeanStd
    real: MeanStd


@dataclass
class FieldScores:
    """The field's scores of a distilled set (:mod:`diffdistill.evaluation.field_scores`): HLR, IOR, LRS
    and, when the evaluations without augmentation were run, ARS; each the mean and population std of
    its per-round values (accuracy fractions for HLR and IOR, [0, 1] for LRS and ARS)."""

    hlr: MeanStd
    ior: MeanStd
    lrs: MeanStd
    ars: MeanStd | None = None


@dataclass
class SetAccuracy:
    """Test accuracy (fractions) of the challenge ConvNet trained on a distilled set, on random real subsets
    of its IPC and on the full real training split, with the protocol that gave them."""

    synthetic: MeanStd
    random_real: MeanStd
    full_real: MeanStd
    epochs: int
    full_real_epochs: int
    rounds: int
    augmentation: str


@dataclass
class IpcScores:
    """The field's scores of one IPC's package."""

    ipc: int
    scores: FieldScores


@dataclass
class BudgetPoint:
    """The pool's images made within ``fraction`` of the sampling budget, and their accuracy."""

    fraction: float
    seconds: float
    images: int
    accuracy: MeanStd


@dataclass
class SweepRow:
    """One sampler variant of the sweep: its settings, its pool and the pool's accuracy."""

    name: str
    settings: SamplerSettings
    images: int
    images_per_s: float
    accuracy: MeanStd


@dataclass(kw_only=True)
class RunSummary(Record):
    """report's summary.json: the run's numbers. ``accuracy`` holds every accuracy evaluation by kind
    (``synthetic_ipc<n>`` and ``real_ipc<n>`` for each IPC n of the grid, ``synthetic_pool``,
    ``real_full``); ``scores`` the field's scores of each IPC's package; ``budget_curve`` and ``sweep``
    are empty when their studies are off."""

    FORMAT: ClassVar[str] = "diffdistill-summary"
    VERSION: ClassVar[int] = 3
    WHAT: ClassVar[str] = "the run's summary (summary.json) written by report"

    dataset: str
    best_step: int
    best_score: float
    score_kind: str
    pool_images: int
    sampling_images_per_s: float  # all shards together
    sampling_images_per_s_per_shard: list[float]
    budget_s: float
    accuracy: dict[str, MeanStd]
    ipc_grid: list[IpcRow]
    scores: list[IpcScores]
    budget_curve: list[BudgetPoint]
    sweep: list[SweepRow]


# --------------------------------------------------------------------------- the sidecars beside outputs


@dataclass
class FolderJob:
    """How a folder data set was read: image side, channels (and whether inferred from the files), the
    IPCs and U-ViT presets its classes were checked against."""

    side: int
    channels: int
    channels_inferred: bool
    ipc: list[int]
    presets: list[str]


@dataclass
class PreparedJob:
    """prepare_data's settings: the data set, where it was read and written; ``folder`` for a folder."""

    dataset: str
    root: str | None
    download: bool
    train_out: str
    test_out: str
    folder: FolderJob | None = None


@dataclass
class SplitSummary:
    """One prepared split: its size, shape, images per class, source and, for the embedded sets that
    are split here, the split's rule (``test_fraction`` or ``train_per_class``, and ``seed``)."""

    count: int
    shape: list[int]
    num_classes: int
    counts_per_class: list[int]
    source: str
    test_fraction: float | None = None
    train_per_class: int | None = None
    seed: int | None = None


@dataclass(kw_only=True)
class PreparedData(Record):
    """prepare_data's record (data/prepare.json): the settings, the class names and each split's summary."""

    FORMAT: ClassVar[str] = "diffdistill-prepared-data"
    VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "the prepared data's record (prepare.json) written by prepare_data"

    settings: PreparedJob
    classes: list[str]
    splits: dict[str, SplitSummary]
    timings_s: Timings
    environment: Environment


@dataclass
class TrainingJob:
    """train's settings: the data, the model (preset, overrides, its resolved constructor keywords in
    ``model``), the weights it started from, the device and the training settings
    (``diffusion.training.TrainConfig.to_dict()``, declared there)."""

    data: str
    preset: str
    model_overrides: dict[str, Any]
    num_classes: int
    init: str | None
    device: str
    resume: bool
    training: dict[str, Any]
    model: dict[str, Any]
    init_summary: str | None  # what the pretrained weights gave (checkpoint.LoadReport.summary())


@dataclass
class LossPoint:
    """The training loss averaged since the previous point, and the speed over those steps."""

    step: int
    loss: float
    images_per_s: float


@dataclass(kw_only=True)
class TrainingRun(Record):
    """train's record (train.json beside the checkpoints): the settings, where the run started (a
    resumed checkpoint), the pretrained weights' transfer, the checkpoints, the last loss, speed and
    the loss history."""

    FORMAT: ClassVar[str] = "diffdistill-training-run"
    VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "a training run's record (train.json) written by train"

    settings: TrainingJob
    world_size: int
    start_step: int
    resumed_from: str | None
    init_report: dict[str, Any] | None  # checkpoint.LoadReport.to_dict(): which tensors came from the weights
    checkpoints: dict[str, str]  # step -> file
    final_step: int
    steps_run: int
    final_loss: float | None
    images_per_s: float | None
    loss_history: list[LossPoint]
    timings_s: Timings
    environment: Environment


@dataclass
class PackageJob:
    """package's settings: the data set, the IPC, the selection rule and its seed, and the files read."""

    dataset: str
    ipc: int
    rule: str
    seed: int
    pool: str
    real_train: str | None


@dataclass
class ValidatorCheck:
    """One check of the submission validator (packaging.submission): pass, fail or info, and what it saw."""

    check: str
    status: str
    detail: str


@dataclass(kw_only=True)
class PackageRecord(Record):
    """package's record (package.json): how the package was made (rule, IPC, pool), its shape and
    normalisation, which pool images it holds and the validator's checks."""

    FORMAT: ClassVar[str] = "diffdistill-package"
    VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "a package's record (package.json) written by package"

    settings: PackageJob
    package: str
    shape: list[int]
    mean: list[float]
    std: list[float]
    classes: list[str]
    pool_counts: list[int]
    pool_images: int
    chosen_indices: list[int]
    checks: list[ValidatorCheck]
    environment: Environment
    timings_s: Timings = dataclasses.field(default_factory=dict)


@dataclass(kw_only=True)
class ReferenceStatsRecord(Record):
    """reference_stats' record (optional, --meta): the real statistics' image count, feature size and
    score kind, and the feature ConvNet's training and feature times."""

    FORMAT: ClassVar[str] = "diffdistill-reference-stats"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "the reference statistics' record written by reference_stats"

    settings: Flags
    count: int
    dims: int
    score_kind: str
    timings_s: Timings
    environment: Environment


# --------------------------------------------------------------------------- sets you bring (config key external)


@dataclass(kw_only=True)
class ExternalSet(Record):
    """external_set's record (external/<name>/set.json): where the set came from, its form and IPC, and
    the sha256 of its bytes (the file, or the folder's files in sorted order)."""

    FORMAT: ClassVar[str] = "diffdistill-external-set"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "a distilled set's record (set.json) written by external_set"

    name: str
    source: str
    form: str  # "package" or "folder"
    ipc: int
    classes: list[str]
    image_shape: list[int]
    sha256: str
    environment: Environment


@dataclass(kw_only=True)
class ExternalResult(Record):
    """One set you brought, evaluated (external/<name>/result.json): its accuracy against random real of
    its IPC and the full real split, under the same protocol, and the field's scores."""

    FORMAT: ClassVar[str] = "diffdistill-external-result"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "a distilled set's evaluation (result.json) written by external_report"

    name: str
    source: str
    form: str
    ipc: int
    sha256: str
    accuracy: SetAccuracy
    scores: FieldScores


@dataclass(kw_only=True)
class ExternalSummary(Record):
    """external_report's summary (external/summary.json): every set you brought, evaluated."""

    FORMAT: ClassVar[str] = "diffdistill-external-summary"
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "the summary of the sets you brought (external/summary.json) written by external_report"

    dataset: str
    sets: list[ExternalResult]
