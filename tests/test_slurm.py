"""The workflow on a real one-node SLURM cluster (tests/slurm/cluster.py), run through
``--profile profiles/slurm`` exactly as users get it, with only test-speed flags layered on top.

The cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd, one fake GPU) starts once per session and
every daemon is stopped by PID at the end, also when a test fails. Without root or apt the tests
skip with the reason; on CI (``CI`` set) that is a failure instead, because there they must run.
Contracts checked: every non-local job goes through sbatch and ends COMPLETED in ``sacct``; a
failing job makes snakemake exit non-zero promptly, is attempted the profile's ``retries`` + 1 times,
and the outputs made before it are kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from slurm.cluster import ClusterUnavailable, SlurmCluster, ensure_packages, tail, wait_until

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
PROFILE_SETTINGS = yaml.safe_load((PROFILE / "config.yaml").read_text())
# Layered over the profile, for test speed only: first status check after 1 s instead of 40, no
# account guessing (the test cluster has none), and a short wait for outputs on a local disk.
TEST_SPEED = ["--slurm-init-seconds-before-status-checks", "1", "--slurm-no-account", "--latency-wait", "5"]

TOY_SNAKEFILE = """
localrules: all

rule all:
    input: "cpu.txt", "gpu.txt"

rule cpu:
    output: "cpu.txt"
    resources: gpu=0
    shell: "echo ${{SLURM_JOB_ID:-none}} > {output}"

rule gpu:
    input: "cpu.txt"
    output: "gpu.txt"
    resources: gpu=1
    shell: "echo ${{SLURM_JOB_ID:-none}} ${{CUDA_VISIBLE_DEVICES:-none}} > {output}"

rule fail:
    input: "cpu.txt"
    output: "never.txt"
    shell: "echo bad input >&2; exit 3"
"""


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"the SLURM tests must run on CI, but: {reason}")
    pytest.skip(reason)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # so that a killed test run still stops the daemons


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started one-node cluster with accounting and one fake GPU; stopped by PID at the end."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _unavailable("snakemake-executor-plugin-slurm is not installed (pip install -e .[test])")
    try:
        ensure_packages()
    except ClusterUnavailable as exc:
        _unavailable(str(exc))
    # Not under pytest's tmp folder: munge and mysql must traverse the path, and root-only 0700
    # folders stop them.
    root = Path(tempfile.mkdtemp(prefix="diffdistill-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            cluster.start()
        except ClusterUnavailable as exc:
            _unavailable(str(exc))
        yield cluster
    finally:
        problems = cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        if not os.environ.get("DIFFDISTILL_KEEP_SLURM"):  # set it to keep configs and daemon logs
            shutil.rmtree(root, ignore_errors=True)
    assert not problems, f"daemons still running after stop: {problems}"


@dataclass
class Run:
    """One finished snakemake run: exit status, combined output, wall time in seconds."""

    returncode: int
    output: str
    seconds: float


class BackgroundRun:
    """snakemake with the SLURM profile plus TEST_SPEED, started at once; :meth:`result` waits for it and
    kills it (and cancels its jobs) at its timeout."""

    def __init__(self, cluster: SlurmCluster, workdir: Path, *args: str, timeout: float):
        argv = [sys.executable, "-m", "snakemake", "--directory", str(workdir), "--profile", str(PROFILE),
                *TEST_SPEED, *args]
        self.cluster, self.workdir, self.timeout, self.started = cluster, workdir, timeout, time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=cluster.env, cwd=workdir, start_new_session=True)
        self.run: Run | None = None

    def result(self) -> Run:
        if self.run is not None:
            return self.run
        try:
            output, _ = self.proc.communicate(timeout=max(1.0, self.started + self.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            output = _kill(self.proc)
            self.cluster.cancel_all()
            pytest.fail(f"snakemake did not finish within {self.timeout:g} s:\n{tail(output, 40)}")
        except BaseException:  # interrupted: do not leave snakemake running in its own session
            _kill(self.proc)
            raise
        self.run = Run(self.proc.returncode, output, time.monotonic() - self.started)
        return self.run

    def stop(self) -> None:
        if self.proc.poll() is None:
            _kill(self.proc)


def run_snakemake(cluster: SlurmCluster, workdir: Path, *args: str, timeout: float) -> Run:
    return BackgroundRun(cluster, workdir, *args, timeout=timeout).result()


def _kill(proc: subprocess.Popen) -> str:
    """SIGTERM the run's process group, SIGKILL after 15 s (a stuck snakemake ignores SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the group is gone already
        try:
            return proc.communicate(timeout=wait)[0]
        except subprocess.TimeoutExpired:
            continue


def jobs_in(cluster: SlurmCluster, workdir: Path) -> list[dict[str, str]]:
    """The accounting records of the jobs submitted from one working directory."""
    return [job for job in cluster.jobs() if Path(job["WorkDir"]) == workdir.resolve()]


def rule_of(job: dict[str, str]) -> str:
    """The plugin writes ``rule_<name>`` (plus ``_wildcards_...``) into the job comment."""
    match = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", job["Comment"])
    assert match, f"job {job['JobID']} has no rule comment: {job}"
    return match.group(1)


def executed_rules(output: str) -> tuple[Counter, Counter]:
    """Jobs a run started (or a dry run plans), from snakemake's job headers: (cluster rules, local
    rules) -> counts."""
    remote = Counter(re.findall(r"^rule (\w+):$", output, re.MULTILINE))
    local = Counter(re.findall(r"^localrule (\w+):$", output, re.MULTILINE))
    return remote, local


@pytest.fixture(scope="module")
def runs(slurm_cluster, request, tmp_path_factory) -> dict[str, BackgroundRun]:
    """Every snakemake run of this module, started at once, side by side. Each mostly waits: the
    plugin checks a job's status 1 s after submitting it, then 10 s later than the previous check
    until a job has ended, so a job of a few seconds holds its run for about 12. Run one after another
    they took 287 s on a quiet 2-core CPU; side by side about as long as the longest. The tiny
    workflow's runs start only when a selected test uses them (they are slow)."""
    cluster = slurm_cluster
    folders = {name: tmp_path_factory.mktemp(name) for name in ("toy", "toy_failing", "tiny", "tiny_failing")}
    for name in ("toy", "toy_failing"):
        (folders[name] / "Snakefile").write_text(TOY_SNAKEFILE)
    # One attempt: retrying a deterministic failure only costs time here (the profile's retries are
    # exercised by the workflow's failure test). The failing job's input is already made.
    (folders["toy_failing"] / "cpu.txt").write_text("made before\n")
    commands = {"toy": ("all",), "toy_failing": ("never.txt", "--retries", "0")}
    if any("tiny_workflow" in item.name for item in request.session.items):
        corrupt = folders["tiny_failing"] / "corrupt.pt"
        corrupt.write_bytes(b"not a checkpoint")  # bad input: fine-tuning must refuse it (exit status 2)
        source = f"pretrained={{'source': 'file', 'path': '{corrupt}'}}"
        commands |= {"tiny": tiny_args(folders["tiny"]), "tiny_failing": tiny_args(folders["tiny_failing"], source)}
    timeouts = {"toy": 180, "toy_failing": 180, "tiny": 900, "tiny_failing": 600}
    started = {name: BackgroundRun(cluster, folders[name], *command, timeout=timeouts[name])
               for name, command in commands.items()}
    yield started
    for run in started.values():
        run.stop()


# --- the cluster on its own, through a toy workflow -------------------------------------------------


def test_cluster_is_idle_with_one_gpu_and_accounting(slurm_cluster):
    node = slurm_cluster.slurm("scontrol", "show", "node").stdout
    assert "State=IDLE" in node and "gres/gpu=1" in node
    assert slurm_cluster.slurm("sacctmgr", "-n", "list", "cluster").returncode == 0
    # The srun smoke test reaches the database a moment after it ends (accounting is asynchronous).
    wait_until(lambda: any(job["State"] == "COMPLETED" for job in slurm_cluster.jobs()), 15, "smoke test in sacct")


def test_toy_workflow_jobs_go_through_sbatch_with_gpu(slurm_cluster, runs):
    toy, run = runs["toy"].workdir, runs["toy"].result()
    assert run.returncode == 0, tail(run.output, 60)
    (cpu_job,) = (toy / "cpu.txt").read_text().split()
    gpu_job, visible = (toy / "gpu.txt").read_text().split()
    assert cpu_job != "none" and gpu_job != "none"  # ran inside SLURM jobs
    assert visible == "0"  # the fake GRES GPU
    jobs = {job["JobID"]: job for job in jobs_in(slurm_cluster, toy)}
    assert sorted(rule_of(job) for job in jobs.values()) == ["cpu", "gpu"]  # `all` is a localrule
    assert {job["State"] for job in jobs.values()} == {"COMPLETED"}
    assert "gres/gpu=1" in jobs[gpu_job]["AllocTRES"] and "gres/gpu" not in jobs[cpu_job]["AllocTRES"]
    defaults = PROFILE_SETTINGS["default-resources"]  # the profile's resources reach sbatch
    assert f"cpu={defaults['cpus_per_task']}" in jobs[cpu_job]["AllocTRES"]
    assert f"mem={defaults['mem_mb']}M" in jobs[cpu_job]["AllocTRES"]


def test_toy_failing_job_is_reported_promptly(slurm_cluster, runs):
    toy, run = runs["toy_failing"].workdir, runs["toy_failing"].result()
    assert run.returncode != 0, tail(run.output, 60)
    assert "Error in rule fail" in run.output, tail(run.output, 40)
    assert (toy / "cpu.txt").read_text() == "made before\n" and not (toy / "never.txt").exists()  # input kept
    attempts = [job for job in jobs_in(slurm_cluster, toy) if rule_of(job) == "fail"]
    # The job's exit code is the job step's snakemake's (1), not the shell command's.
    assert [job["State"] for job in attempts] == ["FAILED"] and attempts[0]["ExitCode"] != "0:0"
    slurm_log = next((toy / ".snakemake" / "slurm_logs" / "rule_fail").glob("*.log")).read_text()
    assert "bad input" in slurm_log  # the command's stderr reaches the job's log, which is kept
    assert run.seconds < 90, f"took {run.seconds:.0f} s"  # measured: 35-50 s on 2 busy cores


# --- the tiny workflow (tests/configs/tiny.yaml) ----------------------------------------------------

TINY = REPO / "tests" / "configs" / "tiny.yaml"
# Jobs of the tiny config (one data set, unconditional pre-training, checkpoints at steps 3 and 6, an IPC
# grid of two, six accuracy rows) and the rules that must run on the cluster: everything that trains or samples.
TINY_JOBS = Counter({"prepare_data": 1, "pretrain_unconditional": 1, "finetune": 1, "reference_stats": 1,
                     "score_checkpoint": 2, "select_checkpoint": 1, "sample_budget": 1, "package": 1,
                     "package_ipc": 1, "evaluate": 6, "report": 1, "all": 1, "datasheet": 1, "datasheet_ipc": 1,
                     "export_images": 1, "export_images_ipc": 1})
HEAVY_RULES = {"prepare_data", "pretrain_unconditional", "finetune", "reference_stats", "score_checkpoint",
               "sample_budget", "evaluate"}
ACCURACY_KINDS = ("synthetic_ipc1", "real_ipc1", "synthetic_ipc2", "real_ipc2", "synthetic_pool", "real_full")


def tiny_args(workdir: Path, *config: str) -> list[str]:
    return ["-s", str(REPO / "Snakefile"), "--configfile", str(REPO / "config" / "config.yaml"), str(TINY),
            "--config", f"results={workdir}/results", *config]


@pytest.mark.slow
def test_tiny_workflow_runs_every_cluster_job_through_slurm(slurm_cluster, runs):
    workdir, run = runs["tiny"].workdir, runs["tiny"].result()
    assert run.returncode == 0, tail(run.output, 80)
    remote, local = executed_rules(run.output)
    assert remote + local == TINY_JOBS
    assert HEAVY_RULES <= set(remote), f"ran locally: {HEAVY_RULES - set(remote)}"
    jobs = jobs_in(slurm_cluster, workdir)
    assert Counter(rule_of(job) for job in jobs) == remote  # each cluster job submitted once; no local one
    assert {job["State"] for job in jobs} == {"COMPLETED"}

    summary = json.loads((workdir / "results" / "digits" / "summary.json").read_text())
    assert set(summary) == {"format", "version", "dataset", "best_step", "best_score", "score_kind",
                            "pool_images", "sampling_images_per_s", "sampling_images_per_s_per_shard", "budget_s",
                            "accuracy", "ipc_grid", "scores", "budget_curve", "sweep"}
    assert summary["budget_curve"] == [] and summary["sweep"] == []  # both studies are off by default
    assert summary["dataset"] == "digits" and summary["best_step"] in (3, 6)
    assert summary["score_kind"] == "FD-ConvNet" and summary["best_score"] >= 0
    assert summary["pool_images"] > 0 and summary["sampling_images_per_s"] > 0 and summary["budget_s"] == 30
    assert set(summary["accuracy"]) == set(ACCURACY_KINDS)
    for kind in ACCURACY_KINDS:
        assert set(summary["accuracy"][kind]) == {"mean", "std"}
        assert 0.0 <= summary["accuracy"][kind]["mean"] <= 1.0 and summary["accuracy"][kind]["std"] >= 0.0


@pytest.mark.slow
def test_tiny_workflow_failing_job_stops_the_run_and_keeps_earlier_outputs(slurm_cluster, runs):
    from diffdistill import data

    workdir, run = runs["tiny_failing"].workdir, runs["tiny_failing"].result()
    corrupt = workdir / "corrupt.pt"
    source = f"pretrained={{'source': 'file', 'path': '{corrupt}'}}"
    assert run.returncode != 0, tail(run.output, 80)
    assert "Error in rule finetune" in run.output, tail(run.output, 40)
    assert run.seconds < 600, f"took {run.seconds:.0f} s"  # a hang guard, not a speed claim

    jobs = jobs_in(slurm_cluster, workdir)
    attempts = [job for job in jobs if rule_of(job) == "finetune"]
    assert len(attempts) == PROFILE_SETTINGS["retries"] + 1  # the profile resubmits failed jobs
    assert {job["State"] for job in attempts} == {"FAILED"}
    assert {job["State"] for job in jobs if rule_of(job) != "finetune"} <= {"COMPLETED"}
    assert str(corrupt) in (workdir / "logs" / "digits" / "finetune.log").read_text()  # names the file

    out = workdir / "results" / "digits"
    assert not list((out / "checkpoints").glob("step_*.pt"))  # nothing half-made
    train, test = data.load_images(out / "data" / "train.pt"), data.load_images(out / "data" / "test.pt")
    # docs/reference.md, "Digits calibration": the digits split, kept intact
    assert (len(train), len(test)) == (1257, 540)
    dry = run_snakemake(slurm_cluster, workdir, *tiny_args(workdir, source), "-n", timeout=120)
    remote, local = executed_rules(dry.output)
    assert remote["finetune"] == 1 and "prepare_data" not in remote  # done work is not redone
