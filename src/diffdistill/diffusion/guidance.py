"""Turn a U-ViT into the ``noise_fn(x, t)`` a solver calls, with classifier-free guidance.

Convention (the one of DiT and DPM-Solver's wrapper):  eps = eps_u + w * (eps_c - eps_u).
w = 1 is plain conditional sampling, w = 0 unconditional, w > 1 pushes towards the class.
U-ViT's own scripts write eps_c + s (eps_c - eps_u), i.e. w = 1 + s.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from diffdistill.diffusion.schedule import TIME_SCALE

NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_noise_fn(
    model: torch.nn.Module,
    y: torch.Tensor | None,
    guidance_scale: float = 1.0,
    *,
    null_label: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> NoiseFn:
    """``noise_fn(x, t)`` for a solver: t is continuous of shape (B,), the network gets 999 t.

    With guidance (w not 0 or 1) the conditional and unconditional predictions come from one
    forward of batch 2B. w = 1 and w = 0 call the network once, so they are exactly the conditional
    and the unconditional prediction. ``autocast_dtype`` (e.g. bf16) runs the network under
    autocast; the result is returned in x's dtype so the solver's arithmetic stays in it.
    """
    w = float(guidance_scale)
    needs_null = y is not None and w != 1.0
    if needs_null and null_label is None:
        raise ValueError(f"guidance scale {w} needs a model with a null class (null_class=True)")

    def network(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        ctx = (
            torch.autocast(x.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            out = model(x, t * TIME_SCALE, labels)
        return out.to(x.dtype)

    def noise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if y is None or w == 1.0:
            return network(x, t, y)
        null = torch.full_like(y, null_label)
        if w == 0.0:
            return network(x, t, null)
        eps = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + w * (eps_c - eps_u)

    return noise_fn
