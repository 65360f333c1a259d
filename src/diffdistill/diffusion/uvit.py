"""U-ViT for pixel-space diffusion ("All are Worth Words", Bao et al., CVPR 2023).

Module names equal the official implementation's state_dict keys, so the public checkpoints
(``cifar10_uvit_small.pth``, ``imagenet64_uvit_mid.pth``) load with a strict key/shape check.
Everything is a token: [label?, time, patches]. Long skip connections join the i-th input block to
the mirrored output block (last in, first out). The network predicts the noise epsilon.

The time input is what the official network receives: ``999 * t`` for continuous t in [0, 1], a
float tensor of shape (B,). Converting t is the caller's job (see :mod:`diffdistill.diffusion.guidance`).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

# Constructor keyword arguments. The first two are the paper's models; the rest are small enough for
# CPU tests and for the embedded 8x8 digits default. "uvit_digits" (patch 2: 16 tokens) is the
# default's model; the patch-1 variants are the two models calibrated in docs/reference.md, "Digits calibration" (64
# tokens, 4.5x slower to train on a CPU). "uvit_mnist" (28x28x1, patch 7: 16 tokens) replaced patch 4
# after a pipeline run: 2.2x faster per step, so 4x the steps fit, and better at every IPC
# (docs/reference.md, "MNIST").
PRESETS: dict[str, dict] = {
    "uvit_small_2": dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8),
    "uvit_mid_4": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12),
    "uvit_tiny_test": dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2),
    "uvit_digits": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4),
    "uvit_digits_p1": dict(img_size=8, patch_size=1, in_chans=1, embed_dim=64, depth=4, num_heads=4),
    "uvit_digits_p1_d128": dict(img_size=8, patch_size=1, in_chans=1, embed_dim=128, depth=6, num_heads=4),
    "uvit_mnist": dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4),
}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first: (B,) -> (B, dim), computed in fp32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); each token is laid out (p1, p2, C) with C fastest."""
    patch_dim = x.shape[2]
    patch_size = int((patch_dim // channels) ** 0.5)
    side = int(x.shape[1] ** 0.5)
    assert patch_size**2 * channels == patch_dim and side**2 == x.shape[1], x.shape
    return einops.rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=side, p1=patch_size, p2=patch_size)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens, flattened row-major."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention; the fused qkv output is read as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        # q, k, v stay in the autocast dtype so that SDPA can pick the flash / efficient kernels.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; output blocks first fuse the long skip with ``skip_linear``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, 2D) -> (B, L, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """Class-conditional (or unconditional) U-ViT noise predictor in pixel space.

    ``num_classes <= 0`` builds the unconditional network. With ``null_class=True`` the label
    embedding gets one extra row, index ``num_classes``, used as the "no label" input for
    classifier-free guidance; ``null_class=False`` is exactly the official conditional model.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        num_classes: int = 0,
        null_class: bool = True,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, num_classes=num_classes,
            null_class=null_class,
        )
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_classes = max(num_classes, 0)
        self.null_class = bool(null_class) and self.num_classes > 0
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Identity()  # mlp_time_embed=False in both target configs: no keys
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes + int(self.null_class), embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        make_block = lambda skip=False: Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip)  # noqa: E731
        self.in_blocks = nn.ModuleList([make_block() for _ in range(depth // 2)])
        self.mid_block = make_block()
        self.out_blocks = nn.ModuleList([make_block(skip=True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    @property
    def null_label(self) -> int | None:
        """The label index meaning "unconditional", or None when the model has no null row."""
        return self.num_classes if self.null_class else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; timesteps: (B,) floats = 999*t; y: (B,) int labels."""
        tokens = self.patch_embed(x)  # (B, N, D)
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim))  # (B, D)
        time_token = time_token.to(tokens.dtype).unsqueeze(1)  # (B, 1, D)
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this U-ViT is class-conditional: pass labels y")
            label_token = self.label_emb(y).unsqueeze(1)  # (B, 1, D)
            tokens = torch.cat([label_token, time_token, tokens], dim=1)  # (B, 2 + N, D)
        else:
            tokens = torch.cat([time_token, tokens], dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.pos_embed
        skips = []
        for block in self.in_blocks:
            tokens = block(tokens)
            skips.append(tokens)
        tokens = self.mid_block(tokens)
        for block in self.out_blocks:
            tokens = block(tokens, skips.pop())  # last in, first out
        tokens = self.decoder_pred(self.norm(tokens))  # (B, extras + N, p*p*C)
        patches = tokens[:, self.extras :, :]  # (B, N, p*p*C)
        return self.final_layer(unpatchify(patches, self.in_chans))  # (B, C, H, W)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def preset_config(preset: str, **overrides) -> dict:
    """The constructor keywords of a preset with keyword overrides over them."""
    if preset not in PRESETS:
        raise KeyError(f"unknown U-ViT preset {preset!r}; known: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **overrides}


def build(preset: str, **overrides) -> UViT:
    """A U-ViT from a preset name, with keyword overrides (e.g. ``num_classes=100``)."""
    return UViT(**preset_config(preset, **overrides))
