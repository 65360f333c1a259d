"""Report stage (grid, summary contract, markdown), shard merging script and small helpers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffdistill import atomic, data, report
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling_summary import SamplingSummary, ShardRun
from diffdistill.errors import DiffdistillError
from diffdistill.records import BestCheckpoint, BudgetPrefix, EvaluationResult, MeanStd, RunSummary
from helpers import ENV, load_script, sampling_job



def labelled(n_per_class=3, classes=4, channels=1, side=8, offset=0):
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = (labels * 40 + offset).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, channels, side, side).clone()
    return data.LabeledImages(images, labels, [str(i) for i in range(classes)], "toy", "synthetic")


def test_sample_grid_has_one_row_per_class_with_that_class_images():
    grid = report.sample_grid(labelled(), per_class=3)
    assert grid.size == (3 * 9, 4 * 9)  # (width, height): 8 px + 1 px separator per cell
    pixels = torch.from_numpy(np.array(grid)).view(grid.height, grid.width)
    for label in range(4):
        assert (pixels[label * 9 : label * 9 + 8, 0:8] == label * 40).all()
    assert report.grid_scale(8) == 4 and report.grid_scale(32) == 1


def accuracy(mean, std=0.01, rounds=2, epochs=3, prefix=None):
    return EvaluationResult(settings={}, mean=mean, std=std, accuracies=[] if mean is None else [mean - std, mean + std],
                            epochs=epochs, rounds=rounds, train_size=0 if mean is None else 10, budget_prefix=prefix,
                            environment=ENV)


BEST = BestCheckpoint(settings={}, step=1000, score=1.25, score_kind="FD-ConvNet", num_images=500, checkpoint="c.pt",
                      environment=ENV)


def sampling_summary(counts, sampling_s, *, shard=0, budget_s=10.0, classes=None) -> SamplingSummary:
    settings = sampling_job(budget_s, steps=20, method="multistep", algorithm="dpmsolver++", order=2,
                            guidance_scale=2.0)
    run = ShardRun(shard=shard, seed=shard, counts=counts, sampling_s=sampling_s, load_s=0.5, device_name="cpu")
    return SamplingSummary(settings, classes or [str(k) for k in range(len(counts))], [run], environment=ENV)


def test_summary_has_the_contract_keys_and_markdown_shows_the_figures():
    meta = sampling_summary([100] * 5, 10.0)
    means = {"synthetic_ipc1": 0.5, "real_ipc1": 0.6, "synthetic_ipc10": 0.9, "real_ipc10": 0.95,
             "synthetic_pool": 0.92, "real_full": 0.99}
    acc = {kind: accuracy(mean) for kind, mean in means.items()}
    record = report.build_summary(dataset="digits", best=BEST, sampling=meta, accuracy=acc, ipc_grid=[10, 1])
    summary = record.to_json()  # the file's layout, as other tools read it
    assert (summary["format"], summary["version"]) == ("diffdistill-summary", 3)
    assert summary["best_step"] == 1000 and summary["pool_images"] == 500
    assert summary["sampling_images_per_s_per_shard"] == [50.0]
    assert summary["accuracy"] == {kind: {"mean": mean, "std": 0.01} for kind, mean in means.items()}
    assert summary["ipc_grid"] == [  # by IPC, whatever the grid's order
        {"ipc": 1, "synthetic": {"mean": 0.5, "std": 0.01}, "real": {"mean": 0.6, "std": 0.01}},
        {"ipc": 10, "synthetic": {"mean": 0.9, "std": 0.01}, "real": {"mean": 0.95, "std": 0.01}}]
    text = report.render_markdown(record, scores=[{"step": 500, "score": 2.0}, {"step": 1000, "score": 1.25}],
                                  sampling=meta, figures={"curve": "c.png", "grid": "g.png", "ipc": "i.png"},
                                  evaluations=acc)
    assert "| 1000 | 1.250 ← |" in text and "50.0 images/s" in text and "| 90.00 ± 1.00 | 2 | 3 |" in text
    assert "synthetic, IPC-10 package" in text and "real, random IPC-1 subsets" in text
    assert "![score curve](c.png)" in text and "![accuracy against IPC](i.png)" in text
    assert "| 1 | 50.00 ± 1.00 | 60.00 ± 1.00 |" in text and "| 10 | 90.00 ± 1.00 | 95.00 ± 1.00 |" in text
    assert "full real training set reaches 99.00 ± 1.00 %" in text
    # The field's scores per IPC, round by round: IPC 1 has HLR 0.49 (0.98 - 0.49, 1.00 - 0.51) and IOR -0.1.
    assert [row["ipc"] for row in summary["scores"]] == [1, 10]
    assert summary["scores"][0]["scores"]["hlr"] == {"mean": pytest.approx(0.49), "std": pytest.approx(0.0)}
    assert summary["scores"][0]["scores"]["ior"]["mean"] == pytest.approx(-0.1)
    assert summary["scores"][0]["scores"]["ars"] is None  # no evaluations without DSA
    assert "## The field's scores" in text and "| 1 | 49.00 ± 0.00 | -10.00 ± 0.00 |" in text

    assert "DPM-Solver multistep dpmsolver++ order 2, 20 steps, guidance w=2.0, fp32" in text
    for missing in ("real_full", "real_ipc1"):
        with pytest.raises(DiffdistillError, match=missing):
            report.build_summary(dataset="digits", best=BEST, sampling=meta, ipc_grid=[1, 10],
                                 accuracy={k: v for k, v in acc.items() if k != missing})
    with pytest.raises(DiffdistillError, match="synthetic_pool.json: field 'budget_prefix' is null"):
        report.budget_curve({"synthetic_pool.json": acc["synthetic_pool"]})


def test_sharded_sampling_gives_the_summed_rate_and_each_shard_s_in_summary_and_markdown():
    shards = [sampling_summary([60] * 5, 10.0, shard=0), sampling_summary([40] * 5, 8.0, shard=1)]
    merged = SamplingSummary.merge(shards, environment=ENV)
    acc = {kind: accuracy(0.5) for kind in ("synthetic_ipc1", "real_ipc1", "synthetic_pool", "real_full")}
    record = report.build_summary(dataset="digits", best=BEST, sampling=merged, accuracy=acc, ipc_grid=[1])
    assert record.pool_images == 500 and record.sampling_images_per_s_per_shard == [30.0, 25.0]
    assert record.sampling_images_per_s == pytest.approx(55.0)
    text = report.render_markdown(record, scores=[{"step": 1000, "score": 1.25}], sampling=merged,
                                  figures={"curve": "c.png", "grid": "g.png", "ipc": "i.png"}, evaluations=acc)
    assert "in each of 2 parallel shards (30.0, 25.0 images/s): **55.0 images/s**" in text


def test_with_evaluations_without_dsa_the_summary_holds_ars():
    means = {"synthetic_ipc1": 0.5, "real_ipc1": 0.6, "synthetic_pool": 0.92, "real_full": 0.99,
             "synthetic_ipc1_noaug": 0.45, "real_ipc1_noaug": 0.35}
    acc = {kind: accuracy(mean) for kind, mean in means.items()}
    record = report.build_summary(dataset="digits", best=BEST, sampling=sampling_summary([100] * 5, 10.0),
                                  accuracy=acc, ipc_grid=[1])
    # beta = 0.5 * (0.5 - 0.6) + 0.5 * (0.45 - 0.35) = 0 in both rounds: ARS = norm(0).
    assert record.scores[0].scores.ars.mean == pytest.approx(0.2689414213699951)
    assert set(record.accuracy) == {"synthetic_ipc1", "real_ipc1", "synthetic_pool", "real_full"}



def test_merge_samples_script_joins_shards(tmp_path):
    merge = load_script("merge_samples")
    paths = []
    for shard in range(2):
        pool = labelled(n_per_class=shard + 1, offset=shard)
        data.save_images(pool, tmp_path / f"s{shard}.pt")
        sampling_summary(pool.counts(), len(pool) / (2.0 + shard), shard=shard).write(tmp_path / f"s{shard}.json")
        paths.append(shard)
    out, meta = tmp_path / "pool.pt", tmp_path / "pool.json"
    args = ["--shards", *(str(tmp_path / f"s{i}.pt") for i in paths),
            "--metas", *(str(tmp_path / f"s{i}.json") for i in paths), "--out", str(out), "--meta", str(meta)]
    assert merge.main(args) == 0
    merged = data.load_images(out)
    assert len(merged) == 12 and merged.counts() == [3, 3, 3, 3]
    summary = SamplingSummary.read(meta)
    assert summary.images_per_s == pytest.approx(5.0) and len(summary.shards) == 2 and summary.images == 12
    sampling_summary([99, 0, 0, 0], 1.0, shard=1).write(tmp_path / "s1.json")  # counts the files do not hold
    out.unlink(), meta.unlink()
    assert merge_fails(merge, args)
    assert not out.exists() and not meta.exists()


def merge_fails(merge, args) -> bool:
    from diffdistill.cli import run_main

    return run_main(merge.main, args) == 2


def test_report_script_end_to_end(tmp_path, capsys):
    script = load_script("report")
    pool = labelled()
    data.save_images(pool, tmp_path / "pool.pt")
    sampling_summary(pool.counts(), 4.0, budget_s=4.0).write(tmp_path / "pool.json")
    BestCheckpoint(settings={}, step=6, score=0.5, score_kind="FID", num_images=20, checkpoint="x.pt",
                   environment=ENV).write(tmp_path / "best.json")
    pd.DataFrame([{"step": 3, "score": 0.7}, {"step": 6, "score": 0.5}]).to_csv(tmp_path / "scores.csv", index=False)
    evals = []
    for kind in report.accuracy_rows([1, 3], 12):
        path = tmp_path / f"{kind}.json"
        accuracy(0.5 if kind != "synthetic_ipc1" else 0.3, std=0.1).write(path)
        evals.append(str(path))
    out = {name: tmp_path / "out" / name for name in ("report.md", "summary.json", "grid.png", "ipc_grid.png")}
    args = ["--dataset", "digits", "--best", str(tmp_path / "best.json"), "--scores", str(tmp_path / "scores.csv"),
            "--curve", str(tmp_path / "curve.png"), "--pool", str(tmp_path / "pool.pt"),
            "--pool-meta", str(tmp_path / "pool.json"), "--evaluations", *evals, "--ipc", "1", "3",
            "--report", str(out["report.md"]), "--summary", str(out["summary.json"]), "--grid", str(out["grid.png"]),
            "--accuracy-table", str(tmp_path / "out" / "accuracy.tsv"), "--ipc-plot", str(out["ipc_grid.png"])]
    assert script.main(args) == 0
    summary = json.loads(out["summary.json"].read_text())
    assert summary["accuracy"]["real_full"] == {"mean": 0.5, "std": 0.1}
    assert RunSummary.read(out["summary.json"]).accuracy["real_full"] == MeanStd(0.5, 0.1)  # a typed record
    assert summary["budget_curve"] == [] and summary["sweep"] == []  # off: empty lists
    assert [(row["ipc"], row["synthetic"]["mean"]) for row in summary["ipc_grid"]] == [(1, 0.3), (3, 0.5)]
    assert "](../curve.png)" in out["report.md"].read_text() and "](ipc_grid.png)" in out["report.md"].read_text()
    assert Image.open(out["ipc_grid.png"]).size[0] > 0
    assert "What the budget buys" not in out["report.md"].read_text()
    assert Image.open(out["grid.png"]).size == (10 * 9 * 4, 4 * 9 * 4)
    table = pd.read_csv(tmp_path / "out" / "accuracy.tsv", sep="\t")
    assert table["accuracy mean (%)"].tolist() == [30.0] + [50.0] * 5
    assert table["training set"].tolist()[:4] == ["synthetic, IPC-1 package", "real, random IPC-1 subsets (a fresh one "
                                                  "per round)", "synthetic, IPC-3 package",
                                                  "real, random IPC-3 subsets (a fresh one per round)"]

    # With a budget curve and a sweep: their numbers in summary.json, figures and tables beside report.md.
    budget = []
    for fraction, images, mean in ((0.5, 0, None), (1.0, 16, 0.6)):
        path = tmp_path / f"budget_{fraction}.json"
        accuracy(mean, std=None if mean is None else 0.02,
                 prefix=BudgetPrefix(fraction=fraction, seconds=4.0 * fraction, images=images)).write(path)
        budget.append(str(path))
    (tmp_path / "sweep" / "s10_w2").mkdir(parents=True)
    sampling_summary([5, 5, 5, 5], 2.0, budget_s=4.0).write(tmp_path / "sweep" / "s10_w2" / "pool.json")
    accuracy(0.4, std=0.0).write(tmp_path / "sweep_s10_w2.json")
    extra = {name: tmp_path / "out" / name for name in ("budget.png", "sweep.png", "sweep.tsv")}
    assert script.main([*args, "--budget-evaluations", *reversed(budget), "--budget-plot", str(extra["budget.png"]),
                        "--sweep-metas", str(tmp_path / "sweep" / "s10_w2" / "pool.json"),
                        "--sweep-evaluations", str(tmp_path / "sweep_s10_w2.json"),
                        "--sweep-plot", str(extra["sweep.png"]), "--sweep-table", str(extra["sweep.tsv"])]) == 0
    summary = json.loads(out["summary.json"].read_text())
    assert summary["budget_curve"] == [
        {"fraction": 0.5, "seconds": 2.0, "images": 0, "accuracy": {"mean": None, "std": None}},
        {"fraction": 1.0, "seconds": 4.0, "images": 16, "accuracy": {"mean": 0.6, "std": 0.02}}]
    row, = summary["sweep"]
    assert (row["name"], row["images"], row["images_per_s"], row["accuracy"]) == ("s10_w2", 20, 10.0,
                                                                                 {"mean": 0.4, "std": 0.0})
    assert row["settings"]["steps"] == 20 and "budget_s" not in row["settings"]
    text = out["report.md"].read_text()
    assert "](budget.png)" in text and "](sweep.png)" in text and "| 0.5 | 2.0 | 0 | no images |" in text
    assert all(Image.open(path).size[0] > 0 for path in (extra["budget.png"], extra["sweep.png"]))
    assert pd.read_csv(extra["sweep.tsv"], sep="\t")["variant"].tolist() == ["s10_w2"]

    # A result without its record's fields (here an unversioned one of an older evaluate) stops the report.
    (tmp_path / "real_full.json").write_text(json.dumps({"mean": 0.5, "std": 0.1, "rounds": 2, "epochs": 3}))
    for path in out.values():
        path.unlink()
    from diffdistill.cli import run_main

    assert run_main(script.main, args) == 2
    assert "real_full.json: field 'format' is None" in capsys.readouterr().err
    assert not any(path.exists() for path in out.values())


def test_publish_links_or_copies_atomically(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"checkpoint")
    atomic.publish(source, tmp_path / "sub" / "b.bin")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"checkpoint"
    assert not list((tmp_path / "sub").glob(".*tmp"))


def test_concat_images_refuses_different_classes():
    a, b = labelled(), labelled(classes=3)
    with pytest.raises(Exception, match="classes or image shape"):
        data.concat_images([a, b])
    assert len(data.concat_images([a, a])) == 2 * len(a)
