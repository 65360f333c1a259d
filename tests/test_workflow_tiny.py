"""The whole DAG on a tiny config (tests/configs/tiny.yaml) with each stage's outputs checked against
their contract in a test of its own, then what users do to a finished run: a forced stage, a target
file, sets they bring, resumed and parallel fine-tuning, a budget curve and a sampler sweep. The
whole-DAG runs are marked slow; a test that changes a run copies it first (copy_run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, planned_jobs, snakemake


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
    assert meta.budget_s == 30 and meta.images_per_s > 0 and meta.sampler.steps == 3


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


@pytest.mark.slow
def test_another_draw_of_the_pool_reruns_sampling_and_what_depends_on_it(tiny_run, tmp_path):
    overlay = tmp_path / "draw.yaml"
    overlay.write_text("sampling:\n  seed: 104\n")
    result = snakemake("-n", "-p", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
                       str(overlay), cwd=tiny_run, check=True)
    assert planned_jobs(result.stdout) == {  # fine-tuning, scoring and random real are kept
        "sample_budget": 1, "package": 1, "package_ipc": 1, "evaluate": 3, "report": 1, "all": 1, "datasheet": 1,
        "datasheet_ipc": 1, "export_images": 1, "export_images_ipc": 1}
    assert "sample_budget.py" in result.stdout and " --seed 104 " in result.stdout


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
    one balanced pool. The run stops at the pool (the target): what follows it reads the pool's
    record, whose shards the report's tests cover (tests/test_report.py)."""
    copy_run(tiny_run, tmp_path)  # the data and pretraining are kept
    overlay = tmp_path / "parallel.yaml"
    overlay.write_text("finetune: {processes: 2}\nsampling: {shards: 2}\n")
    # The process count alone does not make fine-tuning rerun: its checkpoints are the same.
    result = snakemake("results/digits/samples/pool.pt", "--cores", "2", "--configfile",
                       str(REPO / "config" / "config.yaml"), str(TINY), str(overlay), "--forcerun", "finetune",
                       cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert jobs == {"finetune": 1, "score_checkpoint": 2, "select_checkpoint": 1, "sample_budget": 2,
                    "merge_samples": 1}
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
    merged = SamplingSummary.read(out / "samples" / "pool.json")
    assert merged.images_per_s_per_shard == [s.images_per_s for s in shards]
    assert merged.images_per_s == pytest.approx(sum(merged.images_per_s_per_shard))
    from diffdistill import data

    pool = data.load_images(out / "samples" / "pool.pt")
    assert len(pool) == merged.images == sum(s.images for s in shards)
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
    # 1,000 steps take 15-30 s on 2 cores; the kill comes within a poll (0.5 s) of step 3.
    overlay.write_text("finetune: {total_steps: 1000, checkpoint_steps: [3, 1000]}\n")
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
    assert not (tmp_path / "results/digits/checkpoints/step_0001000.pt").exists()
    common = ("--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay))
    snakemake("--unlock", *common, cwd=tmp_path, check=True)  # a killed snakemake leaves its lock
    result = snakemake("--cores", "1", "--configfile", str(REPO / "config" / "config.yaml"), str(TINY), str(overlay),
                       "--until", "finetune", "--rerun-incomplete", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sidecar = json.loads((tmp_path / "results/digits/checkpoints/train.json").read_text())
    assert sidecar["start_step"] >= 3 and sidecar["final_step"] == 1000


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
        assert (meta.sampler.steps, meta.sampler.guidance_scale) == (steps, guidance)
        for key in ("budget_s", "checkpoint", "batch_size", "max_images"):
            assert getattr(meta.settings, key) == getattr(main.settings, key), key
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


