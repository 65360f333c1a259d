"""Submission package (docs/reference.md, "Challenge protocol") and the two scripts around it, end to
end on tiny files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.cli import run_main
from diffdistill.data import LabeledImages, load_images, save_images
from diffdistill.diffusion import checkpoint, uvit
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.errors import DiffdistillError
from diffdistill.packaging.selection import RULES, package, select_indices
from diffdistill.packaging.submission import (labels_by_position, load_package, save_package, submission_filename,
                                              validate)
from diffdistill.records import BestCheckpoint, PackageRecord
from diffdistill.scoring import feature_convnet
from helpers import ENV, load_script

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)  # docs/reference.md, "Challenge protocol"
TINY_MEAN, TINY_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def by_hand(images, mean, std):
    """(x / 255 - mean) / std per channel, written out independently of diffdistill.data.normalize."""
    out = images.float() / 255.0
    for c in range(out.shape[1]):
        out[:, c] = (out[:, c] - mean[c]) / std[c]
    return out


@pytest.fixture
def pool():
    """3 classes with 5, 4, 6 images in shuffled order; pixel value encodes the pool position."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 6)[torch.randperm(15, generator=g)]
    images = torch.randint(0, 256, (15, 3, 4, 4), generator=g, dtype=torch.uint8)
    return LabeledImages(images, labels, ["apple", "bee", "cat"], "toy", "synthetic")


def cifar_like(n=1000, side=32, mean=CIFAR_MEAN, std=CIFAR_STD):
    images = torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return by_hand(images, mean, std)


# ----------------------------------------------------------------------------- package


def test_first_rule_gives_class_major_blocks_of_the_first_images(pool):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = package(pool, "toy", 2, mean=mean, std=std, rule="first")
    assert out.dtype == torch.float32 and out.shape == (6, 3, 4, 4)
    for k in range(3):
        first_two = [i for i, y in enumerate(pool.labels.tolist()) if y == k][:2]
        assert torch.allclose(out[2 * k: 2 * k + 2], by_hand(pool.images[first_two], mean, std), atol=1e-6)


def test_random_rule_is_seeded_and_stays_within_each_class(pool):
    a = select_indices(pool, 3, "random", seed=1)
    assert torch.equal(a, select_indices(pool, 3, "random", seed=1))
    assert any(not torch.equal(a, select_indices(pool, 3, "random", seed=s)) for s in range(2, 8))
    assert pool.labels[a].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(a.tolist())) == 9
    out = package(pool, "toy", 3, mean=(0.5,) * 3, std=(0.5,) * 3, rule="random", seed=1)
    assert torch.allclose(out, by_hand(pool.images[a], (0.5,) * 3, (0.5,) * 3), atol=1e-6)


def test_ipc_larger_than_a_class_names_the_class_and_counts(pool):
    with pytest.raises(DiffdistillError, match=r"class 1 \('bee'\) has 4") as err:
        package(pool, "toy", 5, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert "class 0" not in str(err.value) and "class 2" not in str(err.value)
    with pytest.raises(DiffdistillError, match="rule"):
        package(pool, "toy", 2, mean=(0.5,) * 3, std=(0.5,) * 3, rule="best")


def test_herding_keeps_on_label_images_and_matches_their_mean():
    # One class, 6 images with 1-d features; the classifier calls image 5 another class.
    labels = torch.zeros(6, dtype=torch.long)
    toy = LabeledImages(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), labels, ["a"])
    features = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.0], [5.0]])
    predictions = torch.tensor([0, 0, 0, 0, 0, 1])
    # Candidates 0..4 have mean 5: herding takes 4 (exactly 5) then the pair closest to keeping it.
    index = select_indices(toy, 1, "herding", features=features, predictions=predictions)
    assert index.tolist() == [4]
    index = select_indices(toy, 3, "herding", features=features, predictions=predictions)
    assert index.tolist() == [2, 3, 4]  # mean 5, in pool order; image 5 (off-label) is never picked
    with pytest.raises(DiffdistillError, match="herding"):
        select_indices(toy, 2, "herding")


def test_herding_moves_towards_the_given_real_class_mean():
    labels = torch.zeros(5, dtype=torch.long)
    toy = LabeledImages(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), labels, ["a"])
    features = torch.tensor([[0.0], [1.0], [2.0], [8.0], [9.0]])
    index = select_indices(toy, 2, "herding", features=features, predictions=torch.zeros(5, dtype=torch.long),
                           targets=torch.tensor([[8.5]]))
    assert index.tolist() == [3, 4]  # the real class sits at 8.5, not at the pool mean 4


def test_herding_falls_back_to_all_members_when_too_few_are_on_label():
    labels = torch.zeros(3, dtype=torch.long)
    toy = LabeledImages(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), labels, ["a"])
    index = select_indices(toy, 2, "herding", features=torch.tensor([[0.0], [1.0], [2.0]]),
                           predictions=torch.tensor([1, 1, 0]))
    assert index.numel() == 2


def test_coverage_picks_one_image_near_each_real_cluster():
    # Real images of the class sit in two clusters (around 0 and 10, the larger near 0); the pool's
    # on-label images are spread out. Coverage (greedy k-medoids on the real features) first takes the
    # image closest to the bulk, then one for the other cluster; herding to the real mean (about 4)
    # would take the middle instead. The off-label image 5 sits on a cluster and is never picked.
    labels = torch.zeros(6, dtype=torch.long)
    toy = LabeledImages(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), labels, ["a"])
    features = torch.tensor([[0.5], [4.0], [5.0], [9.5], [20.0], [0.0]])
    predictions = torch.tensor([0, 0, 0, 0, 0, 1])
    real = [torch.tensor([[0.0], [0.2], [0.4], [0.6], [10.0], [10.2]])]
    index = select_indices(toy, 1, "coverage", features=features, predictions=predictions, targets=real)
    assert index.tolist() == [0]
    index = select_indices(toy, 2, "coverage", features=features, predictions=predictions, targets=real)
    assert index.tolist() == [0, 3]
    herded = select_indices(toy, 2, "herding", features=features, predictions=predictions,
                            targets=torch.stack([real[0].mean(0)]))
    assert herded.tolist() != [0, 3]
    with pytest.raises(DiffdistillError, match="coverage"):
        select_indices(toy, 2, "coverage", features=features, predictions=predictions)


def test_unknown_rule_names_the_choices(pool):
    with pytest.raises(DiffdistillError) as err:
        select_indices(pool, 2, "best")
    assert all(repr(rule) in str(err.value) for rule in RULES) and "'best'" in str(err.value)


def test_a_class_smaller_than_the_ipc_is_named(pool):
    with pytest.raises(DiffdistillError, match=r"fewer than 10 images .*class 1 \('bee'\) has 4"):
        package(pool, "toy", 10, mean=(0.5,) * 3, std=(0.5,) * 3, rule="first")


def test_submission_filenames():
    assert submission_filename("cifar100") == "cifar100.pt"
    assert submission_filename("tinyimagenet") == "tinyimagenet.pt"
    assert submission_filename("digits") == "digits.pt"


# ----------------------------------------------------------------------------- validator


def test_validator_accepts_the_official_track1_shapes(tmp_path):
    checks = validate(cifar_like(), "cifar100")
    assert all(c["status"] == "pass" for c in checks)
    assert {c["check"] for c in checks} >= {"bare_tensor", "shape", "dtype", "finite", "normalised_range"}
    tiny = cifar_like(2000, 64, TINY_MEAN, TINY_STD)
    torch.save(tiny, tmp_path / "tinyimagenet.pt")
    validate(tmp_path / "tinyimagenet.pt", "tinyimagenet")


def test_other_ipc_is_allowed_with_a_warning_but_the_track1_layout_is_enforced():
    checks = validate(cifar_like(200), "cifar100", ipc=2)
    assert [c["status"] for c in checks if c["check"] == "track1_ipc"] == ["warn"]
    with pytest.raises(DiffdistillError, match="track1_layout"):
        validate(cifar_like(20), "cifar100", num_classes=10, ipc=2)


@pytest.mark.parametrize("bad, failing", [
    (lambda x: x[:999], ["shape"]),
    (lambda x: x.reshape(1000, 3, 16, 64), ["shape"]),
    (lambda x: x.double(), ["dtype"]),
    (lambda x: {"images": x, "labels": torch.arange(1000) // 10}, ["bare_tensor"]),
    (lambda x: x.index_fill(0, torch.tensor([7]), float("nan")), ["finite"]),
    (lambda x: (x * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) * 255,
     ["normalised_range"]),
    (lambda x: x * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1),
     ["normalised_centre"]),
])
def test_validator_refuses_each_broken_contract(bad, failing):
    with pytest.raises(DiffdistillError) as err:
        validate(bad(cifar_like()), "cifar100")
    for name in failing:
        assert name in str(err.value)


def test_validator_lists_every_failed_check():
    broken = cifar_like()[:500].double()
    broken[0, 0, 0, 0] = float("inf")
    with pytest.raises(DiffdistillError) as err:
        validate(broken, "cifar100")
    assert all(name in str(err.value) for name in ("shape", "dtype", "finite"))


def test_save_package_writes_a_bare_tensor_or_nothing(tmp_path):
    x = cifar_like()
    path = tmp_path / "sub" / "cifar100.pt"
    checks = save_package(x[:1000], path, "cifar100")
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, torch.Tensor) and torch.equal(loaded, x)
    assert all(c["status"] == "pass" for c in checks)
    bad = tmp_path / "bad" / "cifar100.pt"
    with pytest.raises(DiffdistillError, match=str(bad)):
        save_package(x[:10], bad, "cifar100")
    assert list(bad.parent.iterdir()) == []


# ----------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    checkpoint.save_checkpoint(path, model=model, step=1, ema=model,
                               config={"data": {"name": "toy", "classes": ["apple", "bee", "cat"]}})
    return path


SOLVER = ["--steps", "3", "--order", "2", "--method", "multistep", "--algorithm", "dpmsolver++", "--t-end", "1e-3"]


def test_sample_then_package_end_to_end(tmp_path, tiny_checkpoint, pool):
    out, meta = tmp_path / "samples.pt", tmp_path / "samples.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--meta", str(meta), "--budget-s", "60",
            "--batch-size", "4", "--max-images", "10", "--device", "cpu", "--seed", "3", *SOLVER,
            "--guidance-scale", "2.0"]
    assert run_main(load_script("sample_budget").main, argv) == 0
    samples = load_images(out)
    assert len(samples) == 10 and samples.classes == ["apple", "bee", "cat"] and samples.counts() == [4, 3, 3]
    doc = SamplingSummary.read(meta)
    assert doc.images == 10 and doc.counts == [4, 3, 3] and doc.settings.sampler.steps == 3
    assert doc.sampler.guidance_scale == 2.0 and doc.sampler.precision == "fp32"
    assert doc.images_per_s > 0 and doc.load_s >= 0 and doc.sampling_s > 0 and doc.budget_s == 60
    assert doc.classes == ["apple", "bee", "cat"] and doc.shards[0].seed == 3

    save_images(pool, tmp_path / "real.pt")  # stands in for the real train split of "toy"
    argv = ["--pool", str(out), "--dataset", "toy", "--ipc", "3", "--rule", "first", "--real-train", str(tmp_path / "real.pt"),
            "--out-dir", str(tmp_path / "submission"), "--pool-out", str(tmp_path / "pool_norm.pt"),
            "--meta", str(tmp_path / "package.json")]
    assert run_main(load_script("package").main, argv) == 0
    written = torch.load(tmp_path / "submission" / "toy.pt", weights_only=True)
    mean = [pool.images[:, c].double().div(255).mean().item() for c in range(3)]
    std = [pool.images[:, c].double().div(255).std().item() for c in range(3)]
    first = torch.cat([torch.nonzero(samples.labels == k).flatten()[:3] for k in range(3)])
    assert isinstance(written, torch.Tensor)
    assert torch.allclose(written, by_hand(samples.images[first], mean, std), atol=1e-5)
    whole = torch.load(tmp_path / "pool_norm.pt", weights_only=True)
    assert whole["images"].shape == (10, 3, 8, 8) and torch.equal(whole["labels"], samples.labels)
    assert whole["classes"] == ["apple", "bee", "cat"]
    record = PackageRecord.read(tmp_path / "package.json")
    assert record.shape == [9, 3, 8, 8] and (record.settings.ipc, record.settings.rule) == (3, "first")
    assert {check.status for check in record.checks} <= {"pass", "info"} and record.checks[0].check


def test_sample_budget_zero_exits_2_and_writes_nothing(tmp_path, tiny_checkpoint):
    out, meta = tmp_path / "samples.pt", tmp_path / "samples.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--meta", str(meta), "--budget-s", "0",
            "--batch-size", "4", "--device", "cpu", *SOLVER]
    assert run_main(load_script("sample_budget").main, argv) == 2
    assert not out.exists() and not meta.exists()


def test_sample_budget_takes_the_checkpoint_of_a_best_record_and_refuses_an_unversioned_one(tmp_path, tiny_checkpoint,
                                                                                          capsys):
    out, meta, best = tmp_path / "samples.pt", tmp_path / "samples.json", tmp_path / "best.json"
    argv = ["--best", str(best), "--out", str(out), "--meta", str(meta), "--budget-s", "60", "--batch-size", "4",
            "--max-images", "3", "--device", "cpu", *SOLVER]
    BestCheckpoint(settings={}, step=1, score=0.5, score_kind="FID", num_images=6,
                   checkpoint=str(tiny_checkpoint), environment=ENV).write(best)
    assert run_main(load_script("sample_budget").main, argv) == 0
    assert SamplingSummary.read(meta).settings.checkpoint == str(tiny_checkpoint)
    best.write_text(json.dumps({"step": 1, "score": 0.5, "checkpoint": str(tiny_checkpoint)}))  # no format, version
    out.unlink(), meta.unlink()
    assert run_main(load_script("sample_budget").main, argv) == 2
    assert "best.json: field 'format' is None" in capsys.readouterr().err and not out.exists()


def test_package_bad_input_exits_2_and_writes_nothing(tmp_path, pool):
    save_images(pool, tmp_path / "pool.pt")
    outputs = ["--out-dir", str(tmp_path / "sub"), "--pool-out", str(tmp_path / "p.pt"),
               "--meta", str(tmp_path / "m.json")]
    too_many = ["--pool", str(tmp_path / "pool.pt"), "--dataset", "toy", "--ipc", "5", "--rule", "first",
                "--real-train", str(tmp_path / "pool.pt"), *outputs]
    assert run_main(load_script("package").main, too_many) == 2
    # A 4x4 three-class pool cannot be a CIFAR-100 Track 1 package: the validator refuses it.
    not_cifar = ["--pool", str(tmp_path / "pool.pt"), "--dataset", "cifar100", "--ipc", "2", "--rule", "first", *outputs]
    done = subprocess.run([sys.executable, str(ROOT / "workflow/scripts/package.py"), *not_cifar],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "track1_layout" in done.stderr
    assert not (tmp_path / "sub").exists() or not any((tmp_path / "sub").iterdir())
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("rule", ["herding", "coverage"])
def test_package_script_with_a_feature_convnet(tmp_path, rule):
    g = torch.Generator().manual_seed(2)
    real = LabeledImages(torch.randint(0, 256, (18, 3, 8, 8), generator=g, dtype=torch.uint8),
                         torch.arange(3).repeat(6), ["apple", "bee", "cat"], "toy", "train")
    samples = LabeledImages(torch.randint(0, 256, (15, 3, 8, 8), generator=g, dtype=torch.uint8),
                            torch.arange(3).repeat(5), ["apple", "bee", "cat"], "toy", "synthetic")
    save_images(real, tmp_path / "real.pt")
    save_images(samples, tmp_path / "pool.pt")
    feature_convnet.save_feature_convnet(tmp_path / "fc.pt", feature_convnet.train_feature_convnet(
        real, epochs=1, device="cpu", seed=0, net_width=8, net_depth=2))
    argv = ["--pool", str(tmp_path / "pool.pt"), "--dataset", "toy", "--ipc", "2", "--rule", rule,
            "--real-train", str(tmp_path / "real.pt"), "--out-dir", str(tmp_path / "sub"),
            "--pool-out", str(tmp_path / "p.pt"), "--meta", str(tmp_path / "m.json")]
    assert run_main(load_script("package").main, argv) == 2  # no --feature-convnet: refused, nothing written
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "sub" / "toy.pt").exists()
    assert run_main(load_script("package").main, [*argv, "--feature-convnet", str(tmp_path / "fc.pt")]) == 0
    chosen = json.loads((tmp_path / "m.json").read_text())["chosen_indices"]
    assert samples.labels[chosen].tolist() == [0, 0, 1, 1, 2, 2] and len(set(chosen)) == 6
    mean = [real.images[:, c].double().div(255).mean().item() for c in range(3)]
    std = [real.images[:, c].double().div(255).std().item() for c in range(3)]
    written = torch.load(tmp_path / "sub" / "toy.pt", weights_only=True)
    assert torch.allclose(written, by_hand(samples.images[chosen], mean, std), atol=1e-5)


# --- reading a package back ----------------------------------------------------------------------


def test_labels_by_position_are_class_major_blocks():
    labels = labels_by_position(12, 3, 4)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Track 1 CIFAR-100: 1000 rows, class i in rows 10 i .. 10 i + 9.
    cifar = labels_by_position(1000, 100, 10)
    assert cifar[0] == 0 and cifar[9] == 0 and cifar[10] == 1 and cifar[999] == 99
    with pytest.raises(DiffdistillError, match="expected ipc"):
        labels_by_position(999, 100, 10)


def test_load_package_checks(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torch.randn(6, 1, 8, 8), good)
    x, y = load_package(good, 3, 2, (1, 8, 8))
    assert x.shape == (6, 1, 8, 8) and y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DiffdistillError, match="expected ipc"):
        load_package(good, 3, 3, (1, 8, 8))
    with pytest.raises(DiffdistillError, match="like the test set"):
        load_package(good, 3, 2, (3, 8, 8))
    torch.save({"images": torch.randn(6, 1, 8, 8)}, tmp_path / "dict.pt")
    with pytest.raises(DiffdistillError, match="bare float tensor"):
        load_package(tmp_path / "dict.pt", 3, 2, (1, 8, 8))
    with pytest.raises(DiffdistillError, match="no such file"):
        load_package(tmp_path / "missing.pt", 3, 2, (1, 8, 8))
