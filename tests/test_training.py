"""Trainer: warmup, EMA, checkpoints, exact resume (in process and after a real SIGKILL), accumulation.

Expected values come from docs/reference.md, "U-ViT" (AdamW, linear warmup then constant, EMA
``ema = rate * ema + (1 - rate) * param``) and the resume contract: a resumed run ends with the same weights
as an uninterrupted one (1e-6). Tiny U-ViT (uvit_tiny_test) on 40 random 3x8x8 images, 4 classes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffdistill import cli
from diffdistill.data import LabeledImages, save_images, to_model_range
from diffdistill.diffusion import checkpoint, training, uvit
from diffdistill.diffusion.schedule import VPSchedule
from diffdistill.errors import DiffdistillError
from diffdistill.records import TrainingRun
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "workflow" / "scripts" / "train.py"


def toy_data(learnable: bool = False) -> LabeledImages:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    if learnable:  # one fixed image per class: the noise is easy to predict
        images = images[:4][labels]
    return LabeledImages(images, labels, ["a", "b", "c", "d"], name="toy")


def tiny_model(num_classes: int = 4, seed: int = 0) -> uvit.UViT:
    torch.manual_seed(seed)
    return uvit.build("uvit_tiny_test", num_classes=num_classes)


def make_config(**overrides) -> training.TrainConfig:
    settings = dict(total_steps=12, checkpoint_steps=[4, 8], batch_size=8, lr=1e-3, warmup_steps=3, ema_rate=0.9,
                    label_dropout=0.1, hflip=True, seed=3, log_every=4)
    return training.TrainConfig(**{**settings, **overrides})


def run(folder: Path, config, model=None, data=None, **kwargs):
    paths = training.checkpoint_paths_in(folder, config.checkpoint_steps)
    model = tiny_model() if model is None else model
    summary = training.train(model, data or toy_data(), config, paths, device="cpu", **kwargs)
    return summary, paths


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_config_normalises_and_validates():
    config = make_config(checkpoint_steps=[8, 4, 4], betas=[0.9, 0.99])
    assert config.checkpoint_steps == [4, 8, 12]  # total_steps always included
    assert config.to_dict()["betas"] == [0.9, 0.99]
    with pytest.raises(DiffdistillError, match="ema_rate"):
        make_config(ema_rate=1.5)
    with pytest.raises(DiffdistillError, match="checkpoint_steps"):
        make_config(checkpoint_steps=[20])


def test_linear_warmup_then_constant():
    config = make_config(lr=2e-4, warmup_steps=4)
    assert [training.lr_at(k, config) for k in range(1, 7)] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4])
    assert training.lr_at(1, make_config(warmup_steps=0)) == pytest.approx(1e-3)


def test_first_step_uses_warmup_lr(tmp_path):
    # AdamW's first update is lr * g / (|g| + eps), i.e. lr per element where the gradient is not tiny.
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = make_config(total_steps=1, checkpoint_steps=[], lr=1e-2, warmup_steps=4, weight_decay=0.0)
    _, paths = run(tmp_path, config, model)
    ckpt = checkpoint.load_checkpoint(paths[1])
    steps = torch.cat([(ckpt["model"][k] - before[k]).abs().flatten() for k in before])
    assert steps.median().item() == pytest.approx(1e-2 / 4, rel=0.02)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2 / 4)


def test_draws_depend_only_on_seed_and_step():
    config = make_config(batch_size=8)
    sampler = training.BatchSampler(config, 40, (3, 8, 8), torch.device("cpu"))
    epoch = torch.cat([sampler.draw(k).index for k in range(1, 6)])  # 5 steps x 8 = one pass over 40
    assert sorted(epoch.tolist()) == list(range(40))
    fresh = training.BatchSampler(config, 40, (3, 8, 8), torch.device("cpu")).draw(4)
    again = sampler.draw(4)
    for name in ("index", "flip", "t", "noise", "drop"):
        assert torch.equal(getattr(fresh, name), getattr(again, name)), name
    assert not torch.equal(sampler.draw(5).noise, again.noise)
    assert not training.BatchSampler(make_config(hflip=False), 40, (3, 8, 8), torch.device("cpu")).draw(1).flip.any()


def test_update_ema_formula():
    ema, model = tiny_model(seed=1), tiny_model(seed=2)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    training.update_ema(ema, model, 0.75)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.75 * start[k] + 0.25 * model.state_dict()[k], rtol=1e-6, atol=1e-7)
    training.update_ema(ema, model, 0.0)
    assert max_diff(ema.state_dict(), model.state_dict()) == 0.0


def test_ema_after_one_training_step(tmp_path):
    model = tiny_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _, paths = run(tmp_path, make_config(total_steps=1, checkpoint_steps=[], ema_rate=0.5), model)
    ckpt = checkpoint.load_checkpoint(paths[1])
    expected = {k: 0.5 * init[k] + 0.5 * ckpt["model"][k] for k in init}
    assert max_diff(ckpt["ema"], expected) < 1e-7
    assert max_diff(ckpt["model"], init) > 1e-4  # the step did change the weights
    assert all(v.dtype == torch.float32 for v in ckpt["ema"].values())


def test_loss_decreases_on_learnable_set(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="diffdistill.diffusion.training")
    config = make_config(total_steps=60, checkpoint_steps=[], batch_size=16, lr=2e-3, warmup_steps=5, log_every=10)
    summary, _ = run(tmp_path, config, data=toy_data(learnable=True))
    losses = [entry["loss"] for entry in summary["loss_history"]]
    assert [entry["step"] for entry in summary["loss_history"]] == [10, 20, 30, 40, 50, 60]
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary["final_loss"] == losses[-1] and summary["images_per_s"] > 0
    assert re.search(r"step 60/60 +loss [0-9.]+ +[0-9.]+ img/s +lr 2\.00e-03 +ETA 0:00:00", caplog.text), caplog.text


def test_checkpoints_at_each_step_with_config(tmp_path):
    config = make_config()
    summary, paths = run(tmp_path, config)
    assert summary["steps_run"] == 12 and summary["world_size"] == 1
    for step, path in paths.items():
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["step"] == step and path.name == f"step_{step:07d}.pt"
        assert ckpt["config"]["training"] == config.to_dict()
        assert ckpt["config"]["model"] == tiny_model().config
        assert ckpt["config"]["data"] == {"name": "toy", "classes": ["a", "b", "c", "d"], "num_images": 40}
        assert ckpt["optimizer"]["state"][0]["step"].item() == step


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    config = make_config()
    run(tmp_path / "full", config)
    original = training.Trainer.step

    def dies_at_step_7(self, step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(training.Trainer, "step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", config)
    monkeypatch.undo()
    assert (tmp_path / "cut" / "step_0000004.pt").is_file() and not (tmp_path / "cut" / "step_0000008.pt").exists()
    # The same job again (same initial weights), whose state must replace the model's: a model that only
    # trained on from its initial weights at step 4 would end elsewhere.
    summary, paths = run(tmp_path / "cut", config, model=tiny_model())
    assert summary["start_step"] == 4 and summary["steps_run"] == 8
    full = checkpoint.load_checkpoint(tmp_path / "full" / "step_0000012.pt")
    resumed = checkpoint.load_checkpoint(paths[12])
    assert max_diff(full["ema"], resumed["ema"]) <= 1e-6
    assert max_diff(full["model"], resumed["model"]) <= 1e-6
    assert resumed["optimizer"]["state"][0]["step"] == full["optimizer"]["state"][0]["step"] == 12


def test_rerun_when_complete_is_a_noop(tmp_path):
    config = make_config()
    first, paths = run(tmp_path, config)
    mtimes = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    model = tiny_model()  # the same job: the same initial weights
    again, _ = run(tmp_path, config, model=model)
    assert max_diff(model.state_dict(), checkpoint.load_checkpoint(paths[12])["model"]) == 0.0
    assert again["steps_run"] == 0 and again["start_step"] == 12
    assert again["final_loss"] == pytest.approx(first["final_loss"])
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == mtimes


def test_unreadable_newest_checkpoint_is_skipped(tmp_path):
    config = make_config()
    _, paths = run(tmp_path, config)
    paths[12].unlink()
    paths[8].write_bytes(b"truncated")
    summary, _ = run(tmp_path, config)
    assert summary["start_step"] == 4 and summary["resumed_from"] == str(paths[4])


def test_resume_needs_the_same_settings_and_data(tmp_path, caplog):
    run(tmp_path / "kept", make_config(total_steps=4, checkpoint_steps=[]))
    changed_image = toy_data()
    changed_image.images[7, 0, 0, 0] ^= 1
    torch.manual_seed(0)
    wider = uvit.build("uvit_tiny_test", num_classes=4, embed_dim=16)
    others = [("settings", dict(config=make_config(lr=2e-3))),
              ("settings and data", dict(config=make_config(), model=wider)),  # config and weights
              ("data", dict(config=make_config(), data=changed_image)),
              ("data", dict(config=make_config(), model=tiny_model(seed=42)))]  # other initial weights
    for i, (differs, job) in enumerate(others):
        folder = shutil.copytree(tmp_path / "kept", tmp_path / f"other_{i}")
        caplog.clear()
        summary, _ = run(folder, **job)
        assert summary["start_step"] == 0 and summary["resumed_from"] is None  # afresh, never mixed
        assert f"step_0000004.pt was made with other {differs} than this job's: not resumed" in caplog.text
    summary, _ = run(tmp_path / "kept", make_config(log_every=2, grad_accum=2))  # free settings may change
    assert summary["start_step"] == 4


def test_a_changed_run_killed_half_way_resumes_only_its_own_checkpoints(tmp_path):
    config = make_config()
    run(tmp_path, make_config(lr=2e-3))  # another job's checkpoints at 4, 8 and 12
    _, paths = run(tmp_path / "ref", config)
    shutil.copy(paths[4], tmp_path / "step_0000004.pt")  # this job got to step 4, then died
    summary, _ = run(tmp_path, config)
    assert summary["start_step"] == 4
    for step in (8, 12):
        ours = checkpoint.load_checkpoint(tmp_path / f"step_{step:07d}.pt")
        assert max_diff(ours["ema"], checkpoint.load_checkpoint(paths[step])["ema"]) <= 1e-6


def test_batch_size_must_divide(tmp_path, monkeypatch):
    with pytest.raises(DiffdistillError, match="batch_size 10 .* grad_accum 3"):
        run(tmp_path, make_config(batch_size=10, grad_accum=3))
    monkeypatch.setattr(training, "_world", lambda: (4, 0))
    with pytest.raises(DiffdistillError, match="world_size 4"):
        run(tmp_path, make_config(batch_size=6))


def test_grad_accum_matches_full_batch(tmp_path):
    config = make_config(total_steps=6, checkpoint_steps=[])
    _, one = run(tmp_path / "one", config)
    _, four = run(tmp_path / "four", make_config(total_steps=6, checkpoint_steps=[], grad_accum=4))
    a, b = checkpoint.load_checkpoint(one[6]), checkpoint.load_checkpoint(four[6])
    assert max_diff(a["ema"], b["ema"]) < 1e-5


def test_unconditional_model_ignores_labels(tmp_path):
    summary, paths = run(tmp_path, make_config(total_steps=4, checkpoint_steps=[]), model=tiny_model(0))
    ckpt = checkpoint.load_checkpoint(paths[4])
    assert ckpt["config"]["model"]["num_classes"] == 0
    assert not any(k.startswith("label_emb") for k in ckpt["model"])
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


def one_step_loss_and_grads(config):
    """Step 1's loss and gradients of a fresh trainer (the tiny model, seed 0)."""
    trainer = training.Trainer(tiny_model(), toy_data(), config, torch.device("cpu"))
    draws = trainer.sampler.draw(1)
    loss = trainer.micro_loss(draws, slice(0, config.batch_size))
    loss.backward()
    return trainer, draws, loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def test_loss_and_gradients_are_those_of_the_noise_prediction_mse():
    # The plain noise-prediction MSE written out here.
    trainer, draws, loss, grads = one_step_loss_and_grads(make_config())
    model = tiny_model()
    x0 = to_model_range(trainer.images[draws.index])
    x0 = torch.where(draws.flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    y = torch.where(draws.drop, torch.full_like(draws.index, model.null_label), trainer.labels[draws.index])
    prediction = model(VPSchedule().add_noise(x0, draws.t, draws.noise), draws.t * 999.0, y)
    expected = torch.nn.functional.mse_loss(prediction.float(), draws.noise)
    expected.backward()
    assert torch.equal(loss, expected.detach())
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


def test_label_dropout_needs_null_class(tmp_path):
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=4, null_class=False)
    with pytest.raises(DiffdistillError, match="null class"):
        run(tmp_path, make_config(), model=model)
    with pytest.raises(DiffdistillError, match="num_classes 3"):
        run(tmp_path, make_config(), model=tiny_model(3))


def test_finetune_from_unconditional_pretrained(tmp_path):
    _, pre = run(tmp_path / "pre", make_config(total_steps=4, checkpoint_steps=[]), model=tiny_model(0))
    model = tiny_model(4, seed=5)
    report = checkpoint.load_pretrained(model, pre[4])
    # lr 1e-9: the weights stay the pretrained ones, so training started from them, not from a re-init
    summary, paths = run(tmp_path / "fine", make_config(total_steps=2, checkpoint_steps=[], lr=1e-9), model=model,
                         init_report=report)
    source, tuned = checkpoint.load_checkpoint(pre[4])["ema"], checkpoint.load_checkpoint(paths[2])["model"]
    shared = [k for k in source if k != "pos_embed"]
    assert max_diff({k: source[k] for k in shared}, {k: tuned[k] for k in shared}) < 1e-6
    assert (source["pos_embed"][:, 0] - tuned["pos_embed"][:, 1]).abs().max() < 1e-6  # time row moved down
    assert summary["init_report"]["pos_embed_remapped"] is True
    assert checkpoint.load_checkpoint(paths[2])["extra"]["init_report"]["loaded"] == report.loaded


def load_train_script():
    return load_script("train")


def run_script_in_process(flags) -> int:
    """The script's main() here, keeping pytest's logging handlers (cli.start replaces them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return load_train_script().main(flags)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


# Every flag train.py requires besides data, preset, steps and outputs: what the workflow always passes.
WORKFLOW_FLAGS = [("--batch-size", "8"), ("--grad-accum", "1"), ("--lr", "1e-3"), ("--betas", "0.99,0.999"),
            ("--weight-decay", "0.03"), ("--warmup-steps", "1"), ("--ema-rate", "0.9"), ("--label-dropout", "0.1"),
            ("--hflip",)]
TRAIN_FLAGS = [arg for flag in WORKFLOW_FLAGS for arg in flag]


def test_script_killed_then_rerun_matches_uninterrupted(tmp_path):
    data_file = tmp_path / "data.pt"
    save_images(toy_data(), data_file)
    config = make_config(total_steps=60, checkpoint_steps=[5], log_every=50)
    flags = ["--data", str(data_file), "--preset", "uvit_tiny_test", "--total-steps", "60", "--checkpoint-steps",
             "5", "--checkpoint-dir", str(tmp_path / "ckpt"), "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3",
             "--betas", "0.99,0.999", "--weight-decay", "0.03", "--warmup-steps", "3", "--ema-rate", "0.9",
             "--label-dropout", "0.1", "--hflip", "--seed", "3",
             "--log-every", "50", "--device", "cpu", "--sidecar", str(tmp_path / "train.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *flags], env=env, stderr=subprocess.DEVNULL)
    first, last = tmp_path / "ckpt" / "step_0000005.pt", tmp_path / "ckpt" / "step_0000060.pt"
    deadline = time.monotonic() + 50
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file() and not last.exists() and not (tmp_path / "train.json").exists()
    assert run_script_in_process(flags) == 0  # the rerun
    # The uninterrupted reference starts where the script starts: seed_everything(seed), then build.
    cli.seed_everything(3)
    _, paths = run(tmp_path / "ref", config, model=uvit.build("uvit_tiny_test", num_classes=4))
    ref, resumed = checkpoint.load_checkpoint(paths[60]), checkpoint.load_checkpoint(last)
    assert max_diff(ref["ema"], resumed["ema"]) <= 1e-6 and max_diff(ref["model"], resumed["model"]) <= 1e-6
    sidecar = TrainingRun.read(tmp_path / "train.json")
    assert sidecar.start_step == 5 and sidecar.final_step == 60 and sidecar.world_size == 1
    assert sidecar.settings.training == config.to_dict() and sidecar.checkpoints["60"] == str(last)
    assert [point.step for point in sidecar.loss_history][-1] == 60  # typed points, the resumed run's


def test_script_rejects_wrong_number_of_checkpoint_files(tmp_path):
    data_file = tmp_path / "data.pt"
    save_images(toy_data(), data_file)
    flags = ["--data", str(data_file), "--preset", "uvit_tiny_test", "--total-steps", "4", "--checkpoint-steps", "2",
             "--checkpoints", str(tmp_path / "only_one.pt"), "--device", "cpu", *TRAIN_FLAGS]
    assert cli.run_main(load_train_script().main, flags) == 2


def test_script_defaults_are_the_trainconfig_defaults():
    # By hand, a flag left out takes TrainConfig's default (the default run's fine-tuning); given, its value.
    flags = ["--data", "d.pt", "--preset", "uvit_tiny_test", "--total-steps", "4", "--checkpoint-dir", "c"]
    script = load_train_script()
    assert cli.dataclass_from_args(training.TrainConfig, script.parse_args(flags)) == training.TrainConfig(4)
    given = cli.dataclass_from_args(training.TrainConfig, script.parse_args([*flags, *TRAIN_FLAGS]))
    assert (given.batch_size, given.lr, given.betas, given.ema_rate, given.hflip) == (8, 1e-3, (0.99, 0.999), 0.9, True)


@pytest.mark.gpu
def test_bf16_training_on_cuda(tmp_path):
    config = make_config(total_steps=20, checkpoint_steps=[], bf16=True)
    summary = training.train(tiny_model(), toy_data(), config, training.checkpoint_paths_in(tmp_path, [20]),
                             device="cuda")
    ckpt = checkpoint.load_checkpoint(tmp_path / "step_0000020.pt")
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert all(v.dtype == torch.float32 for v in ckpt["ema"].values())  # autocast leaves weights in fp32
