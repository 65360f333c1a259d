"""DDP: two gloo processes under torchrun with global batch B equal one process with batch B.

Every rank draws the same global batch from (seed, step) and keeps its slice; DDP averages the
gradients. Only the order of the fp32 gradient reduction differs from the single-process run, so the
weights agree to rounding: tolerance 1e-5; measured max |diff| 1.0e-6 (model) and 8.7e-7 (EMA)
after 20 steps with 2 processes x 2 accumulation micro-batches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill import cli
from diffdistill.data import LabeledImages, save_images
from diffdistill.diffusion import checkpoint, training, uvit

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "train.py"
TOLERANCE = 1e-5
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_data() -> LabeledImages:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 4
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    return LabeledImages(images, labels, ["a", "b", "c", "d"], name="toy")


def test_distributed_context_without_torchrun(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with training.distributed_context("cpu") as ctx:
        assert (ctx.world_size, ctx.rank, ctx.is_main) == (1, 0, True)
        assert not torch.distributed.is_initialized()


def test_two_gloo_processes_equal_one_process(tmp_path):
    data_file = tmp_path / "data.pt"
    save_images(toy_data(), data_file)
    flags = ["--data", str(data_file), "--preset", "uvit_tiny_test", "--total-steps", str(STEPS),
             "--checkpoint-steps", "10", "--checkpoint-dir", str(tmp_path / "ddp"), "--batch-size", "8",
             "--grad-accum", "2", "--lr", "2e-3", "--betas", "0.99,0.999", "--weight-decay", "0.03",
             "--warmup-steps", "3", "--ema-rate", "0.9",
             "--label-dropout", "0.2", "--hflip", "--seed", "11", "--log-every", "10", "--device", "cpu",
             "--sidecar", str(tmp_path / "ddp.json"), "--log", str(tmp_path / "ddp.log")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # "--" ends torchrun's own options: otherwise its argparse takes --log as an ambiguous abbreviation.
    done = subprocess.run([*launcher, "--", str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    # One process, global batch 8 without accumulation, from the init the script builds (seed, then build).
    cli.seed_everything(11)
    model = uvit.build("uvit_tiny_test", num_classes=4)
    config = training.TrainConfig(total_steps=STEPS, checkpoint_steps=[10], batch_size=8, lr=2e-3, warmup_steps=3,
                                  ema_rate=0.9, label_dropout=0.2, hflip=True, seed=11, log_every=10)
    paths = training.train(model, toy_data(), config, training.checkpoint_paths_in(tmp_path / "one", [10, STEPS]),
                           device="cpu")["checkpoints"]
    for step in (10, STEPS):
        one = checkpoint.load_checkpoint(paths[step])
        two = checkpoint.load_checkpoint(tmp_path / "ddp" / f"step_{step:07d}.pt")
        for weights in ("model", "ema"):
            diff = max((one[weights][k] - two[weights][k]).abs().max().item() for k in one[weights])
            assert diff <= TOLERANCE, f"step {step} {weights}: max |diff| {diff:.3g}"
        assert two["extra"]["world_size"] == 2
    sidecar = json.loads((tmp_path / "ddp.json").read_text())
    assert sidecar["world_size"] == 2 and sidecar["final_step"] == STEPS
    assert sidecar["final_loss"] == pytest.approx(one["extra"]["loss"], abs=1e-5)
    log_text = (tmp_path / "ddp.log").read_text()
    assert log_text.count(f"step {STEPS}/{STEPS}") == 1  # only rank 0 writes the log file
