# Paths and helpers shared by the rules. Every output path depends only on the config, so the whole
# DAG (including every checkpoint to score) is known before any job runs.
import json
import re
from pathlib import Path

import jsonschema
import yaml

DATASET = config["dataset"]
OUT = f"{config['results']}/{DATASET}"
LOGS = f"logs/{DATASET}"
# Snakemake runs ready jobs of higher priority first: the chain that decides the wall time (pretraining,
# fine-tuning, scoring, sampling, packaging) goes ahead of jobs that can run beside or after it (the
# real-data evaluations), instead of starting behind them.
CRITICAL_PATH = 10
# Priority orders the start of jobs but holds no core back, so the chain's jobs also claim the cores
# (up to 8; Snakemake scales a claim down to --cores): with one-thread scoring jobs and checkpoint
# selection, a one-thread evaluation took the core they left free, and sampling, which needs both
# cores of a 2-core CPU, waited 117 s of the default's 619 for it (benchmarks/run_timeline.py).
# A job's thread count is part of its numbers (matrix products sum in another order on another
# count), so training, reference statistics and sampling keep their 8 and the evaluations and packages
# their 1; scoring went from 1 to 8 with its scores equal to the last digit (docs/reference.md, "The
# default on a CPU").
CHAIN_THREADS = 8
SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
# The config schema, made from the package's settings declarations (diffdistill.config_schema): besides
# validating the config it says which keys are which script's flags (x-flags) and holds the package
# facts the rules need (x-facts), so that Snakemake itself runs without the package (conda deployment).
SCHEMA = yaml.safe_load((Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml").read_text())


VARIANT_RE = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"  # the schema's pattern for sweep names


wildcard_constraints:
    step=r"\d{7}",
    shard=r"\d+",
    variant=VARIANT_RE,


def training_steps(cfg):
    """The checkpoint steps of a training config; the last step is always saved."""
    return sorted(set(cfg["checkpoint_steps"]) | {cfg["total_steps"]})


def checkpoint_files(folder, cfg):
    return [f"{OUT}/{folder}/step_{step:07d}.pt" for step in training_steps(cfg)]


FINETUNE_CHECKPOINTS = checkpoint_files("checkpoints", config["finetune"])
SHARDS = config["sampling"]["shards"]
# Keys whose absence means "the same as another block" (every other default is in the schema).
PRETRAINING = config["pretrained"].get("training") or config["finetune"]
PRETRAIN_PRESET = config["pretrained"].get("preset") or config["model"]["preset"]
SCORING_SAMPLER = config["scoring"].get("sampler") or config["sampler"]


def sampling_output(extension):
    """The pool itself with one sampling job; one file per shard (merged later) with several."""
    if SHARDS > 1:
        return f"{OUT}/samples/shards/shard_{{shard}}.{extension}"
    return f"{OUT}/samples/pool.{extension}"


def folder_prepare_params():
    """prepare_data's flags for a folder data set (nothing for the others, whose command stays as it was):
    how to read it, the IPCs each class must hold and the U-ViT presets its images must fit."""
    if DATASET != "folder":
        return {}
    presets = [config["model"]["preset"]]
    if config["pretrained"]["source"] == "train" and PRETRAIN_PRESET not in presets:
        presets.append(PRETRAIN_PRESET)
    ipc = settings_args({"ipc": config["package"]["ipc"]})
    overrides = json.dumps(config["model"]["overrides"])
    return {"folder": f"{block_flags('data', 'FolderSettings')} {ipc} --presets {' '.join(presets)} --model-overrides '{overrides}'"}


def pretrained_weights():
    """The file fine-tuning starts from: an upstream unconditional run, a public file, or none."""
    source = config["pretrained"]["source"]
    if source == "train":
        return checkpoint_files("pretrain", config["pretrained"]["training"])[-1]
    if source == "file":
        path = config["pretrained"]["path"]
        if not path:
            raise ValueError("config key pretrained.path: a checkpoint file is required when pretrained.source is 'file'")
        if not Path(path).is_file():
            raise ValueError(f"config key pretrained.path: {missing_weights_help(path)}")
        return path
    return []


def missing_weights_help(path):
    """The package's advice on where the public weights come from (the package may be absent here,
    e.g. with conda deployment, where jobs get it but Snakemake itself may not)."""
    try:
        from diffdistill.diffusion.checkpoint import missing_weights_message
    except ImportError:
        return f"{path}: no such file"
    return missing_weights_message(path)


def resume_dir(folder, name):
    """The one resume convention: a job keeps what it resumes from in <OUT>/<folder>/.resume/<name>,
    outside Snakemake's outputs (which it deletes before a rerun), one folder per job. The state there
    carries the settings and data it was made with, and the script uses it only when both are this
    job's (diffdistill.resume): a changed config or changed data starts afresh."""
    return f"{OUT}/{folder}/.resume/{name}"


# Every stage derives its seed from config["seed"] by its own offset, so that no two stages share a stream.
SEED_OFFSETS = {
    "finetune": 0,
    "pretrain_unconditional": 1,
    "reference_stats": 2,
    "score_checkpoint": 3,
    "sample_budget": 4,
    "evaluate": 5,
}


def stage_seed(rule_name):
    return config["seed"] + SEED_OFFSETS[rule_name]


def sampling_seed():
    """The pool's draw: sampling.seed, or the seed derived from the run's."""
    seed = config["sampling"].get("seed")
    return stage_seed("sample_budget") if seed is None else seed


def training_args(cfg):
    """The trainer's flags: the TrainConfig keys of a training block (not the scheduler's), the
    checkpoint steps with the last step (the rule's outputs)."""
    settings = flag_settings(cfg, SCHEMA["properties"]["finetune"], "TrainConfig")
    return settings_args({**settings, "checkpoint_steps": training_steps(cfg)})


def flag_settings(cfg, block_schema, settings_class):
    """The keys of a config block that are flags of one settings class (the schema's x-flags)."""
    properties = block_schema["properties"]
    return {key: value for key, value in cfg.items() if properties[key].get("x-flags") == settings_class}


def block_flags(block, settings_class):
    """The flags of a top-level config block's settings class: what its script parses from the class."""
    return settings_args(flag_settings(config[block], SCHEMA["properties"][block], settings_class))


def settings_args(settings):
    """One flag per key of a (schema-validated) settings block: the flags cli.add_dataclass_flags makes
    from the fields of the stage's dataclass (a new setting needs no edit here)."""
    return " ".join(cli_flag(key, value) for key, value in settings.items())


def mode_inputs(sampler):
    """The real training split, an input of a sampling job whose sampler has mode guidance (the class
    modes come from it); nothing without."""
    return {"real_train": f"{OUT}/data/train.pt"} if sampler.get("mode_guidance", 0) > 0 else {}


def sampler_args(sampler):
    """A sampler block's flags, with --real-train when it has mode guidance."""
    return " ".join([settings_args(sampler), *(f"--real-train {path}" for path in mode_inputs(sampler).values())])


def cli_flag(key, value):
    """--key value; for a boolean the switch --key / --no-key (argparse's BooleanOptionalAction); a list
    comma-separated; None as none."""
    name = key.replace("_", "-")
    if value is None:
        return f"--{name} none"
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name}"
    if isinstance(value, list):
        return f"--{name} {','.join(map(str, value))}"
    return f"--{name} {value}"


def launcher(cfg):
    """A params function: python, or torchrun with one process per GPU (or per configured CPU process,
    on gloo). The processes share the job's threads, known only when the job runs: Snakemake gives
    each of them all the job's threads (torch takes MKL_NUM_THREADS over OMP_NUM_THREADS, so both are
    set), and 4 processes x 2 threads on 2 cores made CPU fine-tuning 2.2x slower."""
    processes = cfg["gpus"] or cfg["processes"]

    def command(wildcards, threads):
        if processes <= 1:
            return "python"
        share = max(1, threads // processes)
        # "--" ends torchrun's own options: it would read the script's --log as one of them.
        return f"OMP_NUM_THREADS={share} MKL_NUM_THREADS={share} torchrun --standalone --nproc_per_node {processes} --"

    return command


def gpu_count(cfg):
    """GPUs a job asks the scheduler for, from its own stage's config block: ``gpus`` when set; for
    scoring, sampling and evaluation ``gpus: null`` means 1 when config["device"] names CUDA, else 0."""
    if cfg["gpus"] is not None:
        return cfg["gpus"]
    return 1 if config["device"].startswith("cuda") else 0


def feature_convnet_output():
    """The feature ConvNet is a file only for FD-ConvNet scoring; FID uses InceptionV3."""
    if config["scoring"]["extractor"] == "convnet":
        return {"convnet": f"{OUT}/scoring/feature_convnet.pt"}
    return {}


SHORT_SAMPLER_KEYS = {"steps": "s", "guidance_scale": "w", "order": "o", "t_end": "t"}


def variant_name(keys):
    """A sweep variant's default name from its sampler keys: {steps: 10, guidance_scale: 2} -> s10_w2."""
    parts = []
    for key, value in keys.items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(SHORT_SAMPLER_KEYS[key] + text if key in SHORT_SAMPLER_KEYS
                     else text if isinstance(value, str) else f"{key}{text}")
    return "_".join(parts) or "base"


def sweep_variants():
    """name -> sampler settings of each sweep variant (the top-level sampler with the variant's keys over
    it), checked against the schema's sampler definition: a bad or unknown key stops the run, named."""
    validator = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/sampler"})
    variants = {}
    for i, variant in enumerate(config["sweep"]):
        keys = {key: value for key, value in variant.items() if key != "name"}
        for error in validator.iter_errors({**config["sampler"], **keys}):
            where = "".join(f".{part}" for part in error.absolute_path)
            raise ValueError(f"config key sweep[{i}]{where}: {error.message}")
        name = variant.get("name") or variant_name(keys)
        if name in variants:
            raise ValueError(f"config key sweep[{i}].name: {name!r} names two variants; give each its own name")
        variants[name] = {**config["sampler"], **keys}
    return variants


SWEEP = sweep_variants()


CHALLENGE_IPC = SCHEMA["x-facts"]["challenge_ipc"]  # the IPC of the challenge's Track 1


def ipc_grid(value):
    """package.ipc as the list of IPCs to package and evaluate (a bare integer is a grid of one);
    a value that is not positive, or listed twice, stops the run, named."""
    grid = value if isinstance(value, list) else [value]
    for i, ipc in enumerate(grid):
        if ipc < 1:
            raise ValueError(f"config key package.ipc: {ipc} is not a positive number of images per class")
        if ipc in grid[:i]:
            raise ValueError(f"config key package.ipc: {ipc} is listed twice in {grid}; list each IPC once")
    return grid


IPC_GRID = ipc_grid(config["package"]["ipc"])
# The submission file package/<dataset>.pt holds the challenge's IPC when the grid has it, else the grid's
# largest (a scaled-down run; the package's validator warns that Track 1 asserts IPC 10).
SUBMISSION_IPC = CHALLENGE_IPC if CHALLENGE_IPC in IPC_GRID else max(IPC_GRID)


def package_file(ipc):
    """The package of one IPC of the grid: the submission file at SUBMISSION_IPC, else in package/ipc<n>/."""
    folder = f"{OUT}/package" if ipc == SUBMISSION_IPC else f"{OUT}/package/ipc{ipc}"
    return f"{folder}/{DATASET}.pt"


def external_sets():
    """name -> path of each distilled set you bring (config key external; the name defaults to the file's stem
    or the folder's name); a name given twice stops the run, named."""
    sets = {}
    for i, entry in enumerate(config["external"]):
        path = Path(entry["path"])
        name = entry.get("name") or (path.name if path.is_dir() else path.stem)
        if not re.fullmatch(VARIANT_RE, name):
            raise ValueError(f"config key external[{i}].name: {name!r} (from the path) is not a plain name; give one")
        if name in sets:
            raise ValueError(f"config key external[{i}].name: {name!r} names two sets; give each its own name")
        sets[name] = entry["path"]
    return sets


EXTERNAL = external_sets()


def external_rows(epochs, real_train):
    """Per set you bring: the set itself (a package of the IPC its record gives) and random real subsets of
    that IPC, both at the IPC-sized sets' epochs."""
    rows = {}
    for name in EXTERNAL:
        record = f"{OUT}/external/{name}/set.json"
        rows[f"external_{name}"] = {"train": f"{OUT}/external/{name}/set.pt", "train_format": "package",
                                    "set_record": record, "ipc_from_set": "ipc", "epochs": epochs}
        rows[f"external_{name}_random"] = {"train": real_train, "train_format": "images", "set_record": record,
                                           "ipc_from_set": "random_ipc", "epochs": epochs}
    return rows


def evaluation_table():
    """kind -> one evaluation: ``train`` (the file the ConvNet trains on) and evaluate's flags for it:
    train_format, ipc (a package) or random_ipc (a fresh random real subset per round), epochs, and for a
    budget prefix of the pool its summary (pool_meta) and the fraction from the config. The package and
    the random real subsets come once per IPC of the grid (synthetic_ipc<n>, real_ipc<n>); with
    evaluation.ars again without DSA (<kind>_noaug). A set you bring (external_<name>) and its random real
    subsets (external_<name>_random) take their IPC from the set's record (set_record), once it is written."""
    ev, pool = config["evaluation"], f"{OUT}/samples/pool.pt"
    real_train = f"{OUT}/data/train.pt"
    accuracy = {}
    for ipc in IPC_GRID:
        accuracy[f"synthetic_ipc{ipc}"] = {"train": package_file(ipc), "train_format": "package", "ipc": ipc,
                                           "epochs": ev["epochs"]}
        accuracy[f"real_ipc{ipc}"] = {"train": real_train, "train_format": "images", "random_ipc": ipc,
                                      "epochs": ev["epochs"]}
    accuracy |= {
        "synthetic_pool": {"train": pool, "train_format": "images", "epochs": ev["pool_epochs"]},
        "real_full": {"train": real_train, "train_format": "images", "epochs": ev["pool_epochs"]},
    }
    # The budget curve: the pool's images made within each fraction of its budget (empty: off).
    budget = {f"budget_{float(fraction)}": {"train": pool, "train_format": "images", "epochs": ev["pool_epochs"],
                                            "pool_meta": f"{OUT}/samples/pool.json", "budget_fraction": fraction}
              for fraction in ev["budget_fractions"]}
    sweep = {f"sweep_{name}": {"train": f"{OUT}/sweep/{name}/pool.pt", "train_format": "images",
                               "epochs": ev["pool_epochs"]} for name in SWEEP}
    external = external_rows(ev["epochs"], real_train)
    ipc_sets = {kind: row for kind, row in (accuracy | external).items() if "ipc" in row or "random_ipc" in row
                or "ipc_from_set" in row}
    without_dsa = {f"{kind}_noaug": {**row, "dsa": False} for kind, row in ipc_sets.items()} if ev["ars"] else {}
    return accuracy, budget, sweep, external, without_dsa


ACCURACY_EVALUATIONS, BUDGET_EVALUATIONS, SWEEP_EVALUATIONS, EXTERNAL_EVALUATIONS, NOAUG_EVALUATIONS = (
    evaluation_table())
EVALUATIONS = {}
for _table in (ACCURACY_EVALUATIONS, BUDGET_EVALUATIONS, SWEEP_EVALUATIONS, EXTERNAL_EVALUATIONS, NOAUG_EVALUATIONS):
    for _kind in _table:
        if _kind in EVALUATIONS:  # only a set's name can make a kind twice
            raise ValueError(f"config key external: the set names make the evaluation {_kind!r} twice; rename a set")
    EVALUATIONS |= _table
ACCURACY_KINDS, BUDGET_KINDS, SWEEP_KINDS = list(ACCURACY_EVALUATIONS), list(BUDGET_EVALUATIONS), list(SWEEP_EVALUATIONS)
# The evaluations without DSA of the grid's sets (evaluation.ars), which the report's scores read.
NOAUG_KINDS = [kind for kind in NOAUG_EVALUATIONS if not kind.startswith("external_")]
EVALUATION_KIND_RE = "|".join(map(re.escape, EVALUATIONS))  # the table's kinds and nothing else
EVALUATION_INPUTS = ("train", "pool_meta", "set_record")  # the table's files: inputs of the evaluate rule


def evaluation_priority(wildcards):
    """Longest first, so that the last evaluations end together (on 2 cores the default's pool
    evaluation started last and ran 60 s alone): the pool-sized sets (pool, full real split, budget
    prefixes, sweep variants), then the IPC sets, larger IPC first; all below the chain."""
    target = EVALUATIONS[wildcards.kind]
    ipc = target.get("ipc") or target.get("random_ipc")
    rank = sorted(IPC_GRID).index(ipc) if ipc else len(IPC_GRID)
    return min(rank + 1, CRITICAL_PATH - 1)


def evaluation_inputs(wildcards):
    """What the ConvNet trains on (and a budget prefix's sampling summary), and the real splits."""
    target = EVALUATIONS[wildcards.kind]
    return {**{key: target[key] for key in EVALUATION_INPUTS if key in target},
            "test": f"{OUT}/data/test.pt", "real_train": f"{OUT}/data/train.pt"}


def evaluation_args(wildcards, input):
    """evaluate's flags of the kind's row (--train is the rule's own, from its input). A set you bring gives
    its IPC from its record, read when the job starts (Snakemake evaluates params then)."""
    row = EVALUATIONS[wildcards.kind]
    flags = {key: value for key, value in row.items() if key not in ("train", "set_record", "ipc_from_set")}
    if "ipc_from_set" in row:
        flags[row["ipc_from_set"]] = json.loads(Path(input.set_record).read_text())["ipc"]
    return settings_args(flags)


# Package rules that pick images with the real-data feature ConvNet of FD-ConvNet scoring.
FEATURE_RULES = SCHEMA["x-facts"]["feature_rules"]


def package_convnet():
    """The feature ConvNet as an input of the package rule, for the FEATURE_RULES."""
    name = config["package"]["rule"]
    if name not in FEATURE_RULES:
        return {}
    if config["scoring"]["extractor"] != "convnet":
        raise ValueError(f"config key package.rule: {name!r} needs scoring.extractor 'convnet' (its feature ConvNet)")
    return feature_convnet_output()


def study_files():
    """The report's files of the budget curve and the sweep, when they are on (name -> path)."""
    files = {}
    if BUDGET_KINDS:
        files["budget_plot"] = f"{OUT}/budget_curve.png"
    if SWEEP:
        files |= {"sweep_plot": f"{OUT}/sweep.png", "sweep_table": f"{OUT}/sweep.tsv"}
    return files


STUDY_CAPTIONS = {"budget_plot": ("budget_curve.rst", "Budget curve"), "sweep_plot": ("sweep.rst", "Sampler sweep"),
                  "sweep_table": ("sweep_table.rst", "Sampler sweep")}


def study_outputs():
    """:func:`study_files` as outputs of Snakemake's report, with their captions and categories."""
    return {name: report(path, caption=f"../report/{STUDY_CAPTIONS[name][0]}", category=STUDY_CAPTIONS[name][1])
            for name, path in study_files().items()}


def study_args(input, output):
    """The report script's flags for the budget curve and the sweep, when they are on."""
    args = []
    if BUDGET_KINDS:
        args += ["--budget-evaluations", *input.budget, "--budget-plot", output.budget_plot]
    if SWEEP:
        args += ["--sweep-metas", *input.sweep_metas, "--sweep-evaluations", *input.sweep_evaluations,
                 "--sweep-plot", output.sweep_plot, "--sweep-table", output.sweep_table]
    return " ".join(args)


def package_folder(ipc):
    """The folder of one IPC's package, where its datasheet and image-folder export go beside it."""
    return str(Path(package_file(ipc)).parent)


def datasheet_inputs(wildcards):
    """What a package's datasheet reads: the package and its record, the records of the stages that made it,
    and its evaluations (with evaluation.ars, those without DSA too)."""
    ipc = int(wildcards.get("ipc", SUBMISSION_IPC))
    evaluation = f"{OUT}/evaluation"
    inputs = {"package": package_file(ipc), "meta": f"{package_folder(ipc)}/package.json",
              "best": f"{OUT}/scoring/best.json", "pool_meta": f"{OUT}/samples/pool.json",
              "prepared": f"{OUT}/data/prepare.json", "training": f"{OUT}/checkpoints/train.json",
              "synthetic": f"{evaluation}/synthetic_ipc{ipc}.json", "random_real": f"{evaluation}/real_ipc{ipc}.json",
              "full_real": f"{evaluation}/real_full.json"}
    if config["evaluation"]["ars"]:
        inputs |= {"synthetic_noaug": f"{evaluation}/synthetic_ipc{ipc}_noaug.json",
                   "random_real_noaug": f"{evaluation}/real_ipc{ipc}_noaug.json"}
    return inputs


def datasheet_args(wildcards, input):
    """The datasheet script's flags, one per input."""
    return " ".join(f"--{key.replace('_', '-')} {path}" for key, path in input.items())


def package_extras():
    """Beside every package of the grid: its datasheet (record and card) and its image-folder export."""
    return [f"{package_folder(ipc)}/{name}" for ipc in IPC_GRID for name in ("datasheet.json", "datasheet.md", "images")]


def external_targets():
    """The evaluation of the sets you bring: one result per set, the summary and the report."""
    return [*(f"{OUT}/external/{name}/result.json" for name in EXTERNAL), f"{OUT}/external/summary.json",
            f"{OUT}/external/report.md"]


def external_report_inputs(wildcards):
    """Per set (in config order): its record, its evaluation and that of random real of its IPC (and both
    without DSA with evaluation.ars); the full real split's evaluation, for HLR."""
    evaluation = f"{OUT}/evaluation"
    inputs = {"sets": [f"{OUT}/external/{name}/set.json" for name in EXTERNAL],
              "evaluations": [f"{evaluation}/external_{name}.json" for name in EXTERNAL],
              "random_real": [f"{evaluation}/external_{name}_random.json" for name in EXTERNAL],
              "full_real": f"{evaluation}/real_full.json"}
    if config["evaluation"]["ars"]:
        inputs |= {"evaluations_noaug": [f"{evaluation}/external_{name}_noaug.json" for name in EXTERNAL],
                   "random_real_noaug": [f"{evaluation}/external_{name}_random_noaug.json" for name in EXTERNAL]}
    return inputs


def final_targets():
    """Every file of the report and every package's datasheet and image folder: turning the budget curve or
    the sweep on later makes their figures targets, so an existing run makes just the new jobs and the report
    again. With sets to evaluate (config key external), only their evaluation: nothing is fine-tuned or sampled."""
    if EXTERNAL:
        return external_targets()
    return [f"{OUT}/report.md", f"{OUT}/summary.json", f"{OUT}/accuracy.tsv", *study_files().values(),
            *package_extras()]
