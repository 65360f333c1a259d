"""One declaration per setting: the config schema is made from the settings' declarations
(diffdistill.config_schema) and committed; the scripts' flags are made from the same declarations,
and the workflow writes them from the config block, so a flag the workflow passes parses back to its
value."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from diffdistill import cli, config_schema, settings
from diffdistill.data import folder
from diffdistill.diffusion import sampler_settings, sampling, training
from diffdistill.evaluation import entry
from diffdistill.packaging import selection, submission
from diffdistill.scoring import checkpoint_scores, feature_convnet
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_FILE.read_text())
COMMON_SMK = (REPO / "workflow" / "rules" / "common.smk").read_text()
DEFAULT_RUN = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
# Optional keys whose absence means "the same as another block", not a value of their own.
FALLBACKS = {"pretrained.preset", "pretrained.training", "scoring.sampler"}


def test_the_committed_schema_is_the_one_the_declarations_make():
    assert SCHEMA_FILE.read_text() == config_schema.render(), (
        "regenerate it: python -m diffdistill.config_schema > workflow/schemas/config.schema.yaml")


def properties(schema: dict, prefix: str = ""):
    """(dotted key, property schema, required?) of every key, through $ref."""
    if "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    for key, sub in schema.get("properties", {}).items():
        yield f"{prefix}{key}", sub, key in schema.get("required", [])
        if sub.get("type") == "object" or "$ref" in sub:
            yield from properties(sub, f"{prefix}{key}.")


def test_every_optional_key_has_a_schema_default():
    missing = [key for key, sub, required in properties(SCHEMA)
               if not required and "default" not in sub and key not in FALLBACKS]
    assert missing == []


def test_a_declared_range_is_checked_when_settings_are_made():
    with pytest.raises(Exception, match=r"sampling settings: budget_s must be > 0, got 0"):
        sampling.SamplingSettings(budget_s=0)
    with pytest.raises(Exception, match=r"evaluation settings: budget_fractions must be <= 1, got \[0.5, 2.0\]"):
        entry.EvaluationSettings(epochs=1, pool_epochs=1, rounds=1, budget_fractions=[0.5, 2.0])
    with pytest.raises(Exception, match=r"budget_fractions must list each value once"):
        entry.EvaluationSettings(epochs=1, pool_epochs=1, rounds=1, budget_fractions=[0.5, 0.5])
    with pytest.raises(Exception, match=r"extractor must be one of \['inception', 'convnet'\], got 'fid'"):
        feature_convnet.ReferenceSettings(extractor="fid")


def test_resume_keys_are_the_settings_declared_so():
    assert settings.resume_keys(training.TrainConfig) == (
        "batch_size", "lr", "betas", "weight_decay", "warmup_steps", "ema_rate", "label_dropout", "hflip", "seed",
        "t_min")
    assert settings.resume_keys(entry.EvaluationSettings) == ("rounds", "batch_size")


def smk_functions(*names: str) -> dict:
    """common.smk's own functions (module level, plain Python), to call them here as the rules do."""
    namespace = {"SCHEMA": SCHEMA}
    for name in names:
        found = re.search(rf"^def {name}\(.*?(?=^\S)", COMMON_SMK, re.MULTILINE | re.DOTALL)
        assert found, name
        exec(found.group(0), namespace)
    return namespace


def field_defaults(cls) -> dict:
    """Field -> default (tuples as lists, as in the config); fields without one are left out."""
    out = {}
    for item in dataclasses.fields(cls):
        value = settings.default_of(item)
        if value is not dataclasses.MISSING:
            out[item.name] = list(value) if isinstance(value, tuple) else value
    return out


# Settings the default run turns on but a library call cannot have by default, as they need data the
# caller gives: mode guidance needs the class modes of a real training split (sampler defaults: off).
NEEDS_DATA = {("sampler", "mode_guidance")}
# Settings of one run's own length: the steps that keep a checkpoint (default: only the last).
RUN_LENGTH = {("finetune", "checkpoint_steps")}


@pytest.mark.parametrize("block, cls", [("finetune", training.TrainConfig),
                                        ("sampler", sampler_settings.SamplerSettings)])
def test_the_default_run_uses_the_defaults(block, cls):
    # Running the trainer or the sampler by hand gives the default run: every setting config/config.yaml
    # gives has its default there (the paper's configs set their own values).
    defaults = field_defaults(cls)
    given = {key: value for key, value in DEFAULT_RUN[block].items() if key in defaults
             and (block, key) not in NEEDS_DATA | RUN_LENGTH}
    assert given and given == {key: defaults[key] for key in given}


def test_settings_that_need_data_are_off_by_default_and_on_in_the_default_run():
    assert {key: field_defaults(sampler_settings.SamplerSettings)[key] for _, key in NEEDS_DATA} == {"mode_guidance": 0.0}
    assert DEFAULT_RUN["sampler"]["mode_guidance"] > 0


def flag_parser(*classes):
    parser = cli.argparse.ArgumentParser()
    for cls in classes:
        cli.add_dataclass_flags(parser, cls)
    return parser


def test_every_setting_is_a_flag_with_its_default_in_help():
    text = flag_parser(training.TrainConfig).format_help()
    for key, value in field_defaults(training.TrainConfig).items():
        assert re.search(rf"--{key.replace('_', '-')}\b.*?default:\s+{re.escape(cli._flag_text(value))}\s",
                         text, re.DOTALL), key
    assert flag_parser(sampler_settings.SamplerSettings).parse_args([]).steps == sampler_settings.SamplerSettings().steps


@pytest.mark.parametrize("settings_object", [
    training.TrainConfig(total_steps=7, checkpoint_steps=[2, 5], batch_size=6, grad_accum=3, lr=1.5e-4,
                         betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0, ema_rate=0.5, label_dropout=0.0,
                         hflip=True, seed=4, t_min=1e-3, bf16=False, log_every=2, compile=True, fused_adamw=True,
                         tf32=True),
    sampler_settings.SamplerSettings(steps=50, order=3, method="singlestep", algorithm="dpmsolver",
                                     skip_type="time_uniform", t_end=1e-4, guidance_scale=2.5, precision="bf16",
                                     compile="default", mode_guidance=0.25, mode_guidance_stop=0.4, modes_per_class=3),
    sampling.SamplingSettings(budget_s=12.5, batch_size=7, max_images=None),
    sampling.SamplingSettings(max_images=30),
    feature_convnet.ReferenceSettings(extractor="inception", inception_weights="w.pth", convnet_epochs=3),
    checkpoint_scores.ScoringSettings(num_images=9, batch_size=3),
])
def test_flags_the_workflow_writes_parse_back_to_the_same_settings(settings_object):
    cls = type(settings_object)
    values = {item.name: getattr(settings_object, item.name) for item in dataclasses.fields(cls)
              if item.metadata.get("flag", True)}
    flags = smk_functions("settings_args", "cli_flag")["settings_args"](
        {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()})
    assert cli.dataclass_from_args(cls, flag_parser(cls).parse_args(flags.split())) == settings_object


@pytest.mark.parametrize("block, cls", [("scoring", feature_convnet.ReferenceSettings),
                                        ("scoring", checkpoint_scores.ScoringSettings),
                                        ("sampling", sampling.SamplingSettings),
                                        ("evaluation", entry.EvaluationSettings),
                                        ("package", selection.PackageSettings)])
def test_a_block_passes_exactly_the_flags_of_its_settings_class(block, cls):
    namespace = smk_functions("block_flags", "flag_settings", "settings_args", "cli_flag")
    namespace["config"] = DEFAULT_RUN
    args = vars(flag_parser(cls).parse_args(shlex.split(namespace["block_flags"](block, cls.__name__))))
    assert args == {key: DEFAULT_RUN[block].get(key, value) for key, value in args.items()}
    assert set(args) == set(settings.flag_keys(cls))


def test_training_blocks_become_trainer_flags_without_the_scheduler_keys():
    functions = smk_functions("training_args", "training_steps", "flag_settings", "settings_args", "cli_flag")
    train = load_script("train")
    scheduler = {item.name for item in dataclasses.fields(training.TrainingJob)}
    for block in (DEFAULT_RUN["finetune"], DEFAULT_RUN["pretrained"]["training"]):
        flags = functions["training_args"](block).split()
        assert not {f"--{key.replace('_', '-')}" for key in scheduler} & set(flags)
        args = train.parse_args(["--data", "d", "--preset", "uvit_tiny_test", "--checkpoint-dir", "c", *flags])
        expected = {key: value for key, value in block.items() if key not in scheduler}
        assert cli.dataclass_from_args(training.TrainConfig, args) == training.TrainConfig(**expected)


def test_unconditional_pretraining_defaults_to_no_label_dropout():
    # The unconditional model has no null class: TrainConfig's 0.1 would be refused by the trainer.
    training_block = SCHEMA["properties"]["pretrained"]["properties"]["training"]
    assert training_block["properties"]["label_dropout"]["default"] == 0.0
    assert SCHEMA["properties"]["finetune"]["properties"]["label_dropout"]["default"] == 0.1


def parser_defaults(script: str, parse: str, argv: list[str]) -> dict:
    return vars(getattr(load_script(script), parse)(argv))


@pytest.mark.parametrize("script, parse, argv, flags", [
    ("reference_stats", "parse", ["--real-train", "t.pt", "--stats-out", "s"], ["--extractor", "convnet"]),
    ("score_checkpoint", "parse", ["--checkpoint", "c", "--stats", "s", "--extractor", "convnet", "--out", "o"],
     ["--num-images", "4", "--batch-size", "4"]),
    ("evaluate", "parse", ["--train", "t", "--train-format", "images", "--test", "t", "--dataset", "d",
                           "--out", "o"], ["--epochs", "1", "--rounds", "1"]),
    ("package", "parse", ["--pool", "p", "--dataset", "d", "--ipc", "1", "--out-dir", "o", "--meta", "m"],
     ["--rule", "first"]),
])
def test_settings_without_a_default_are_required_flags(script, parse, argv, flags):
    assert parser_defaults(script, parse, [*argv, *flags])  # complete: parses
    for i in range(0, len(flags), 2):
        with pytest.raises(SystemExit):
            parser_defaults(script, parse, [*argv, *flags[:i], *flags[i + 2:]])


def test_the_workflow_reads_the_package_facts_from_the_schema():
    assert SCHEMA["x-facts"] == {"challenge_ipc": submission.TRACK1_IPC,
                                 "feature_rules": list(selection.FEATURE_RULES)}
    assert 'SCHEMA["x-facts"]["challenge_ipc"]' in COMMON_SMK and 'SCHEMA["x-facts"]["feature_rules"]' in COMMON_SMK


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


def test_folder_flags_the_workflow_writes_parse_back():
    namespace = smk_functions("folder_prepare_params", "block_flags", "flag_settings", "settings_args", "cli_flag")
    overrides = {"img_size": 16, "patch_size": 4, "in_chans": 1}
    namespace |= {"json": json, "DATASET": "folder", "PRETRAIN_PRESET": "uvit_tiny_test", "config": {
        "data": {"root": "r", "download": False, "side": 16, "channels": 1}, "package": {"ipc": [1, 10]},
        "pretrained": {"source": "train"}, "model": {"preset": "uvit_digits", "overrides": overrides}}}
    flags = shlex.split(namespace["folder_prepare_params"]()["folder"])
    args = load_script("prepare_data").parse_args(["--dataset", "folder", "--train-out", "a", "--test-out", "b",
                                                   "--sidecar", "c", *flags])
    assert cli.dataclass_from_args(folder.FolderSettings, args) == folder.FolderSettings(side=16, channels=1)
    assert (args.ipc, args.presets, args.model_overrides) == ([1, 10], ["uvit_digits", "uvit_tiny_test"], overrides)
    namespace["config"]["package"]["ipc"] = 10  # package.ipc as one number
    assert "--ipc 10 " in namespace["folder_prepare_params"]()["folder"]
    namespace["DATASET"] = "digits"
    assert namespace["folder_prepare_params"]() == {}  # the other data sets' command stays as it was
