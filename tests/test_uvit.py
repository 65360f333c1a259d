"""U-ViT structure and forward pass against docs/reference.md, "U-ViT" (official key names, shapes, counts)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffdistill.diffusion import uvit

# docs/reference.md, "U-ViT": (preset, overrides, tensor count, parameter count, depth, D, patch dim p*p*C)
PUBLIC_MODELS = {
    "cifar10_s2": ("uvit_small_2", dict(num_classes=0), 164, 44_255_328, 12, 512, 12),
    "imagenet64_m4": ("uvit_mid_4", dict(num_classes=1000, null_class=False), 213, 130_940_292, 16, 768, 48),
}
# docs/reference.md, "U-ViT": shapes of selected keys
EXPECTED_SHAPES = {
    "cifar10_s2": {
        "pos_embed": (1, 257, 512),
        "patch_embed.proj.weight": (512, 3, 2, 2),
        "in_blocks.0.attn.qkv.weight": (1536, 512),
        "out_blocks.0.skip_linear.weight": (512, 1024),
        "out_blocks.0.skip_linear.bias": (512,),
        "mid_block.mlp.fc1.weight": (2048, 512),
        "decoder_pred.weight": (12, 512),
        "final_layer.weight": (3, 3, 3, 3),
    },
    "imagenet64_m4": {
        "pos_embed": (1, 258, 768),
        "label_emb.weight": (1000, 768),
        "patch_embed.proj.weight": (768, 3, 4, 4),
        "in_blocks.0.attn.qkv.weight": (2304, 768),
        "out_blocks.7.skip_linear.weight": (768, 1536),
        "decoder_pred.weight": (48, 768),
        "final_layer.weight": (3, 3, 3, 3),
    },
}


def _block_keys(prefix: str, skip: bool) -> list[str]:
    keys = [f"{prefix}.skip_linear.weight", f"{prefix}.skip_linear.bias"] if skip else []
    keys += [f"{prefix}.norm1.weight", f"{prefix}.norm1.bias", f"{prefix}.attn.qkv.weight"]  # qkv: no bias
    keys += [f"{prefix}.attn.proj.{s}" for s in ("weight", "bias")]
    keys += [f"{prefix}.norm2.weight", f"{prefix}.norm2.bias"]
    keys += [f"{prefix}.mlp.{fc}.{s}" for fc in ("fc1", "fc2") for s in ("weight", "bias")]
    return keys


def _expected_keys(depth: int, conditional: bool) -> set[str]:
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"]
    for i in range(depth // 2):
        keys += _block_keys(f"in_blocks.{i}", skip=False) + _block_keys(f"out_blocks.{i}", skip=True)
    keys += _block_keys("mid_block", skip=False)
    keys += ["norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    keys += ["final_layer.weight", "final_layer.bias"] + (["label_emb.weight"] if conditional else [])
    assert len(keys) == len(set(keys))
    return set(keys)


def _meta_model(name: str) -> uvit.UViT:
    preset, overrides = PUBLIC_MODELS[name][:2]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return uvit.build(preset, **overrides)


@pytest.mark.parametrize("name", sorted(PUBLIC_MODELS))
def test_public_model_counts_keys_and_shapes(name):
    _, overrides, n_tensors, n_params, depth, _, _ = PUBLIC_MODELS[name]
    state = _meta_model(name).state_dict()
    assert len(state) == n_tensors
    assert sum(v.numel() for v in state.values()) == n_params
    assert set(state) == _expected_keys(depth, conditional=overrides["num_classes"] > 0)
    for key, shape in EXPECTED_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key


def test_null_class_adds_one_label_row():
    model = uvit.build("uvit_tiny_test", num_classes=5, null_class=True)
    assert model.label_emb.weight.shape == (6, 32)
    assert model.null_label == 5
    official = uvit.build("uvit_tiny_test", num_classes=5, null_class=False)
    assert official.label_emb.weight.shape == (5, 32)
    assert official.null_label is None


def test_block_details_match_official():
    block = uvit.build("uvit_tiny_test").in_blocks[0]
    assert block.mlp.act.approximate == "none"  # exact-erf GELU
    assert block.norm1.eps == 1e-5 and block.norm2.eps == 1e-5
    assert block.attn.qkv.bias is None


def _hand_sinusoid(t: float, dim: int) -> list[float]:
    half = dim // 2
    freqs = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
    return [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]  # cos first


@pytest.mark.parametrize("t", [999 * 0.5, 0.0, 123.456])
def test_timestep_embedding_by_hand(t):
    got = uvit.timestep_embedding(torch.tensor([t], dtype=torch.float64), 8)
    assert got.shape == (1, 8)
    assert torch.allclose(got[0].double(), torch.tensor(_hand_sinusoid(t, 8), dtype=torch.float64), atol=1e-5)


def test_unpatchify_channel_fastest():
    C, p, side = 3, 2, 2  # 4 tokens of 2x2x3
    tokens = torch.arange(side * side * p * p * C, dtype=torch.float32).reshape(1, side * side, p * p * C)
    image = uvit.unpatchify(tokens, C)
    assert image.shape == (1, C, side * p, side * p)
    for n in range(side * side):
        h, w = divmod(n, side)  # tokens row-major
        for p1 in range(p):
            for p2 in range(p):
                for c in range(C):
                    k = (p1 * p + p2) * C + c  # per-token layout (p1, p2, C), C fastest
                    assert image[0, c, h * p + p1, w * p + p2] == tokens[0, n, k]


def test_forward_shape_conditional_and_unconditional():
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.0, 500.0, 999.0])
    cond = uvit.build("uvit_tiny_test", num_classes=5).eval()
    assert cond(x, t, torch.tensor([0, 4, 5])).shape == (3, 3, 8, 8)  # 5 = null row
    uncond = uvit.build("uvit_tiny_test").eval()
    assert uncond(x, t).shape == (3, 3, 8, 8)


def test_token_order_label_time_patches_and_raw_time_input():
    model = uvit.build("uvit_tiny_test", num_classes=5).eval()
    seen = {}
    model.in_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0].detach()))
    t_in = 123.456  # the network takes 999*t as given: no rounding, no rescaling
    y = torch.tensor([3])
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8), torch.tensor([t_in]), y)
        pos = model.pos_embed[0]  # (2 + N, D)
        label = model.label_emb.weight[3] + pos[0]
        time = torch.tensor(_hand_sinusoid(t_in, 32)) + pos[1]
    tokens = seen["tokens"][0]  # (2 + N, D)
    assert tokens.shape == (2 + 16, 32)
    assert torch.allclose(tokens[0], label, atol=1e-6)
    assert torch.allclose(tokens[1], time, atol=1e-4)


def test_skips_are_last_in_first_out():
    model = uvit.build("uvit_tiny_test", depth=6).eval()  # 3 in-blocks, 3 out-blocks
    in_out, skip_in, mid = {}, {}, {}
    for i, block in enumerate(model.in_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: in_out.__setitem__(i, out.detach()))
    for i, block in enumerate(model.out_blocks):
        block.skip_linear.register_forward_pre_hook(lambda m, a, i=i: skip_in.__setitem__(i, a[0].detach()))
    model.mid_block.register_forward_hook(lambda m, a, out: mid.__setitem__(0, out.detach()))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0]))
    D = 32
    assert torch.equal(skip_in[0][..., :D], mid[0])  # current stream first, then the skip
    for i in range(3):
        assert torch.equal(skip_in[i][..., D:], in_out[2 - i]), f"out_blocks.{i} got the wrong skip"


def test_attention_uses_sdpa_and_keeps_bf16(monkeypatch):
    real_sdpa = F.scaled_dot_product_attention
    dtypes = []

    def spy(q, k, v, *args, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = uvit.build("uvit_tiny_test", num_classes=5).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert len(dtypes) == 3  # depth 2: 1 in-block + mid + 1 out-block
    assert all(d == (torch.bfloat16,) * 3 for d in dtypes)
    assert torch.isfinite(out.float()).all()


def test_fresh_init_matches_official():
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=5, embed_dim=64)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert torch.all(model.in_blocks[0].mlp.fc1.bias == 0)
    fc1 = model.in_blocks[0].mlp.fc1.weight
    assert 0.015 < fc1.std().item() < 0.025  # trunc-normal std 0.02
    assert 0.01 < model.pos_embed.std().item() < 0.03
    assert 0.8 < model.label_emb.weight.std().item() < 1.2  # nn.Embedding default N(0, 1)
    assert isinstance(model.time_embed, nn.Identity)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_cuda_forward_matches_cpu_and_bf16_stays_close():
    # The CUDA path the paper configs use: S/2, flash/efficient SDPA, bf16 autocast on the network.
    torch.manual_seed(0)
    model = uvit.build("uvit_small_2", num_classes=100, null_class=True).eval()
    x, t, y = torch.randn(4, 3, 32, 32), torch.full((4,), 500.0), torch.tensor([0, 1, 2, 100])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison with the CPU
    try:
        with torch.no_grad():
            reference = model(x, t, y)  # (4, 3, 32, 32), fp32 on CPU
            gpu = model.cuda()
            fp32 = gpu(x.cuda(), t.cuda(), y.cuda()).cpu()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = gpu(x.cuda(), t.cuda(), y.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert _relative_error(fp32, reference) < 1e-4
    assert bf16.dtype == torch.bfloat16 and _relative_error(bf16.cpu(), reference) < 5e-2
