"""The Snakemake workflow without running it: lint, dry runs of the paper configs, the plans that
config gives, and config validation. The whole-DAG runs are in test_workflow_tiny.py (the digits on
tests/configs/tiny.yaml) and test_workflow_datasets.py (MNIST and a folder of your own); they are in
files of their own so that pytest-xdist (--dist loadfile) runs them on different workers."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO, planned_jobs, snakemake


def test_lint_passes():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "name, weights, checkpoints",
    [("cifar100", "cifar10_uvit_small.pth", 10), ("tinyimagenet", "imagenet64_uvit_mid.pth", 10)],
)
def test_dry_run_of_paper_configs_builds_expected_jobs(tmp_path, name, weights, checkpoints):
    (tmp_path / weights).write_bytes(b"stand-in: a dry run only checks that the file exists")
    result = snakemake(
        "-n", "-p", "--cores", "2", "--configfile", str(REPO / "config" / f"{name}.yaml"),
        "--config", f"results={tmp_path}/results", f"pretrained={{'source': 'file', 'path': '{tmp_path / weights}'}}",
        cwd=tmp_path, check=True,
    )
    jobs = planned_jobs(result.stdout)
    assert jobs == {
        "prepare_data": 1, "finetune": 1, "reference_stats": 1, "score_checkpoint": checkpoints,
        "select_checkpoint": 1, "sample_budget": 1, "package": 1, "evaluate": 4, "report": 1, "all": 1,
        "datasheet": 1, "export_images": 1,
    }
    assert "pretrain_unconditional" not in jobs  # the public weights replace it
    assert f"results/{name}/package/{name}.pt" in result.stdout
    # The paper's settings score checkpoints by FID: every job that extracts features (the reference
    # statistics and each checkpoint's score) is planned with the Inception extractor (-p prints them).
    extractors = re.findall(r"--extractor (\w+)", result.stdout)
    assert extractors == ["inception"] * (1 + checkpoints), extractors  # reference_stats + one per checkpoint


@pytest.mark.parametrize("overlays, grid, submission", [
    ((), [1, 10], 10),  # the default grid
    (("config/ipc_grid.yaml",), [1, 10, 50], 10),  # the papers' grid
    (("tests/configs/tiny.yaml",), [1, 2], 2),  # no IPC 10: the submission file holds the largest
])
def test_ipc_grid_plans_one_package_and_two_evaluations_per_ipc(tmp_path, overlays, grid, submission):
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
                       *(str(REPO / overlay) for overlay in overlays), "--config", f"results={tmp_path}/results",
                       cwd=tmp_path, check=True)
    jobs = planned_jobs(result.stdout)
    assert (jobs["package"], jobs["package_ipc"], jobs["evaluate"]) == (1, len(grid) - 1, 2 * len(grid) + 2)
    out = f"{tmp_path}/results/digits"
    packages = re.findall(r"package\.py .*--ipc (\d+) .*--out-dir (\S+) ", result.stdout)
    assert sorted(packages) == sorted((str(ipc), f"{out}/package" if ipc == submission else f"{out}/package/ipc{ipc}")
                                      for ipc in grid)
    for ipc in grid:
        package = f"{out}/package/digits.pt" if ipc == submission else f"{out}/package/ipc{ipc}/digits.pt"
        assert f"--train {package} --train-format package --ipc {ipc} " in result.stdout
        assert f"--random-ipc {ipc} " in result.stdout and f"evaluation/real_ipc{ipc}.json" in result.stdout
    assert f"--ipc {' '.join(map(str, grid))} " in result.stdout  # the report's grid
    assert "--pool-out" in result.stdout and result.stdout.count("--pool-out") == 1  # the submission's job only


def test_missing_public_weights_say_where_they_come_from(tmp_path):
    result = snakemake(
        "-n", "--cores", "1", "--configfile", str(REPO / "config" / "cifar100.yaml"),
        "--config", f"results={tmp_path}/results", cwd=tmp_path)
    assert result.returncode != 0
    for needle in ("github.com/baofff/U-ViT", "cifar10_uvit_small.pth", "resources/weights/", "pretrained.path"):
        assert needle in result.stdout + result.stderr, needle


def planned_gpus(output: str) -> dict[str, set[int]]:
    """rule -> the gpu resource values of its jobs in a dry run's job listing (0 when none is given)."""
    gpus: dict[str, set[int]] = {}
    for block in re.split(r"^rule ", output, flags=re.M)[1:]:
        rule = block.split(":", 1)[0].strip()
        match = re.search(r"^\s+resources: .*\bgpu=(\d+)", block, flags=re.M)
        gpus.setdefault(rule, set()).add(int(match.group(1)) if match else 0)
    return gpus


GPU_STAGES = ("reference_stats", "score_checkpoint", "sample_budget", "evaluate")


def test_default_config_plans_unconditional_pretraining_on_cpu_without_warnings(tmp_path):
    result = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
                       "--config", f"results={tmp_path}/results", cwd=tmp_path, check=True)
    jobs = planned_jobs(result.stdout)
    assert jobs["pretrain_unconditional"] == 1 and jobs["score_checkpoint"] == 3
    gpus = planned_gpus(result.stdout)
    assert all(gpus[rule] == {0} for rule in (*GPU_STAGES, "finetune", "pretrain_unconditional")), gpus
    assert "localrules" not in result.stdout + result.stderr  # no warning about merge_samples with one shard


def planned_slots(output: str) -> list[tuple[str, str, int, int]]:
    """(rule, wildcards, threads, priority) of each job of a dry run's listing (1 and 0 when not shown)."""
    slots = []
    for block in re.split(r"^(?:local)?rule ", output, flags=re.M)[1:]:
        fields = dict(re.findall(r"^\s+(wildcards|threads|priority): (.*)$", block, flags=re.M))
        slots.append((block.split(":", 1)[0], fields.get("wildcards", ""), int(fields.get("threads", 1)),
                      int(fields.get("priority", 0))))
    return slots


def test_default_plan_gives_the_chain_every_core_and_the_longest_evaluations_first(tmp_path):
    result = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
                       "--config", f"results={tmp_path}/results", cwd=tmp_path, check=True)
    slots = planned_slots(result.stdout)
    chain = {"reference_stats", "pretrain_unconditional", "finetune", "score_checkpoint", "select_checkpoint",
             "sample_budget"}
    assert {(rule, threads) for rule, _, threads, _ in slots if rule in chain} == {(rule, 2) for rule in chain}
    evaluations = {wildcards.split("=")[1]: (threads, priority) for rule, wildcards, threads, priority in slots
                   if rule == "evaluate"}
    assert {kind: threads for kind, (threads, _) in evaluations.items()} == dict.fromkeys(evaluations, 1)
    order = sorted(evaluations, key=lambda kind: -evaluations[kind][1])
    assert set(order[:2]) == {"synthetic_pool", "real_full"} and set(order[4:]) == {"synthetic_ipc1", "real_ipc1"}
    chain_priority = {priority for rule, _, _, priority in slots if rule in chain}
    assert max(priority for _, priority in evaluations.values()) < min(chain_priority)


def test_each_gpu_stage_takes_its_gpus_from_its_own_config(tmp_path):
    """A CPU fine-tune with device cuda still gives the GPU stages a GPU; a stage's own gpus wins."""
    overlay = tmp_path / "gpus.yaml"
    overlay.write_text("device: cuda\nsampling: {gpus: 2}\n")
    result = snakemake("-n", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(overlay),
                       "--config", f"results={tmp_path}/results", cwd=tmp_path, check=True)
    gpus = planned_gpus(result.stdout)
    assert gpus["finetune"] == {0} and gpus["sample_budget"] == {2}, gpus
    assert all(gpus[rule] == {1} for rule in ("reference_stats", "score_checkpoint", "evaluate")), gpus


@pytest.mark.parametrize(
    "override, expected",
    [
        ("finetune: {totl_steps: 3}", "totl_steps"),
        ("sampling: {budget_s: -5}", "budget_s"),
        ("sampler: {method: fastest}", "fastest"),
        ("unknown_top_level: 1", "unknown_top_level"),
        ("evaluation: {budget_fractions: [0.5, 1.5]}", "budget_fractions"),
        ("sweep: [{steps: 10}, {stepz: 20}]", "sweep[1]: Additional properties are not allowed ('stepz'"),
        ("sweep: [{steps: 0}]", "sweep[0].steps"),
        ("sweep: [{guidance_scale: 2}, {guidance_scale: 2.0}]", "sweep[1].name: 'w2' names two variants"),
        ("package: {ipc: [1, 10, 10]}", "package.ipc: 10 is listed twice in [1, 10, 10]"),
        ("package: {ipc: [0, 10]}", "package.ipc: 0 is not a positive number"),
        ("package: {ipc: []}", "['properties']['package']['properties']['ipc']"),
        ("package: {rule: best}", "'best' is not one of ['first', 'random', 'herding', 'coverage']"),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, override, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override + "\n")
    result = snakemake("-n", "--cores", "1", "--configfile", str(REPO / "config" / "config.yaml"), str(bad),
                       cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


