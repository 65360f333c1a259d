"""Checkpoint scoring and selection, and the three scoring scripts end to end (docs/reference.md,
"Method"; docs/reference.md, "FID")."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from diffdistill import cli
from diffdistill.data import LabeledImages, save_images
from diffdistill.diffusion import checkpoint, sampler_settings, sampling, uvit
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation.convnet import ConvNet
from diffdistill.records import BestCheckpoint, CheckpointScore
from diffdistill.scoring import checkpoint_scores, feature_convnet, fid
from helpers import ENV, load_script

FAST = sampler_settings.SamplerSettings(steps=2, order=2, method="multistep", algorithm="dpmsolver++", t_end=1e-3)
FAST_FLAGS = ["--steps", "2", "--order", "2", "--method", "multistep", "--algorithm", "dpmsolver++",
              "--t-end", "1e-3"]


script = load_script


def tiny_model(seed):
    torch.manual_seed(seed)
    return uvit.build("uvit_tiny_test", num_classes=3)  # 3 x 8 x 8 images, 3 classes + null


def save_tiny_checkpoint(path, *, model_seed, ema_seed, step):
    checkpoint.save_checkpoint(path, model=tiny_model(model_seed), ema=tiny_model(ema_seed), step=step,
                               config={"data": {"name": "tiny", "classes": ["a", "b", "c"]}})
    return path


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    net = ConvNet(channel=3, num_classes=3, net_width=8, net_depth=2, im_size=(8, 8))
    return fid.ConvNetExtractor(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu")


@pytest.fixture(scope="module")
def reference(extractor):
    torch.manual_seed(1)
    return fid.compute_stats(extractor, torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8))


def run_score(path, reference, extractor, seed=0, num_images=6):
    return checkpoint_scores.score_checkpoint(path, reference, extractor, num_images=num_images, batch_size=6,
                                    sampler=FAST, device="cpu", seed=seed)


# --------------------------------------------------------------------------- scoring


def test_score_uses_ema_weights_and_the_same_noise_for_every_checkpoint(tmp_path, reference, extractor):
    a = save_tiny_checkpoint(tmp_path / "a.pt", model_seed=1, ema_seed=2, step=100)
    b = save_tiny_checkpoint(tmp_path / "b.pt", model_seed=3, ema_seed=2, step=200)  # same EMA, other raw
    c = save_tiny_checkpoint(tmp_path / "c.pt", model_seed=2, ema_seed=1, step=300)  # a's weights swapped
    score_a, score_b, score_c = (run_score(p, reference, extractor) for p in (a, b, c))
    assert score_a["score"] == score_b["score"]  # only the EMA weights and the fixed seed matter
    assert score_a["score"] != score_c["score"]
    assert run_score(a, reference, extractor, seed=1)["score"] != score_a["score"]
    assert score_a["step"] == 100 and score_b["step"] == 200
    assert score_a["score_kind"] == "FD-ConvNet" and score_a["num_images"] == 6
    assert score_a["checkpoint"] == str(a) and score_a["seconds"] > 0
    assert math.isfinite(score_a["score"]) and score_a["score"] > 0


def test_scoring_samples_class_balanced_labels_in_fixed_batches(monkeypatch):
    seen = []

    def fake_generate(model, labels, settings, *, device, generator=None, seed=None, mode_targets=None):
        seen.append(labels.clone())
        return torch.zeros(labels.shape[0], 3, 8, 8, dtype=torch.uint8)

    monkeypatch.setattr(sampling, "generate", fake_generate)
    images = checkpoint_scores.sample_for_scoring(tiny_model(0), 14, 5, FAST, device="cpu", seed=0)
    labels = torch.cat(seen)
    assert images.shape == (14, 3, 8, 8) and [len(x) for x in seen] == [5, 5, 4]
    assert torch.bincount(labels, minlength=3).tolist() == [5, 5, 4]


def test_score_refuses_statistics_of_another_extractor(tmp_path, extractor):
    path = save_tiny_checkpoint(tmp_path / "a.pt", model_seed=1, ema_seed=2, step=1)
    inception_stats = fid.FeatureStats(np.zeros(32), np.eye(32), 100, "inception")
    with pytest.raises(DiffdistillError, match="inception features; the extractor is convnet"):
        run_score(path, inception_stats, extractor)


# --------------------------------------------------------------------------- selection


def rows(*pairs, kind="FID", n=500):
    return [CheckpointScore(settings={}, step=s, score=v, score_kind=kind, num_images=n, checkpoint=f"step_{s}.pt",
                            seconds=2.0, sampling_s=1.5, features_s=0.5, reference_count=30, timings_s={},
                            environment=ENV) for s, v in pairs]


def test_select_best_takes_the_lowest_and_ties_go_to_the_earliest_step():
    best, table = checkpoint_scores.select_best(rows((3000, 5.0), (1000, 7.0), (2000, 5.0), (4000, 6.0)))
    assert best.step == 2000 and best.checkpoint == "step_2000.pt"
    assert table["step"].tolist() == [1000, 2000, 3000, 4000]  # sorted by step for the curve
    assert table.loc[table["step"] == 4000, "score"].item() == 6.0


def test_select_best_never_picks_a_nan_score():
    best, _ = checkpoint_scores.select_best(rows((1, float("nan")), (2, 9.0)))
    assert best.step == 2
    with pytest.raises(DiffdistillError, match="NaN"):
        checkpoint_scores.select_best(rows((1, float("nan"))))


def test_select_best_refuses_incomparable_scores():
    with pytest.raises(DiffdistillError, match="no checkpoint scores"):
        checkpoint_scores.select_best([])
    with pytest.raises(DiffdistillError, match="score_kind"):
        checkpoint_scores.select_best(rows((1, 3.0)) + rows((2, 2.0), kind="FD-ConvNet"))
    with pytest.raises(DiffdistillError, match="num_images"):  # FID depends on the sample count
        checkpoint_scores.select_best(rows((1, 3.0), n=500) + rows((2, 2.0), n=1000))
    with pytest.raises(DiffdistillError, match="repeat steps"):
        checkpoint_scores.select_best(rows((1, 3.0), (1, 2.0)))


def test_score_and_best_records_round_trip_and_refuse_a_bad_field_naming_file_and_field(tmp_path):
    score = rows((1000, 4.5))[0]
    best = BestCheckpoint.of(score, settings={"scores": ["a.json"]}, environment=ENV)
    for record, kind in ((score, CheckpointScore), (best, BestCheckpoint)):
        record.write(tmp_path / "r.json")
        assert kind.read(tmp_path / "r.json") == record
        doc = record.to_json()
        assert (doc["step"], doc["score"], doc["checkpoint"]) == (1000, 4.5, "step_1000.pt")  # readable keys
        for change, expected in (({"score": None}, "field 'score' is NoneType None, expected a number"),
                                 ({"step": "1000"}, "field 'step' is str '1000', expected an integer"),
                                 ({"version": 0}, "field 'version' is 0, expected 1"),
                                 ({"extra": 1}, r"unknown fields \['extra'\]")):
            (tmp_path / "bad.json").write_text(json.dumps({**doc, **change}))
            with pytest.raises(DiffdistillError, match=f"bad.json: {expected}"):
                kind.read(tmp_path / "bad.json")
        (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "score_kind"}))
        with pytest.raises(DiffdistillError, match="bad.json: field 'score_kind' missing .expected a string"):
            kind.read(tmp_path / "bad.json")
    with pytest.raises(DiffdistillError, match="'diffdistill-checkpoint-score', expected 'diffdistill-best-checkpoint'"):
        BestCheckpoint.from_json(score.to_json(), "step.json")  # a score is not the chosen checkpoint


def test_plot_is_a_png_written_atomically(tmp_path):
    _, table = checkpoint_scores.select_best(rows((1000, 9.0), (2000, 4.0), (3000, 6.0)))
    path = tmp_path / "curve.png"
    checkpoint_scores.plot_scores(table, path, "FID")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


# --------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny real split and two checkpoints, as the workflow would have them."""
    root = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    real = LabeledImages(torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8),
                         torch.arange(30) % 3, ["a", "b", "c"], "tiny", "train")
    save_images(real, root / "train.pt")
    save_tiny_checkpoint(root / "step_0000100.pt", model_seed=1, ema_seed=2, step=100)
    save_tiny_checkpoint(root / "step_0000200.pt", model_seed=3, ema_seed=4, step=200)
    return root


def test_scripts_end_to_end_with_the_feature_convnet(workdir):
    stats, convnet = workdir / "ref.npz", workdir / "feature_convnet.pt"
    assert cli.run_main(script("reference_stats").main, [
        "--real-train", str(workdir / "train.pt"), "--extractor", "convnet", "--convnet-epochs", "1",
        "--convnet-out", str(convnet), "--stats-out", str(stats), "--device", "cpu", "--seed", "0"]) == 0
    reference = fid.load_stats(stats)
    assert reference.count == 30 and reference.score_kind == "FD-ConvNet" and reference.mu.shape == (128,)
    outs = []
    for step in (100, 200):
        outs.append(workdir / f"score_{step}.json")
        assert cli.run_main(script("score_checkpoint").main, [
            "--checkpoint", str(workdir / f"step_{step:07d}.pt"), "--stats", str(stats), "--extractor", "convnet",
            "--convnet", str(convnet), "--num-images", "6", "--batch-size", "6", *FAST_FLAGS,
            "--guidance-scale", "2.0", "--device", "cpu", "--seed", "3", "--out", str(outs[-1])]) == 0
    scores = [json.loads(p.read_text()) for p in outs]
    assert [s["step"] for s in scores] == [100, 200] and scores[0]["score_kind"] == "FD-ConvNet"
    assert scores[0]["settings"]["sampler"]["guidance_scale"] == 2.0
    csv, best, plot = workdir / "scores.csv", workdir / "best.json", workdir / "curve.png"
    assert cli.run_main(script("select_checkpoint").main, [
        "--scores", *map(str, outs), "--csv", str(csv), "--best", str(best), "--plot", str(plot)]) == 0
    table = pd.read_csv(csv)
    assert table["step"].tolist() == [100, 200]
    chosen = json.loads(best.read_text())
    expected = min(scores, key=lambda s: (s["score"], s["step"]))
    assert (chosen["step"], chosen["score"]) == (expected["step"], expected["score"])
    assert chosen["score_kind"] == "FD-ConvNet" and chosen["num_images"] == 6
    assert chosen["checkpoint"] == str(workdir / f"step_{expected['step']:07d}.pt")
    assert plot.stat().st_size > 0


def test_feature_convnet_file_round_trip_gives_the_same_features(workdir):
    real = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    contents = feature_convnet.train_feature_convnet(
        LabeledImages(real, torch.tensor([0, 1, 2, 0]), ["a", "b", "c"], "tiny"), epochs=0, device="cpu", seed=0)
    feature_convnet.save_feature_convnet(workdir / "fc.pt", contents)
    loaded = feature_convnet.load_feature_convnet(workdir / "fc.pt", "cpu")
    net = ConvNet(**contents["architecture"])
    net.load_state_dict(contents["state_dict"])
    torch.testing.assert_close(loaded(real), fid.ConvNetExtractor(net, contents["mean"], contents["std"], "cpu")(real))
    with pytest.raises(DiffdistillError, match="train.pt: not a feature ConvNet file"):
        feature_convnet.load_feature_convnet(workdir / "train.pt", "cpu")


def test_missing_stats_file_exits_2_and_leaves_no_output(workdir):
    out = workdir / "never.json"
    assert cli.run_main(script("score_checkpoint").main, [
        "--checkpoint", str(workdir / "step_0000100.pt"), "--stats", str(workdir / "missing.npz"),
        "--extractor", "convnet", "--convnet", str(workdir / "none.pt"), "--num-images", "4", "--batch-size", "4",
        "--device", "cpu", "--out", str(out)]) == 2
    assert not out.exists()


def test_corrupt_checkpoint_exits_2_and_leaves_no_output(workdir, tmp_path, reference):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    stats, convnet, out = tmp_path / "ref.npz", tmp_path / "fc.pt", tmp_path / "score.json"
    contents = feature_convnet.train_feature_convnet(
        LabeledImages(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.arange(3), ["a", "b", "c"], "tiny"),
        epochs=0, device="cpu", seed=0)
    feature_convnet.save_feature_convnet(convnet, contents)
    fid.save_stats(stats, fid.FeatureStats(np.zeros(128), np.eye(128), 10, "convnet"))
    assert cli.run_main(script("score_checkpoint").main, [
        "--checkpoint", str(corrupt), "--stats", str(stats), "--extractor", "convnet", "--convnet", str(convnet),
        "--num-images", "4", "--batch-size", "4", *FAST_FLAGS, "--device", "cpu", "--out", str(out)]) == 2
    assert not out.exists()


def test_reference_stats_bad_input_exits_2_and_leaves_nothing(workdir, tmp_path):
    stats, convnet = tmp_path / "ref.npz", tmp_path / "fc.pt"
    reference_stats = script("reference_stats").main
    assert cli.run_main(reference_stats, ["--real-train", str(workdir / "train.pt"), "--extractor", "convnet",
                                          "--convnet-epochs", "1", "--stats-out", str(stats),
                                          "--device", "cpu"]) == 2  # no --convnet-out
    assert cli.run_main(reference_stats, ["--real-train", str(tmp_path / "missing.pt"), "--extractor", "convnet",
                                          "--convnet-epochs", "1", "--convnet-out", str(convnet),
                                          "--stats-out", str(stats), "--device", "cpu"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_select_checkpoint_bad_score_file_exits_2_and_leaves_nothing(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    rows((1, 2.0))[0].write(good)
    bad.write_text("{ truncated")
    outs = [tmp_path / "s.csv", tmp_path / "best.json", tmp_path / "c.png"]
    assert cli.run_main(script("select_checkpoint").main, [
        "--scores", str(good), str(bad), "--csv", str(outs[0]), "--best", str(outs[1]), "--plot", str(outs[2])]) == 2
    assert not any(p.exists() for p in outs)
