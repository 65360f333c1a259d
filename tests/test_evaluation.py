"""The challenge train/test protocol (docs/reference.md, "Challenge protocol") and the evaluate stage,
on tiny problems."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdistill import resume
from diffdistill.cli import run_main
from diffdistill.data import LabeledImages, save_images
from diffdistill.data.normalize import CHALLENGE_STATS, channel_stats, normalize
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import protocol
from diffdistill.evaluation.state import EvaluationState
from diffdistill.records import BudgetPrefix, EvaluationResult
from diffdistill.resume import JobKey
from helpers import ENV, load_script, sampling_job

SMALL = dict(net_width=16)  # the protocol at a fraction of the width, to keep CPU tests fast


def stripes(n_per_class: int, num_classes: int = 3, seed: int = 0, side: int = 8):
    """uint8 (N, 1, side, side): class 0 horizontal stripes, 1 vertical, 2 a checkerboard, plus noise."""
    g = torch.Generator().manual_seed(seed)
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patterns = torch.stack([r % 2, c % 2, (r + c) % 2])[:num_classes].float() * 180 + 40  # (K, side, side)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    images = patterns[labels][:, None] + 25 * torch.randn(len(labels), 1, side, side, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


def labeled(n_per_class, seed, split, num_classes=3):
    images, labels = stripes(n_per_class, num_classes, seed)
    return LabeledImages(images, labels, [f"c{k}" for k in range(num_classes)], "stripes", split)


def as_float(data: LabeledImages):
    mean, std = channel_stats(data.images)
    return normalize(data.images, mean, std), data.labels


# --- helpers for the four cases ------------------------------------------------------------------


def test_random_real_indices():
    real = labeled(7, 0, "train")
    index = protocol.random_real_indices(real, 3, torch.Generator().manual_seed(0))
    sub = real.subset(index)
    assert sub.counts() == [3, 3, 3] and sub.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert len(set(index.tolist())) == 9  # without replacement
    again = protocol.random_real_indices(real, 3, torch.Generator().manual_seed(0))
    other = protocol.random_real_indices(real, 3, torch.Generator().manual_seed(1))
    assert torch.equal(again, index) and not torch.equal(other, index)
    with pytest.raises(DiffdistillError, match="at least ipc = 8"):
        protocol.random_real_indices(real, 8)


def test_random_real_baseline_draws_a_fresh_subset_per_round(tmp_path, monkeypatch):
    real, test = labeled(7, 0, "train"), labeled(2, 1, "test")
    save_images(real, tmp_path / "real.pt")
    mean, std = channel_stats(real.images)
    x, y, what, rounds = protocol.load_training_set(tmp_path / "real.pt", "images", test, mean, std,
                                                      random_ipc=3, rounds=3, seed=4)
    assert len(x) == 21 and len(rounds) == 3 and "fresh subset per round" in what
    assert len({tuple(r.tolist()) for r in rounds}) == 3  # three different subsets
    assert all(y[r].tolist() == [0] * 3 + [1] * 3 + [2] * 3 for r in rounds)
    seen = []
    real_train = protocol.train_convnet
    monkeypatch.setattr(protocol, "train_convnet", lambda tx, ty, **kw: seen.append(tx) or real_train(tx, ty, **kw))
    result = protocol.train_and_evaluate(x, y, *as_float(test), num_classes=3, channel=1, im_size=(8, 8), epochs=0,
                                           rounds=3, device="cpu", seed=0, round_indices=rounds, log_every=0, **SMALL)
    assert [torch.equal(tx, x[r]) for tx, r in zip(seen, rounds)] == [True] * 3 and result["train_size"] == 9
    with pytest.raises(DiffdistillError, match="one index tensor per round"):
        protocol.train_and_evaluate(x, y, x, y, num_classes=3, channel=1, im_size=(8, 8), epochs=0, rounds=2,
                                      device="cpu", round_indices=rounds)


def test_normalization_stats():
    real = labeled(4, 0, "train")
    assert protocol.normalization_stats("cifar100", None) == CHALLENGE_STATS["cifar100"]
    assert protocol.normalization_stats("stripes", real) == channel_stats(real.images)
    with pytest.raises(DiffdistillError, match="--real-train"):
        protocol.normalization_stats("stripes", None)


# --- the protocol --------------------------------------------------------------------------------


def test_lr_drops_after_the_midpoint_with_a_new_optimizer():
    # docs/reference.md, "Challenge protocol": 1001 passes, lr x 0.1 after pass 501
    assert protocol.lr_drop_epoch(1000) == 501
    x, y = as_float(labeled(3, 0, "train"))
    seen = []
    protocol.train_convnet(x, y, num_classes=3, channel=1, im_size=(8, 8), epochs=6, batch_size=4,
                             device="cpu", on_epoch=seen.append, log_every=0, **SMALL)
    assert [s["epoch"] for s in seen] == list(range(7))  # passes 0..epochs
    assert [s["lr"] for s in seen] == pytest.approx([0.01] * 5 + [0.001] * 2)  # drop after pass 6 // 2 + 1 = 4
    optimizers = [s["optimizer"] for s in seen]
    assert all(o is optimizers[0] for o in optimizers[:5]) and optimizers[5] is not optimizers[0]
    group = optimizers[5].param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4) and type(optimizers[5]) is torch.optim.SGD


def test_batches_are_shuffled_with_a_partial_last_batch(monkeypatch):
    x, y = as_float(labeled(5, 0, "train"))  # 15 images, batch 4: 4 + 4 + 4 + 3
    sizes, firsts = [], []
    real_apply = protocol.apply_params

    def spy(images, family, drawn, params):
        sizes.append(len(images))
        firsts.append(images[0].clone())
        return real_apply(images, family, drawn, params)

    monkeypatch.setattr(protocol, "apply_params", spy)
    protocol.train_convnet(x, y, num_classes=3, channel=1, im_size=(8, 8), epochs=1, batch_size=4,
                             device="cpu", generator=torch.Generator().manual_seed(0), log_every=0, **SMALL)
    assert sizes == [4, 4, 4, 3] * 2  # DSA on every training batch
    assert not torch.equal(firsts[0], firsts[4])  # a new order each pass


def test_rounds_start_from_fresh_initialisations(monkeypatch):
    inits, finals = [], []

    class Recording(protocol.ConvNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inits.append({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(protocol, "ConvNet", Recording)
    x, y = as_float(labeled(3, 0, "train"))
    last = lambda info: finals.append(info["model"].classifier.weight.detach().clone())  # noqa: E731
    result = protocol.train_and_evaluate(x, y, x, y, num_classes=3, channel=1, im_size=(8, 8), epochs=0,
                                           rounds=3, device="cpu", log_every=0, on_epoch=last, **SMALL)
    assert len(inits) == 3 and result["rounds"] == 3 and len(result["accuracies"]) == 3
    w = [i["classifier.weight"] for i in inits]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert not torch.equal(w[1], finals[0])  # round 2 does not continue from round 1's weights


def test_seeded_runs_repeat_and_unseeded_differ():
    x, y = as_float(labeled(4, 0, "train"))
    kw = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=1, rounds=2, batch_size=4, device="cpu",
              log_every=0, **SMALL)
    a = protocol.train_and_evaluate(x, y, x, y, seed=3, **kw)
    b = protocol.train_and_evaluate(x, y, x, y, seed=3, **kw)
    assert a["accuracies"] == b["accuracies"]
    assert a["mean"] == pytest.approx(np.mean(a["accuracies"])) and a["std"] == pytest.approx(np.std(a["accuracies"]))
    assert a["train_size"] == 12 and a["epochs"] == 1 and a["seconds"] > 0


def test_separable_problem_is_learnt_in_a_few_epochs():
    train, test = labeled(20, 0, "train"), labeled(30, 1, "test")
    mean, std = channel_stats(train.images)
    result = protocol.train_and_evaluate(
        normalize(train.images, mean, std), train.labels, normalize(test.images, mean, std), test.labels,
        num_classes=3, channel=1, im_size=(8, 8), epochs=8, rounds=1, batch_size=8, device="cpu", seed=0,
        log_every=0)  # the full-width ConvNet; only the batch is smaller, for more steps per pass
    assert result["mean"] >= 0.9, result


def test_evaluate_accuracy_counts_the_whole_set_in_eval_mode():
    class Constant(torch.nn.Module):
        def forward(self, x):
            assert not self.training
            return torch.tensor([[0.0, 1.0, 0.0]]).expand(len(x), 3)  # always class 1

    y = torch.tensor([1] * 7 + [0] * 3 + [2] * 2500)
    acc = protocol.evaluate_accuracy(Constant(), torch.zeros(len(y), 1, 2, 2), y, "cpu")
    assert acc == pytest.approx(7 / len(y))


def test_bad_training_input():
    x, y = as_float(labeled(2, 0, "train"))
    kw = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=0, device="cpu")
    with pytest.raises(DiffdistillError, match="labels"):
        protocol.train_convnet(x, y + 1, **kw)
    with pytest.raises(DiffdistillError, match="training images"):
        protocol.train_convnet(x[:, :, :4], y, **kw)
    with pytest.raises(DiffdistillError, match="rounds"):
        protocol.train_and_evaluate(x, y, x, y, rounds=0, **kw)


# --- resuming a long evaluation --------------------------------------------------------------------


class Interrupt(Exception):
    """Stands for a kill: raised from the epoch callback."""


def run_rounds(state=None, stop_at=None, seed=3):
    """2 rounds x 7 passes on the stripes; returns (result, {(round, epoch): loss}) or raises Interrupt."""
    x, y = as_float(labeled(4, 0, "train"))
    losses = {}

    def on_epoch(info):
        losses[info["round"], info["epoch"]] = info["loss"]
        if (info["round"], info["epoch"]) == stop_at:
            raise Interrupt

    result = protocol.train_and_evaluate(x, y, x, y, num_classes=3, channel=1, im_size=(8, 8), epochs=6,
                                           rounds=2, batch_size=4, device="cpu", seed=seed, log_every=0,
                                           on_epoch=on_epoch, state=state, **SMALL)
    return result, losses


KEY = JobKey.of({"epochs": 6}, "stripes")


# Saves after passes 1, 3 and 5 (every 2); the lr drops after pass 4 (epochs 6), so the kill at pass 6
# resumes with the dropped lr and the re-created optimizer's momentum.
@pytest.mark.parametrize("stop_at,saved_epoch,resumed_rounds", [((0, 4), 3, []), ((1, 5), 3, [0]), ((0, 6), 5, [])])
def test_interrupted_evaluation_resumes_to_the_same_result(tmp_path, stop_at, saved_epoch, resumed_rounds):
    reference, reference_losses = run_rounds()
    state = EvaluationState(tmp_path, KEY, every=2)
    with pytest.raises(Interrupt):
        run_rounds(state, stop_at=stop_at)
    saved = torch.load(state.round_file(stop_at[0]), weights_only=True)
    assert saved["epoch"] == saved_epoch and saved["lr"] == pytest.approx(0.001 if saved_epoch > 4 else 0.01)
    result, losses = run_rounds(EvaluationState(tmp_path, KEY, every=2))
    assert result["accuracies"] == reference["accuracies"] and result["resumed_rounds"] == resumed_rounds
    first_pass = {(stop_at[0], e) for e in range(saved_epoch + 1)} | {(0, e) for e in range(7) if resumed_rounds}
    assert set(losses) == set(reference_losses) - first_pass  # only what was not saved is redone
    assert losses == {k: reference_losses[k] for k in losses}  # with the same batches and augmentations
    assert not state.round_file(0).exists() and not state.round_file(1).exists()  # finished rounds drop them


@pytest.mark.parametrize("other, differs", [(JobKey.of({"epochs": 7}, "stripes"), "settings"),
                                           (JobKey.of({"epochs": 6}, "resampled"), "data")])
def test_state_of_other_settings_or_data_is_not_resumed(tmp_path, caplog, other, differs):
    with pytest.raises(Interrupt):
        run_rounds(EvaluationState(tmp_path, KEY, every=2), stop_at=(1, 4))
    state = EvaluationState(tmp_path, other, every=2)
    assert state.finished_rounds() == {} and state.load_epoch(1) is None
    assert f"made with other {differs} than this job's: not resumed" in caplog.text
    reference, _ = run_rounds()
    result, _ = run_rounds(state)  # afresh, overwriting the other job's state as it goes
    assert result["accuracies"] == reference["accuracies"] and result["resumed_rounds"] == []
    assert EvaluationState(tmp_path, KEY).finished_rounds() == {}  # the other job's rounds are gone


def test_state_of_the_same_job_is_resumed_and_a_corrupt_file_starts_afresh(tmp_path, caplog):
    with pytest.raises(Interrupt):
        run_rounds(EvaluationState(tmp_path, KEY, every=2), stop_at=(1, 4))
    same = EvaluationState(tmp_path, JobKey.of({"epochs": 6}, "stripes"), every=2)
    assert 0 in same.finished_rounds() and same.load_epoch(1)["epoch"] == 3
    state = EvaluationState(tmp_path, KEY, every=2)
    state.round_file(1).write_bytes(b"not a checkpoint")
    assert state.load_epoch(1) is None and 0 in state.finished_rounds()
    reference, _ = run_rounds()
    assert run_rounds(state)[0]["accuracies"] == reference["accuracies"]
    state.rounds_file.write_text("{ truncated")
    assert state.finished_rounds() == {} and "starting afresh" in caplog.text


def test_data_fingerprint_sees_a_changed_image():
    x, y = as_float(labeled(4, 0, "train"))
    changed = x.clone()
    changed[5, 0, 3, 3] += 0.5
    assert resume.data_fingerprint(x, y) == resume.data_fingerprint(x.clone(), y.clone())
    assert resume.data_fingerprint(x, y) != resume.data_fingerprint(changed, y)


# --- the evaluate stage ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    return load_script("evaluate")


@pytest.fixture
def files(tmp_path):
    real, test, pool = labeled(6, 0, "train"), labeled(4, 1, "test"), labeled(5, 2, "pool")
    for name, data in [("real", real), ("test", test), ("pool", pool)]:
        save_images(data, tmp_path / f"{name}.pt")
    mean, std = channel_stats(real.images)
    package = normalize(pool.images[pool.labels.argsort(stable=True)].view(3, 5, 1, 8, 8)[:, :2].reshape(6, 1, 8, 8),
                        mean, std)  # ipc 2, class-major
    torch.save(package, tmp_path / "package.pt")
    return tmp_path


def run(script, files, *args):
    common = ["--test", str(files / "test.pt"), "--dataset", "stripes", "--real-train", str(files / "real.pt"),
              "--epochs", "1", "--rounds", "2", "--batch-size", "256", "--device", "cpu", "--seed", "0",
              "--out", str(files / "out.json"),
              "--log", str(files / "log.txt")]
    return run_main(script.main, [*args, *common])


@pytest.mark.parametrize("case,args,size", [
    ("package", ["--train", "package.pt", "--train-format", "package", "--ipc", "2"], 6),
    ("pool", ["--train", "pool.pt", "--train-format", "images"], 15),
    ("random", ["--train", "real.pt", "--train-format", "images", "--random-ipc", "3"], 9),
    ("full real", ["--train", "real.pt", "--train-format", "images"], 18),
])
def test_script_end_to_end(script, files, case, args, size):
    args = [str(files / a) if a.endswith(".pt") else a for a in args]
    assert run(script, files, *args) == 0
    doc = json.loads((files / "out.json").read_text())
    assert EvaluationResult.read(files / "out.json").to_json() == doc and doc["budget_prefix"] is None
    assert doc["train_size"] == size and doc["rounds"] == 2 and doc["epochs"] == 1
    assert len(doc["accuracies"]) == 2 and all(0 <= a <= 1 for a in doc["accuracies"])
    assert doc["mean"] == pytest.approx(np.mean(doc["accuracies"]))
    assert doc["settings"]["dataset"] == "stripes" and len(doc["timings_s"]["per_round"]) == 2
    assert "test accuracy" in (files / "log.txt").read_text()


def test_evaluation_record_round_trips_and_refuses_a_bad_field_naming_file_and_field(tmp_path):
    result = EvaluationResult(settings={"epochs": 3}, mean=0.5, std=0.1, accuracies=[0.4, 0.6], epochs=3, rounds=2,
                              train_size=30, budget_prefix=BudgetPrefix(fraction=0.25, seconds=2.5, images=30),
                              environment=ENV)
    result.write(tmp_path / "budget_0.25.json")
    assert EvaluationResult.read(tmp_path / "budget_0.25.json") == result
    doc = result.to_json()
    assert (doc["format"], doc["version"], doc["mean"], doc["budget_prefix"]["images"]) == (
        "diffdistill-evaluation", 1, 0.5, 30)
    empty = EvaluationResult(settings={}, mean=None, std=None, accuracies=[], epochs=3, rounds=2, train_size=0,
                             environment=ENV)
    assert EvaluationResult.from_json(empty.to_json(), "empty.json") == empty  # null accuracy: nothing to train on
    bad = {"mean": (("mean", "0.5"), "field 'mean' is str '0.5', expected a number or null"),
           "item": (("accuracies", [0.4, None]), r"field 'accuracies\[1\]' is NoneType None, expected a number"),
           "prefix": (("budget_prefix", {"fraction": 0.25, "seconds": 2.5}),
                      "field 'budget_prefix.images' missing .expected an integer"),
           "version": (("version", 2), "field 'version' is 2, expected 1")}
    for (key, value), expected in bad.values():
        (tmp_path / "bad.json").write_text(json.dumps({**doc, key: value}))
        with pytest.raises(DiffdistillError, match=f"bad.json: {expected}"):
            EvaluationResult.read(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "rounds"}))
    with pytest.raises(DiffdistillError, match="bad.json: field 'rounds' missing .expected an integer"):
        EvaluationResult.read(tmp_path / "bad.json")


@pytest.mark.parametrize("args", [
    ["--train", "package.pt", "--train-format", "package", "--ipc", "3"],  # 6 rows != 3 x 3
    ["--train", "package.pt", "--train-format", "package"],  # no --ipc
    ["--train", "missing.pt", "--train-format", "images"],
    ["--train", "real.pt", "--train-format", "images", "--random-ipc", "7"],  # only 6 per class
    ["--train", "test.pt", "--train-format", "package", "--ipc", "4"],  # a dict, not a bare tensor
])
def test_script_bad_input_exits_2_without_output(script, files, args):
    args = [str(files / a) if a.endswith(".pt") else a for a in args]
    assert run(script, files, *args) == 2
    assert not (files / "out.json").exists()


def test_script_budget_prefix_trains_only_on_images_made_within_its_time(script, files):
    from diffdistill.diffusion.sampling_summary import BatchTime, SamplingSummary, ShardRun

    batches = [BatchTime(6, 1.0, 1.0), BatchTime(6, 1.0, 2.0), BatchTime(3, 0.5, 2.5)]
    SamplingSummary(sampling_job(4.0), ["0", "1", "2"], [ShardRun(
        shard=0, seed=0, counts=[5, 5, 5], sampling_s=2.5, load_s=0.0, device_name="cpu", batches=batches,
    )], environment=ENV).write(files / "pool.json")
    prefix = ["--train", str(files / "pool.pt"), "--train-format", "images", "--pool-meta", str(files / "pool.json")]
    assert run(script, files, *prefix, "--budget-fraction", "0.5") == 0
    result = EvaluationResult.read(files / "out.json")
    assert result.budget_prefix == BudgetPrefix(fraction=0.5, seconds=2.0, images=12) and result.train_size == 12
    assert run(script, files, *prefix, "--budget-fraction", "0.2") == 0  # 0.8 s: no batch had finished
    result = EvaluationResult.read(files / "out.json")
    assert result.budget_prefix.images == 0 and result.mean is None and result.accuracies == []
    (files / "out.json").unlink()
    assert run(script, files, *prefix[:-2], "--pool-meta", str(files / "missing.json"),
               "--budget-fraction", "0.5") == 2 and not (files / "out.json").exists()
    assert run(script, files, *prefix[:-2], "--budget-fraction", "0.5") == 2 and not (files / "out.json").exists()
    assert "--budget-fraction needs --pool-meta" in (files / "log.txt").read_text()


def test_script_needs_real_train_for_other_data_sets(script, files):
    argv = ["--train", str(files / "pool.pt"), "--train-format", "images", "--test", str(files / "test.pt"),
            "--dataset", "stripes", "--epochs", "0", "--rounds", "1", "--batch-size", "256", "--device", "cpu",
            "--out", str(files / "o.json")]
    assert run_main(script.main, argv) == 2 and not (files / "o.json").exists()


def test_script_resumes_after_a_kill_and_removes_its_state(script, files, monkeypatch):
    args = ["--train", str(files / "pool.pt"), "--train-format", "images", "--resume-dir", str(files / "resume")]
    assert run(script, files, *args) == 0
    reference = json.loads((files / "out.json").read_text())["accuracies"]
    assert not (files / "resume").exists()  # removed with the result written
    (files / "out.json").unlink()
    real_evaluate, calls = protocol.evaluate_accuracy, []

    def killed_in_round_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(protocol, "evaluate_accuracy", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(script, files, *args)
    assert (files / "resume" / "rounds.json").exists() and not (files / "out.json").exists()
    monkeypatch.setattr(protocol, "evaluate_accuracy", real_evaluate)
    assert run(script, files, *args) == 0
    doc = json.loads((files / "out.json").read_text())
    assert doc["accuracies"] == reference and doc["resumed_rounds"] == [0]
    assert "finished by an earlier run" in (files / "log.txt").read_text()
