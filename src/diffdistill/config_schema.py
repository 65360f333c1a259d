"""The workflow's config schema, made from the settings' declarations (:mod:`diffdistill.settings`).

Each config block is one or more settings dataclasses, declared beside the stage that uses them; the
blocks that only the workflow reads (the top level, ``pretrained``, ``model``) are declared here.
``python -m diffdistill.config_schema`` prints the schema; the committed
``workflow/schemas/config.schema.yaml`` is its output (tests/test_defaults.py regenerates it and
compares), because Snakemake validates the config before any job runs and must do so without the
package installed (conda deployment installs it into the jobs' environment only).

A key that a script takes as a flag carries ``x-flags: <settings class>`` in the schema: common.smk
passes the keys of one class to its script, and the script parses them with
:func:`diffdistill.cli.add_dataclass_flags` from the same class. ``x-facts`` holds the package facts
the rules need (the challenge's IPC, the package rules that need the feature ConvNet).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import yaml

from diffdistill import settings
from diffdistill.data.datasets import DATASETS, DataSource
from diffdistill.data.folder import FolderSettings
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling import SamplingSettings
from diffdistill.diffusion.training import TrainConfig, TrainingJob
from diffdistill.evaluation.entry import EvaluationSettings
from diffdistill.packaging import submission
from diffdistill.packaging.selection import FEATURE_RULES, PackageSettings
from diffdistill.scoring.checkpoint_scores import ScoringSettings
from diffdistill.scoring.feature_convnet import ReferenceSettings
from diffdistill.settings import setting


@dataclass
class WorkflowSettings:
    """The top level: which data set, where the outputs go, the device and the seed."""

    dataset: str = setting(flag=False, choices=DATASETS, description=(
        "mnist: needs the extra diffdistill[mnist]; folder: your own, train/<class>/* and test/<class>/* "
        "(or val/) under data.root"))
    results: str = setting(flag=False, description="output root; outputs go to <results>/<dataset>/")
    device: str = setting("auto", flag=False, pattern="^(auto|cpu|cuda(:[0-9]+)?)$",
                          description="auto: CUDA when present, else the CPU")
    seed: int = setting(0, flag=False, minimum=0, description="every stage derives its own seed from it")


@dataclass
class PretrainedSettings:
    """The weights fine-tuning starts from."""

    source: str = setting(flag=False, choices=("train", "file", "none"), description=(
        "train: an unconditional run on the training split (the pretrained.training block); file: "
        "pretrained.path; none: from scratch"))
    path: str | None = setting(None, flag=False, description="the checkpoint file when source is file")
    preset: str | None = setting(None, flag=False, schema_default=False, description=(
        "the U-ViT of the unconditional run; no default: model.preset when absent"))


@dataclass
class ModelSettings:
    """The fine-tuned U-ViT."""

    preset: str = setting(flag=False, description="a key of diffdistill.diffusion.uvit.PRESETS")
    overrides: dict = setting({}, flag=False, description=(
        "constructor keywords that replace the preset's, e.g. {embed_dim: 96}"))


# The unconditional pre-training run differs from fine-tuning in these defaults: an unconditional
# model has no null class, so no label dropout; and it is shorter on a cluster.
PRETRAINING_DEFAULTS = {"label_dropout": 0.0, "runtime_min": 600, "mem_mb": 16000}

DESCRIPTION = (
    "diffdistill workflow configuration, made by python -m diffdistill.config_schema from the settings' "
    "declarations in the package (do not edit by hand). Every mapping refuses unknown keys, so a typo stops "
    "the run with its name. Every optional key has its default here (Snakemake's validation fills it in, "
    "so the rules index config directly).")


def block(*classes, defaults: dict | None = None, **extra) -> dict:
    """One config block from settings classes (:func:`diffdistill.settings.block_schema` of each, merged)."""
    merged: dict = {"type": "object", "additionalProperties": False, "properties": {}}
    required: list[str] = []
    for cls in classes:
        part = settings.block_schema(cls, defaults=defaults, refs={SamplerSettings: "sampler"})
        merged["properties"] |= part["properties"]
        required += part.get("required", [])
    merged["properties"] |= extra.pop("properties", {})
    if required:
        merged["required"] = required
    return merged | extra


def sweep_schema() -> dict:
    return {
        "description": (
            "sampler variants, each sampled from the best checkpoint against the same sampling budget and its "
            "pool evaluated (one sampling and one evaluation job each); [] = off. A variant is a mapping of "
            "sampler keys (over the top-level sampler; checked against #/$defs/sampler in "
            "workflow/rules/common.smk, which names a bad or unknown key) and an optional name (default: from "
            "its keys, e.g. s10_w2 for steps 10, guidance_scale 2)"),
        "type": "array", "default": [],
        "items": {"type": "object", "properties": {"name": {"type": "string",
                                                            "pattern": "^[A-Za-z0-9][A-Za-z0-9_.+-]*$"}}},
    }


def external_schema() -> dict:
    return {
        "description": (
            "distilled sets you bring, each evaluated against the data set's test split beside random real of "
            "its IPC (no fine-tuning or sampling runs while this list is not empty). path: a file in the "
            "challenge layout (a bare normalised float tensor, class-major, IPC = rows / classes) or a folder "
            "of one subfolder of images per class (or holding train/ with them); name: default the file or "
            "folder name"),
        "type": "array", "default": [],
        "items": {"type": "object", "additionalProperties": False, "required": ["path"],
                  "properties": {"path": {"type": "string", "minLength": 1},
                                 "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.+-]*$"}}},
    }


def config_schema() -> dict:
    """The whole schema, as committed in workflow/schemas/config.schema.yaml."""
    training = block(TrainConfig, TrainingJob)
    pretraining = block(TrainConfig, TrainingJob, defaults=PRETRAINING_DEFAULTS, description=(
        "the unconditional run (source train); no default: the finetune block when absent"))
    pretrained = block(PretrainedSettings, properties={"training": pretraining})
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": DESCRIPTION,
        "x-facts": {"challenge_ipc": submission.TRACK1_IPC, "feature_rules": list(FEATURE_RULES)},
        "$defs": {"sampler": block(SamplerSettings)},
        **block(WorkflowSettings),
    }
    schema["properties"] |= {
        "data": block(DataSource, FolderSettings),
        "pretrained": pretrained,
        "model": block(ModelSettings),
        "finetune": training,
        "sampler": {"$ref": "#/$defs/sampler"},
        "scoring": block(ReferenceSettings, ScoringSettings),
        "sampling": block(SamplingSettings),
        "package": block(PackageSettings),
        "evaluation": block(EvaluationSettings),
        "sweep": sweep_schema(),
        "external": external_schema(),
    }
    schema["required"] = [*schema["required"], "data", "pretrained", "model", "finetune", "sampler", "scoring",
                          "sampling", "package", "evaluation"]
    return schema


class _Flow(dict):
    """A mapping written on one line: a setting's own schema."""


class _FlowList(list):
    pass


def _flowing(node):
    """Leaf mappings (every value a scalar or a list of scalars) and scalar lists on one line each."""
    if isinstance(node, dict):
        leaf = all(not isinstance(v, dict) and not (isinstance(v, list) and any(isinstance(i, dict) for i in v))
                   for v in node.values())
        return (_Flow if leaf else dict)({key: _flowing(value) for key, value in node.items()})
    if isinstance(node, list):
        return _FlowList(node) if not any(isinstance(i, (dict, list)) for i in node) else [_flowing(i) for i in node]
    return node


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def render() -> str:
    """The schema file's text."""
    header = "# Made by `python -m diffdistill.config_schema` from the settings' declarations: do not edit.\n"
    return header + yaml.dump(_flowing(config_schema()), Dumper=_Dumper, sort_keys=False, width=120,
                              allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
