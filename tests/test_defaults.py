"""One source for every default: the config schema holds the workflow's defaults, the package's own
defaults equal them, and a flag the workflow always passes has no default of its own in its script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from diffdistill import sampling, submission, training
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
# Optional keys whose absence means "the same as another block", not a value of their own.
FALLBACKS = {"pretrained.preset", "pretrained.training", "scoring.sampler"}


def properties(schema: dict, prefix: str = ""):
    """(dotted key, property schema, required?) of every key, through $ref and sibling defaults."""
    if "$ref" in schema:
        merged = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[1]]
        overrides = schema.get("properties", {})
        props = {k: {**v, **overrides.get(k, {})} for k, v in merged.get("properties", {}).items()}
        schema = {**merged, "properties": props}
    for key, sub in schema.get("properties", {}).items():
        yield f"{prefix}{key}", sub, key in schema.get("required", [])
        if sub.get("type") == "object" or "$ref" in sub and "training" in sub["$ref"]:
            yield from properties(sub, f"{prefix}{key}.")


def default(key: str):
    found = {k: sub for k, sub, _ in properties(SCHEMA)}
    return found[key]["default"]


def test_every_optional_key_has_a_schema_default():
    missing = [key for key, sub, required in properties(SCHEMA)
               if not required and "default" not in sub and key not in FALLBACKS]
    assert missing == []


@pytest.mark.parametrize("key, package_value", [
    ("finetune.label_dropout", training.TrainConfig(total_steps=1).label_dropout),
    ("finetune.hflip", training.TrainConfig(total_steps=1).hflip),
    ("finetune.grad_accum", training.TrainConfig(total_steps=1).grad_accum),
    ("sampling.budget_s", sampling.BUDGET_S),
    ("seed", training.TrainConfig(total_steps=1).seed),
])
def test_schema_and_package_defaults_agree(key, package_value):
    assert default(key) == package_value


def test_unconditional_pretraining_defaults_to_no_label_dropout():
    # The unconditional model has no null class: TrainConfig's 0.1 would be refused by the trainer.
    assert default("pretrained.training.label_dropout") == 0.0


def parser_defaults(script: str, parse: str, argv: list[str]) -> dict:
    return vars(getattr(load_script(script), parse)(argv))


@pytest.mark.parametrize("script, parse, argv, flags", [
    ("sample_budget", "parse", ["--checkpoint", "c.pt", "--out", "o", "--meta", "m"],
     ["--budget-s", "1", "--batch-size", "2"]),
    ("reference_stats", "parse", ["--real-train", "t.pt", "--extractor", "convnet", "--stats-out", "s"],
     ["--convnet-epochs", "1"]),
    ("score_checkpoint", "parse", ["--checkpoint", "c", "--stats", "s", "--extractor", "convnet",
                                   "--num-images", "4", "--out", "o"], ["--batch-size", "4"]),
    ("evaluate", "parse", ["--train", "t", "--train-format", "images", "--test", "t", "--dataset", "d",
                           "--out", "o"], ["--epochs", "1", "--rounds", "1", "--batch-size", "2"]),
])
def test_flags_the_workflow_always_passes_are_required(script, parse, argv, flags):
    assert parser_defaults(script, parse, [*argv, *flags])  # complete: parses
    for i in range(0, len(flags), 2):
        with pytest.raises(SystemExit):
            parser_defaults(script, parse, [*argv, *flags[:i], *flags[i + 2:]])


def test_script_defaults_that_remain_come_from_the_package():
    train = parser_defaults("train", "parse_args", [
        "--data", "d", "--preset", "uvit_tiny_test", "--total-steps", "2", "--checkpoint-dir", "c",
        "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3", "--betas", "0.9,0.99", "--weight-decay", "0",
        "--warmup-steps", "0", "--ema-rate", "0.9", "--label-dropout", "0", "--no-hflip"])
    config = training.TrainConfig(total_steps=1)
    assert (train["seed"], train["t_min"], train["log_every"]) == (config.seed, config.t_min, config.log_every)
    sample = parser_defaults("sample_budget", "parse", ["--checkpoint", "c.pt", "--out", "o", "--meta", "m",
                                                        "--budget-s", "1", "--batch-size", "2"])
    assert {k: sample[k] for k in sampling.SamplerSettings().to_dict()} == sampling.SamplerSettings().to_dict()


def test_workflow_feature_rules_are_the_package_ones():
    # common.smk writes them out (Snakemake runs without the package under conda deployment).
    text = (Path(__file__).parents[1] / "workflow" / "rules" / "common.smk").read_text()
    written = re.search(r"^FEATURE_RULES = (\(.*\))$", text, re.MULTILINE)
    assert written and ast.literal_eval(written.group(1)) == submission.FEATURE_RULES
