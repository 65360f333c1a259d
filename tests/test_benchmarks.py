"""The benchmark scripts run, print the table they promise, and count what docs/reference.md, "Throughput" says.

Speeds are never asserted (they are measured by the scripts, not by tests); these tests keep the
scripts from rotting and check the numbers they derive (FLOPs, roofline fraction, images counted).
"""

from __future__ import annotations

import csv

import pytest
import torch

from diffdistill import speed
from diffdistill.diffusion import uvit
from diffdistill.evaluation import dsa
from helpers import load_benchmark, needs_cpu_compiler

COLUMNS = ["preset", "device", "batch", "precision", "compile", "steps", "guidance", "images/s",
           "ms/forward", "GFLOP/img-fwd", "TFLOP/s", "%roofline", "first_call_s"]


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("sampler_throughput")


@pytest.mark.parametrize("preset,num_classes,gflop", [("uvit_small_2", 100, 24.5), ("uvit_mid_4", 200, 70.5)])
def test_flops_per_forward_match_reference(throughput, preset, num_classes, gflop):
    # docs/reference.md, "Throughput": conditional S/2 at 32^2 24.5 GFLOP, M/4 at 64^2 70.5 GFLOP per forward.
    with torch.device("meta"):  # count without computing: no weights, no arithmetic
        model = uvit.build(preset, num_classes=num_classes, null_class=True).eval()
    assert speed.forward_flops(model, torch.device("meta")) / 1e9 == pytest.approx(gflop, rel=2e-3)


def run_throughput(throughput, tmp_path, *flags):
    out = tmp_path / "bench.tsv"
    argv = ["--presets", "uvit_tiny_test", "--batch-sizes", "4", "--steps", "3", "--repeats", "1",
            "--device", "cpu", "--out-tsv", str(out), *flags]
    assert throughput.main(argv) == 0
    with open(out, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_sampler_throughput_writes_one_row_per_configuration(throughput, tmp_path, capsys):
    rows = run_throughput(throughput, tmp_path, "--precisions", "fp32", "bf16", "--guidance", "1", "2",
                          "--peak-tflops", "1.0")
    assert [(r["precision"], float(r["guidance"])) for r in rows] == [
        ("fp32", 1.0), ("fp32", 2.0), ("bf16", 1.0), ("bf16", 2.0)]
    assert list(rows[0]) == COLUMNS
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split("\t") == COLUMNS and len(printed) == 2 + len(rows)
    for row in rows:
        images_s, ms_forward, gflop = float(row["images/s"]), float(row["ms/forward"]), float(row["GFLOP/img-fwd"])
        forward_batch = 4 * (2 if float(row["guidance"]) == 2 else 1)  # w = 2 runs the network at 2B
        seconds = 3 * ms_forward / 1e3
        assert images_s == pytest.approx(4 / seconds, rel=1e-3)
        assert float(row["TFLOP/s"]) == pytest.approx(gflop * forward_batch * 3 / seconds / 1e3, rel=1e-3)
        assert float(row["%roofline"]) == pytest.approx(100 * float(row["TFLOP/s"]) / 1.0, rel=1e-3)


@needs_cpu_compiler
def test_sampler_throughput_compiled_network(throughput, tmp_path):
    # reduce-overhead: the CUDA-graph mode whose outputs are copied (no graphs on the CPU, same wiring)
    rows = run_throughput(throughput, tmp_path, "--compile", "on", "--compile-mode", "reduce-overhead",
                          "--sampler", "ss3")
    assert len(rows) == 1 and rows[0]["compile"] == "on" and float(rows[0]["images/s"]) > 0


def test_dsa_speed_prints_the_mix_and_every_family(capsys):
    load_benchmark("dsa_speed").main(["--n", "24", "--size", "8", "--batch", "8", "--repeats", "1",
                                      "--devices", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    families = [line.split()[-6] for line in lines[2:]]
    assert families == ["(mix)", *dsa.FAMILIES]


@pytest.mark.parametrize("family", ["scale", "rotate"])
def test_dsa_reference_style_computes_the_same_transform(family):
    # The benchmark's 'ref-style' rival only costs more; it must compute what the package computes.
    bench, params = load_benchmark("dsa_speed"), dsa.DSAParams()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    drawn = dsa.draw_params(family, x.shape, torch.Generator().manual_seed(1), x.device, params)
    torch.testing.assert_close(bench.reference_style(x, family, drawn, params),
                               dsa.apply_params(x, family, drawn, params))


@pytest.mark.gpu
@pytest.mark.slow  # torch.compile with CUDA graphs: gpu_check runs it after the quick GPU tests
def test_sampler_throughput_on_cuda_with_cuda_graphs(throughput, tmp_path):
    # Later flags win in argparse: the CPU defaults of run_throughput are overridden here.
    rows = run_throughput(throughput, tmp_path, "--presets", "uvit_small_2", "--batch-sizes", "8", "--steps", "4",
                          "--precisions", "fp32", "--compile", "off", "on", "--compile-mode", "reduce-overhead",
                          "--sampler", "ss3", "--device", "cuda")
    assert [r["compile"] for r in rows] == ["off", "on"]
    assert all(float(r["GFLOP/img-fwd"]) == pytest.approx(24.5, rel=2e-3) for r in rows)


def test_checkpoint_load_compares_reading_whole_and_mapped(tmp_path, capsys):
    out = tmp_path / "load.tsv"
    assert load_benchmark("checkpoint_load").main(["--preset", "uvit_tiny_test", "--num-classes", "3",
                                                    "--work", str(tmp_path), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [row["mode"] for row in rows] == ["read", "mmap"]
    assert all(float(row["peak_rss_MB"]) > 0 and float(row["seconds"]) > 0 for row in rows)
    assert list(tmp_path.iterdir()) == [out]  # the checkpoint went with its temporary folder
    assert capsys.readouterr().out.startswith("preset\tfile_MB\tmode")


def test_evaluator_speed_compares_three_paths_per_digits_set(capsys):
    # epochs 0: one pass per round; every path trains the same subsets, so the table is about speed only.
    bench = load_benchmark("evaluator_speed")
    assert bench.main(["--digits-ipc", "1", "--pool", "20", "--epochs", "0", "--rounds", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines if not line.startswith("#")][1:]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (path, name, size) for name, size in (("digits ipc 1", "10"), ("digits pool 20", "20"))
        for path in ("organisers", "diffdistill", "stacked")]
    for first, *others in (rows[:3], rows[3:]):
        assert float(first[6]) == 1.0
        for row in others:
            assert float(row[6]) == pytest.approx(float(first[3]) / float(row[3]), rel=0.05)
    assert sum(line.startswith("# agreement: stacked - organisers") for line in lines) == 2


def test_host_memory_times_each_workload_in_both_modes(capsys):
    bench = load_benchmark("host_memory")
    argv = ["--workloads", "evaluate ipc 1", "fine-tune step", "--repeats", "1", "--epochs", "0", "--steps", "2"]
    assert bench.main(argv) == 0
    rows = [line.strip("|").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in rows[1:]] == ["evaluate ipc 1", "fine-tune step"]
    for _, threads, default, kept, ratio, *_ in rows[1:]:
        assert float(ratio) == pytest.approx(float(default) / float(kept), rel=0.05)


def test_package_rules_evaluates_every_rule_on_a_toy_run(tmp_path, capsys):
    from diffdistill.data import LabeledImages, save_images
    from diffdistill.packaging import selection
    from diffdistill.scoring import feature_convnet

    g = torch.Generator().manual_seed(0)

    def split(n, kind):  # n images of each of 3 classes, 8x8 grey noise
        return LabeledImages(torch.randint(0, 256, (3 * n, 1, 8, 8), generator=g, dtype=torch.uint8),
                             torch.arange(3).repeat(n), ["a", "b", "c"], "toy", kind)

    (tmp_path / "samples").mkdir(), (tmp_path / "data").mkdir(), (tmp_path / "scoring").mkdir()
    real = split(6, "train")
    save_images(split(8, "synthetic"), tmp_path / "samples" / "pool.pt")
    save_images(real, tmp_path / "data" / "train.pt")
    save_images(split(2, "test"), tmp_path / "data" / "test.pt")
    feature_convnet.save_feature_convnet(tmp_path / "scoring" / "feature_convnet.pt", feature_convnet.train_feature_convnet(
        real, epochs=1, device="cpu", seed=0, net_width=8, net_depth=3))
    pool = tmp_path / "samples" / "pool.pt"
    load_benchmark("package_rules").main(["--run", str(tmp_path), "--dataset", "toy", "--ipc", "1", "6", "--epochs", "1",
                                          "--rounds", "2", "--pool", f"a={pool}", f"b={pool}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "IPC [1, 6], 1 epochs, 2 rounds, seed 0"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
    expected = [(ipc, f"{pool} {rule}") for ipc in ("1", "6") for pool in "ab" for rule in selection.RULES]
    expected += [("1", "random real (fresh subsets)"), ("6", "random real (fresh subsets)")]
    assert sorted((row[0], row[1]) for row in rows) == sorted(expected)
    for row in rows:  # beside each row random real at its IPC, and the gap in its std
        base = next(r for r in rows if r[0] == row[0] and r[1].startswith("random real"))
        assert row[3] == base[2]
        mean, spread = (float(v) for v in base[2].split(" ± "))
        if spread == 0:  # no spread: no gap in its units
            assert row[4] == "-"
        else:
            assert float(row[4]) == pytest.approx((float(row[2].split(" ± ")[0]) - mean) / spread, abs=0.06, rel=0.02)


def test_folder_read_times_each_worker_count_and_extrapolates(capsys):
    rows = load_benchmark("folder_read").main(["--images", "24", "--classes", "3", "--source-side", "20",
                                               "--side", "8", "--workers", "1", "2", "--extrapolate", "1000"])
    assert [row["workers"] for row in rows] == [1, 2]
    for row in rows:
        assert row["shape"] == (24, 3, 8, 8)  # every third file grey, the rest RGB: 3 channels inferred
        assert row["images_per_s"] == pytest.approx(24 / row["seconds"])
        assert row["extrapolated_s"] == pytest.approx(1000 / row["images_per_s"])
    assert "images/s" in capsys.readouterr().out


def test_thread_scaling_prints_speedup_and_efficiency_per_thread_count(capsys):
    bench = load_benchmark("thread_scaling")
    threads = torch.get_num_threads()
    argv = ["--threads", "1", "2", "--repeats", "1", "--steps", "1", "--epochs", "1",
            "--workloads", "fine-tuning step", "evaluator IPC 1"]
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads  # the benchmark leaves the process as it found it
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines[2:]]
    assert lines[1].split("\t") == bench.COLUMNS
    assert [(row[0], row[2]) for row in rows] == [("fine-tuning step", "1"), ("fine-tuning step", "2"),
                                                  ("evaluator IPC 1", "1"), ("evaluator IPC 1", "2")]
    for one, two in (rows[:2], rows[2:]):
        assert float(one[4]) == 1.0
        assert float(two[4]) == pytest.approx(float(one[3]) / float(two[3]), rel=0.002, abs=0.001)
        assert float(two[5]) == pytest.approx(float(two[4]) / 2, abs=0.001)


SNAKEMAKE_LOG = """\
Provided cores: 2
[Mon Dec  7 07:10:00 2026]
localrule prepare_data:
    output: data/train.pt
    jobid: 5
    resources: tmpdir=/tmp
[Mon Dec  7 07:10:04 2026]
Finished jobid: 5 (Rule: prepare_data)
[Mon Dec  7 07:10:04 2026]
localrule finetune:
    jobid: 6
    priority: 10
    threads: 2
[Mon Dec  7 07:10:14 2026]
Finished jobid: 6 (Rule: finetune)
[Mon Dec  7 07:10:14 2026]
localrule evaluate:
    wildcards: kind=real_ipc1
    jobid: 7
[Mon Dec  7 07:10:14 2026]
localrule evaluate:
    wildcards: kind=real_full
    jobid: 8
[Mon Dec  7 07:10:20 2026]
Finished jobid: 7 (Rule: evaluate)
[Mon Dec  7 07:10:30 2026]
Finished jobid: 8 (Rule: evaluate)
"""


def test_run_timeline_gives_each_job_its_span_and_counts_idle_cores(tmp_path, capsys):
    log = tmp_path / "run.snakemake.log"
    log.write_text(SNAKEMAKE_LOG)
    assert load_benchmark("run_timeline").main([str(log), "--cores", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t") for line in lines[1:-1]] == [
        ["prepare_data", "", "1", "0", "4", "4"], ["finetune", "", "2", "4", "14", "10"],
        ["evaluate", "kind=real_ipc1", "1", "14", "20", "6"], ["evaluate", "kind=real_full", "1", "14", "30", "16"]]
    # idle: one core during prepare (4) and one after real_ipc1 ends (10); work 4 + 20 + 6 + 16
    assert lines[-1] == "# wall 30 s, jobs' core-seconds 46, idle core-seconds 14 on 2 cores"
