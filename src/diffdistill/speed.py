"""GPU speed options for sampling and training; each is off unless asked for (docs/reference.md, "Throughput").

- :class:`FixedBatchNetwork`: ``torch.compile`` of a U-ViT called at one fixed batch shape. A
  smaller call (the last batch of a run, the last chunk of a scoring set) is padded with copies of
  its first row and the padding's outputs are dropped; the network treats every sample on its own,
  so the kept rows are those of an unpadded call up to floating-point rounding. A larger call is
  split. The fixed size is the first call's; after an error (e.g. out of memory, before a retry at
  half the size) it is forgotten and the next call sets it again. The first call (compilation plus
  one forward) is timed as ``compile_s``. Under CUDA graphs (modes "reduce-overhead" and
  "max-autotune") the next replay overwrites the output buffer, so the kept rows are copied out.
- :func:`tf32`: TF32 tensor cores for fp32 matmuls and convolutions, on CUDA only, for a block.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

from diffdistill.errors import DiffdistillError

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise DiffdistillError(f"compile must be one of {list(COMPILE_MODES)}, got {mode!r}")


def _pad_rows(value: torch.Tensor, size: int) -> torch.Tensor:
    """``value`` (n, ...) grown to (size, ...) with copies of its first row."""
    extra = size - value.shape[0]
    if extra <= 0:
        return value
    return torch.cat([value, value[:1].expand(extra, *value.shape[1:])])  # (size, ...)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA); elsewhere a call returns finished."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model: torch.nn.Module, device: torch.device | str) -> float:
    """FLOPs of one conditional U-ViT forward at batch 1 (matmuls, convolutions and attention), counted
    by torch.utils.flop_counter; attention through the math backend so that it is counted on every
    device (docs/reference.md, "Throughput")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    x = torch.randn(1, cfg["in_chans"], cfg["img_size"], cfg["img_size"], device=device)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        model(x, torch.full((1,), 500.0, device=device), torch.zeros(1, dtype=torch.long, device=device))
    return float(counter.get_total_flops())


class FixedBatchNetwork(torch.nn.Module):
    """A U-ViT compiled for one batch shape: pads smaller calls, splits larger ones (module docstring)."""

    def __init__(self, model: torch.nn.Module, mode: str = "default"):
        super().__init__()
        check_compile_mode(mode)
        if mode == "none":
            raise DiffdistillError("FixedBatchNetwork needs a compile mode other than 'none'")
        self.model, self.mode = model, mode
        self.compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
        # what the samplers read from a U-ViT
        self.config = getattr(model, "config", None)
        self.null_label = getattr(model, "null_label", None)
        self.num_classes = getattr(model, "num_classes", 0)
        self.batch: int | None = None
        self.compile_s: float | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if self.batch is None:
            self.batch = n
        if n > self.batch:
            parts = range(0, n, self.batch)
            return torch.cat([self(x[i:i + self.batch], t[i:i + self.batch],
                                   None if y is None else y[i:i + self.batch]) for i in parts])
        try:
            return self._fixed(x, t, y, n)
        except Exception:
            self.batch = None  # a retry (e.g. at half the size after out of memory) sets a new shape
            raise

    def _fixed(self, x, t, y, n: int) -> torch.Tensor:
        size = self.batch
        args = (_pad_rows(x, size), _pad_rows(t, size), None if y is None else _pad_rows(y, size))
        first = self.compile_s is None
        began = time.perf_counter()
        out = self.compiled(*args)  # (size, C, H, W)
        if first:
            synchronize(out.device)
            self.compile_s = time.perf_counter() - began
        out = out[:n]  # (n, C, H, W): the padding's rows dropped
        return out.clone() if self.mode in CUDA_GRAPH_MODES else out


def sampling_network(model: torch.nn.Module, compile_mode: str) -> torch.nn.Module:
    """``model`` itself for compile mode "none", else a :class:`FixedBatchNetwork` around it."""
    check_compile_mode(compile_mode)
    if compile_mode == "none" or isinstance(model, FixedBatchNetwork):
        return model
    return FixedBatchNetwork(model, compile_mode)


@contextlib.contextmanager
def tf32(enabled: bool, device: torch.device | str) -> Iterator[None]:
    """TF32 for fp32 matmuls and convolutions inside the block when ``enabled`` and on CUDA; restored after."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
