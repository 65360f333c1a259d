"""Sampler precision "auto": bf16 on a CUDA GPU that supports it, fp32 elsewhere, and the sidecars record
which was used (docs/reference.md, "Precision")."""

from __future__ import annotations

import pytest
import torch
import yaml

from diffdistill.cli import run_main
from diffdistill.diffusion import checkpoint, sampler_settings, uvit
from diffdistill.diffusion.sampler_settings import SamplerSettings, precision_on
from diffdistill.diffusion.sampling import generate
from diffdistill.diffusion.sampling_summary import SamplingSummary
from diffdistill.errors import DiffdistillError
from helpers import REPO, load_script

FAST = dict(steps=2, order=2, method="multistep", algorithm="dpmsolver++", t_end=1e-3)


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_a_cuda_device_that_supports_it(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert precision_on("auto", torch.device("cuda")) == expected
    assert precision_on("auto", "cuda:1") == expected


def test_auto_is_fp32_on_a_cpu_and_explicit_precisions_stay(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # never asked for a CPU
    assert precision_on("auto", "cpu") == "fp32"
    for explicit in ("fp32", "tf32", "bf16"):
        assert precision_on(explicit, "cpu") == explicit
        assert precision_on(explicit, "cuda") == explicit
    resolved = SamplerSettings(**FAST, precision="auto").on_device("cpu")
    assert resolved.precision == "fp32" and resolved.steps == 2 and resolved.autocast_dtype is None


def test_unresolved_auto_has_no_dtype_and_unknown_precisions_name_the_choices():
    with pytest.raises(DiffdistillError, match="on_device"):
        SamplerSettings(precision="auto").autocast_dtype
    with pytest.raises(DiffdistillError, match=r"precision must be one of \['auto', 'fp32', 'tf32', 'bf16'\]"):
        SamplerSettings(precision="fp16")


def test_auto_on_a_cpu_samples_exactly_like_fp32():
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=3).eval()
    labels = torch.tensor([0, 1, 2, 1])
    fp32 = generate(model, labels, SamplerSettings(**FAST, precision="fp32"), device="cpu", seed=4)
    auto = generate(model, labels, SamplerSettings(**FAST, precision="auto"), device="cpu", seed=4)
    assert torch.equal(auto, fp32)


def test_schema_offers_auto_and_the_paper_configs_use_it():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert schema["$defs"]["sampler"]["properties"]["precision"]["enum"] == list(sampler_settings.PRECISION_CHOICES)
    for name in ("cifar100", "tinyimagenet"):
        config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
        assert config["sampler"]["precision"] == "auto", name


def test_sampling_sidecar_records_the_precision_asked_for_and_the_one_used(tmp_path):
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=3)
    ckpt = tmp_path / "model.pt"
    checkpoint.save_checkpoint(ckpt, model=model, step=1, ema=model,
                               config={"data": {"name": "toy", "classes": ["a", "b", "c"]}})
    meta = tmp_path / "pool.json"
    argv = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "pool.pt"), "--meta", str(meta), "--budget-s", "60",
            "--batch-size", "3", "--max-images", "3", "--device", "cpu", "--precision", "auto",
            *[f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]]
    assert run_main(load_script("sample_budget").main, argv) == 0
    settings = SamplingSummary.read(meta).settings
    assert (settings.sampler.precision, settings.precision_used) == ("auto", "fp32")
