"""One source for every default: a setting lives in the config schema (shape, default) and in its stage's
dataclass (meaning, checks), with the same default; the scripts' flags are made from the dataclass and
the workflow writes them from the config block, so a flag the workflow passes parses back to its value."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from diffdistill import cli
from diffdistill.data import folder
from diffdistill.diffusion import sampler_settings, sampling, training
from diffdistill.packaging import selection, submission
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
        if sub.get("type") == "object" or "$ref" in sub:
            yield from properties(sub, f"{prefix}{key}.")


def default(key: str):
    found = {k: sub for k, sub, _ in properties(SCHEMA)}
    return found[key]["default"]


def test_every_optional_key_has_a_schema_default():
    missing = [key for key, sub, required in properties(SCHEMA)
               if not required and "default" not in sub and key not in FALLBACKS]
    assert missing == []


@pytest.mark.parametrize("key, package_value", [
    ("sampling.budget_s", sampling.BUDGET_S),
    ("seed", training.TrainConfig(total_steps=1).seed),
])
def test_schema_and_package_defaults_agree(key, package_value):
    assert default(key) == package_value


COMMON_SMK = (REPO / "workflow" / "rules" / "common.smk").read_text()
DEFAULT_RUN = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
# The config block of each stage dataclass, and the fields that are not config keys (with why).
STAGES = {"finetune": training.TrainConfig, "sampler": sampler_settings.SamplerSettings}
NOT_IN_CONFIG = {
    "seed": "the config's seed plus the stage's own offset (common.smk stage_seed)",
    "bf16": "autocast on CUDA: the workflow always trains in bf16",
    "log_every": "logging only",
}


def smk_value(name: str):
    """A constant common.smk writes out (Snakemake runs without the package under conda deployment)."""
    written = re.search(rf"^{name} = (.+)$", COMMON_SMK, re.MULTILINE)
    assert written, name
    return ast.literal_eval(written.group(1))


def smk_functions(*names: str) -> dict:
    """common.smk's own functions (module level, plain Python), to call them here as the rules do."""
    namespace = {"SCHEDULER_KEYS": smk_value("SCHEDULER_KEYS")}
    for name in names:
        found = re.search(rf"^def {name}\(.*?(?=^\S)", COMMON_SMK, re.MULTILINE | re.DOTALL)
        assert found, name
        exec(found.group(0), namespace)
    return namespace


def field_defaults(cls) -> dict:
    """Field -> default (as plain JSON-like values: tuples become lists); fields without one are left out."""
    out = {}
    for item in dataclasses.fields(cls):
        value = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        if value is not dataclasses.MISSING:
            out[item.name] = list(value) if isinstance(value, tuple) else value
    return out


def schema_block(block: str) -> dict:
    """key -> (property schema, required?) of a config block, scheduler keys left out."""
    found = {key.split(".", 1)[1]: (sub, required) for key, sub, required in properties(SCHEMA)
             if key.startswith(f"{block}.") and key.count(".") == 1}
    return {key: value for key, value in found.items() if key not in smk_value("SCHEDULER_KEYS")}


@pytest.mark.parametrize("block, cls", STAGES.items())
def test_config_block_and_stage_dataclass_have_the_same_settings_and_defaults(block, cls):
    settings = {item.name for item in dataclasses.fields(cls)} - set(NOT_IN_CONFIG)
    schema, defaults = schema_block(block), field_defaults(cls)
    assert set(schema) == settings
    for key, (sub, required) in schema.items():
        if "default" in sub:
            assert (key, sub["default"]) == (key, defaults[key])
        else:  # no default: the workflow's config always says it
            assert required, key


@pytest.mark.parametrize("block, cls", STAGES.items())
def test_the_default_run_uses_the_defaults(block, cls):
    # Running a script by hand gives the default run: every setting config/config.yaml gives that has a
    # default has it (the paper's configs set their own values).
    defaults, schema = field_defaults(cls), schema_block(block)
    given = {key: value for key, value in DEFAULT_RUN[block].items() if "default" in schema.get(key, ({}, 0))[0]
             and (block, key) not in NEEDS_DATA}
    assert given and given == {key: defaults[key] for key in given}


# Settings the default run turns on but a library call cannot have by default, as they need data the
# caller gives: mode guidance needs the class modes of a real training split (sampler defaults: off).
NEEDS_DATA = {("sampler", "mode_guidance")}


def test_settings_that_need_data_are_off_by_default_and_on_in_the_default_run():
    assert {key: field_defaults(sampler_settings.SamplerSettings)[key] for _, key in NEEDS_DATA} == {"mode_guidance": 0.0}
    assert DEFAULT_RUN["sampler"]["mode_guidance"] > 0


def flag_parser(cls):
    parser = cli.argparse.ArgumentParser()
    cli.add_dataclass_flags(parser, cls)
    return parser


def test_every_setting_is_a_flag_with_its_default_in_help():
    text = flag_parser(training.TrainConfig).format_help()
    for key, value in field_defaults(training.TrainConfig).items():
        assert re.search(rf"--{key.replace('_', '-')}\b.*?default: {re.escape(cli._flag_text(value))}\s",
                         text, re.DOTALL), key
    assert flag_parser(sampler_settings.SamplerSettings).parse_args([]).steps == sampler_settings.SamplerSettings().steps


@pytest.mark.parametrize("settings", [
    training.TrainConfig(total_steps=7, checkpoint_steps=[2, 5], batch_size=6, grad_accum=3, lr=1.5e-4,
                         betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0, ema_rate=0.5, label_dropout=0.0,
                         hflip=True, seed=4, t_min=1e-3, bf16=False, log_every=2, compile=True, fused_adamw=True,
                         tf32=True),
    sampler_settings.SamplerSettings(steps=50, order=3, method="singlestep", algorithm="dpmsolver", skip_type="time_uniform",
                             t_end=1e-4, guidance_scale=2.5, precision="bf16", compile="default", mode_guidance=0.25,
                             mode_guidance_stop=0.4, modes_per_class=3),
])
def test_flags_the_workflow_writes_parse_back_to_the_same_settings(settings):
    flags = smk_functions("settings_args", "cli_flag")["settings_args"](
        {key: list(value) if isinstance(value, tuple) else value for key, value in settings.to_dict().items()})
    cls = type(settings)
    assert cli.dataclass_from_args(cls, flag_parser(cls).parse_args(flags.split())) == settings


def test_training_blocks_become_trainer_flags_without_the_scheduler_keys():
    functions = smk_functions("training_args", "training_steps", "settings_args", "cli_flag")
    train = load_script("train")
    for block in (DEFAULT_RUN["finetune"], DEFAULT_RUN["pretrained"]["training"]):
        flags = functions["training_args"](block).split()
        assert not {f"--{key.replace('_', '-')}" for key in smk_value("SCHEDULER_KEYS")} & set(flags)
        args = train.parse_args(["--data", "d", "--preset", "uvit_tiny_test", "--checkpoint-dir", "c", *flags])
        expected = {key: value for key, value in block.items() if key not in smk_value("SCHEDULER_KEYS")}
        assert cli.dataclass_from_args(training.TrainConfig, args) == training.TrainConfig(**expected)


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


def test_workflow_feature_rules_are_the_package_ones():
    assert smk_value("FEATURE_RULES") == selection.FEATURE_RULES


def test_workflow_challenge_ipc_is_the_package_one():
    assert smk_value("CHALLENGE_IPC") == submission.TRACK1_IPC


def test_the_ipc_grid_is_a_list_and_a_bare_integer_a_grid_of_one():
    ipc_grid = smk_functions("ipc_grid")["ipc_grid"]
    assert ipc_grid([1, 10, 50]) == [1, 10, 50] and ipc_grid(10) == [10]
    assert DEFAULT_RUN["package"]["ipc"] == [1, 10]
    for name in ("cifar100", "tinyimagenet"):  # the challenge's IPC stays in the paper configs' grids
        paper = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
        assert submission.TRACK1_IPC in ipc_grid(paper["package"]["ipc"])
    with pytest.raises(ValueError, match=r"package.ipc: 10 is listed twice in \[1, 10, 10\]"):
        ipc_grid([1, 10, 10])
    for bad in ([0, 10], [5, -1], 0):
        with pytest.raises(ValueError, match=r"package.ipc: (0|-1) is not a positive number"):
            ipc_grid(bad)


def test_the_folder_settings_are_the_data_block_with_the_same_defaults():
    schema = {key: sub for key, (sub, _) in schema_block("data").items() if key not in ("root", "download")}
    assert {key: sub["default"] for key, sub in schema.items()} == field_defaults(folder.FolderSettings)


def test_folder_flags_the_workflow_writes_parse_back():
    namespace = smk_functions("folder_prepare_params", "settings_args", "cli_flag")
    overrides = {"img_size": 16, "patch_size": 4, "in_chans": 1}
    namespace |= {"json": json, "DATASET": "folder", "PRETRAIN_PRESET": "uvit_tiny_test", "config": {
        "data": {"side": 16, "channels": 1}, "package": {"ipc": [1, 10]}, "pretrained": {"source": "train"},
        "model": {"preset": "uvit_digits", "overrides": overrides}}}
    flags = shlex.split(namespace["folder_prepare_params"]()["folder"])
    args = load_script("prepare_data").parse_args(["--dataset", "folder", "--train-out", "a", "--test-out", "b",
                                                   "--sidecar", "c", *flags])
    assert cli.dataclass_from_args(folder.FolderSettings, args) == folder.FolderSettings(side=16, channels=1)
    assert (args.ipc, args.presets, args.model_overrides) == ([1, 10], ["uvit_digits", "uvit_tiny_test"], overrides)
    namespace["config"]["package"]["ipc"] = 10  # package.ipc as one number
    assert "--ipc 10 " in namespace["folder_prepare_params"]()["folder"]
    namespace["DATASET"] = "digits"
    assert namespace["folder_prepare_params"]() == {}  # the other data sets' command stays as it was
