"""Speed options (diffdistill.speed, sampler compile / tf32, fine-tuning compile / fused AdamW / tf32,
the evaluator's loop without host synchronisation): each gives the plain path's result, on the CPU.

Tolerances: a compiled network may round differently from the eager one (different kernels and
operation order), so images compiled vs eager may differ by 1 of 255 levels; a padded call equals
an unpadded one to 1e-5 in the network's output.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill import speed
from diffdistill.data import LabeledImages
from diffdistill.diffusion import training, uvit
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling import generate, sample_budgeted
from diffdistill.evaluation import dsa, protocol
from diffdistill.evaluation.convnet import ConvNet
from helpers import load_script, needs_cpu_compiler

FAST = dict(steps=3, order=2, method="multistep", algorithm="dpmsolver++", t_end=1e-3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return uvit.build("uvit_tiny_test", num_classes=3, null_class=True).eval()


@pytest.fixture
def compile_is_identity(monkeypatch):
    """torch.compile returning the module itself: FixedBatchNetwork's padding without compile time."""
    monkeypatch.setattr(speed.torch, "compile", lambda model, **kwargs: model)


def clock():
    return 0.0  # budget_s = inf: the clock never matters


def budgeted(model, settings, **kwargs):
    args = dict(budget_s=math.inf, batch_size=3, device="cpu", seed=0, clock=clock, max_images=7)
    return sample_budgeted(model, 3, settings, **{**args, **kwargs})


# ----------------------------------------------------------------------------- sampling


def test_padded_last_batch_gives_the_images_of_an_unpadded_run(tiny, compile_is_identity):
    sizes = []
    hook = tiny.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        settings = SamplerSettings(**FAST, guidance_scale=2.0)
        plain = budgeted(tiny, settings)
        sizes.clear()
        fixed = budgeted(tiny, SamplerSettings(**FAST, guidance_scale=2.0, compile="default"))
    finally:
        hook.remove()
    assert [b.size for b in fixed.batches] == [3, 3, 1]  # the last batch has one image ...
    assert set(sizes) == {6}  # ... but the network always ran at the first call's 2B = 6 rows
    assert torch.equal(fixed.labels, plain.labels)
    assert (fixed.images.int() - plain.images.int()).abs().max() <= 1
    assert fixed.compile_s is not None and fixed.compile_s >= 0
    assert fixed.shard_run(shard=0, seed=0, load_s=0.0, device_name="cpu").compile_s == fixed.compile_s


def test_fixed_batch_network_splits_larger_calls_and_pads_smaller_ones(tiny, compile_is_identity):
    net = speed.FixedBatchNetwork(tiny, "default")
    x, t, y = torch.randn(7, 3, 8, 8), torch.rand(7) * 999, torch.tensor([0, 1, 2, 3, 0, 1, 2])
    with torch.inference_mode():
        expected = tiny(x, t, y)
        first = net(x[:4], t[:4], y[:4])  # sets the fixed size 4
        split = net(x, t, y)  # 4 + 3 padded to 4
        small = net(x[:1], t[:1], y[:1])
    assert net.batch == 4 and net.config == tiny.config and net.null_label == tiny.null_label
    torch.testing.assert_close(first, expected[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(split, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(small, expected[:1], atol=1e-5, rtol=0)


class OOMAbove(torch.nn.Module):
    """A U-ViT that raises CUDA's out-of-memory error for batches above ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit = inner, limit
        self.config, self.null_label, self.num_classes = inner.config, inner.null_label, inner.num_classes

    def forward(self, x, t, y=None):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x, t, y)


def test_out_of_memory_halving_resets_the_fixed_shape(tiny, compile_is_identity):
    plain = budgeted(OOMAbove(tiny, 2), SamplerSettings(**FAST), batch_size=8, max_images=10)
    fixed = budgeted(OOMAbove(tiny, 2), SamplerSettings(**FAST, compile="default"), batch_size=8, max_images=10)
    assert fixed.batch_size_final == plain.batch_size_final == 2
    assert [b.size for b in fixed.batches] == [b.size for b in plain.batches]
    assert (fixed.images.int() - plain.images.int()).abs().max() <= 1


@needs_cpu_compiler
def test_compiled_sampler_matches_eager_within_one_level(tiny):
    torch._dynamo.reset()
    labels = torch.tensor([0, 1, 2, 0, 1])
    net = speed.sampling_network(tiny, "default")
    settings = SamplerSettings(**FAST, guidance_scale=2.0)
    eager = generate(tiny, labels, settings, device="cpu", seed=3)
    compiled = generate(net, labels, settings, device="cpu", seed=3)
    assert (compiled.int() - eager.int()).abs().max() <= 1 and (compiled == eager).float().mean() > 0.99
    assert net.compile_s > 0
    last = generate(net, labels[:2], settings, device="cpu", seed=4)  # padded to the compiled 2 x 5 rows
    assert (last.int() - generate(tiny, labels[:2], settings, device="cpu", seed=4).int()).abs().max() <= 1


def test_tf32_is_set_only_inside_the_block_and_only_for_cuda():
    before = torch.get_float32_matmul_precision()
    with speed.tf32(True, "cpu"):
        assert torch.get_float32_matmul_precision() == before  # the CPU is left alone
    with speed.tf32(True, "cuda"):  # only flags: no GPU needed to set them
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_tf32_precision_on_cpu_samples_like_fp32(tiny):
    labels = torch.tensor([0, 1, 2])
    fp32 = generate(tiny, labels, SamplerSettings(**FAST), device="cpu", seed=1)
    assert torch.equal(generate(tiny, labels, SamplerSettings(**FAST, precision="tf32"), device="cpu", seed=1), fp32)


def test_bad_compile_mode_is_refused():
    with pytest.raises(Exception, match="compile must be one of"):
        SamplerSettings(compile="fast")


# ----------------------------------------------------------------------------- fine-tuning


def trained(config_kwargs, steps=3):
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=3, null_class=True)
    data = LabeledImages(torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8), torch.arange(12) % 3,
                         ["a", "b", "c"], "toy", "train")
    config = training.TrainConfig(total_steps=steps, batch_size=4, warmup_steps=0, lr=1e-3, **config_kwargs)
    trainer = training.Trainer(model, data, config, torch.device("cpu"))
    losses = [float(trainer.step(step)) for step in range(1, steps + 1)]
    return trainer, losses


def test_fused_adamw_and_tf32_train_like_the_plain_optimizer():
    plain, plain_losses = trained({})
    fused, fused_losses = trained({"fused_adamw": True, "tf32": True})
    assert fused.optimizer.defaults["fused"] is True
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, b in zip(fused.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compiled_fine_tuning_trains_like_eager(monkeypatch):
    # Dynamo and AOT autograd (forward and backward graphs) without inductor's C++ code generation,
    # which takes ~40 s on this CPU; the inductor build is timed by benchmarks/finetune_throughput.py.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    plain, plain_losses = trained({}, steps=2)
    compiled, compiled_losses = trained({"compile": True}, steps=2)
    assert compiled.net is not compiled.model  # the compiled wrapper runs the steps
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-4)
    for a, b in zip(compiled.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(compiled.ema.parameters(), plain.ema.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_train_script_speed_flags_default_off():
    base = ["--data", "d", "--preset", "uvit_tiny_test", "--total-steps", "2", "--checkpoint-dir", "c",
            "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3", "--betas", "0.9,0.99", "--weight-decay", "0",
            "--warmup-steps", "0", "--ema-rate", "0.9", "--label-dropout", "0", "--no-hflip"]
    train = load_script("train")
    off = vars(train.parse_args(base))
    on = vars(train.parse_args([*base, "--compile", "--fused-adamw", "--tf32"]))
    speed_flags = ("compile", "fused_adamw", "tf32")
    assert [off[k] for k in speed_flags] == [False] * 3 and [on[k] for k in speed_flags] == [True] * 3


# ----------------------------------------------------------------------------- evaluation


def batch_by_batch_epoch(model, optimizer, x, y, batch_size, generator):
    """The evaluator's epoch as it was: draws made batch by batch (each moved to the device at once)."""
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        index = order[start:start + batch_size]
        images = dsa.augment(x[index], generator, dsa.DSAParams())
        loss = torch.nn.functional.cross_entropy(model(images), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_evaluator_epoch_without_host_sync_makes_the_same_steps():
    x, y = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 4
    models = []
    for epoch_fn in ("new", "old"):
        torch.manual_seed(0)
        model = ConvNet(3, 4, 16, 3, (8, 8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):  # batches of 16, 16 and 8: DSA families and parameters drawn per batch
            if epoch_fn == "new":
                protocol._train_epoch(model, optimizer, x, y, 16, True, dsa.DSAParams(), generator)
            else:
                batch_by_batch_epoch(model, optimizer, x, y, 16, generator)
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
