"""The sampler's settings: DPM-Solver's, guidance's, mode guidance's and the network's precision,
checked when made (docs/reference.md, "DPM-Solver", "Guidance", "Mode guidance", "Precision")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from diffdistill import speed
from diffdistill.diffusion import dpm_solver
from diffdistill.errors import DiffdistillError

PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16}  # tf32: fp32 with TF32 matmuls (CUDA)
PRECISION_CHOICES = ("auto", *PRECISIONS)  # auto: see precision_on

@dataclass
class SamplerSettings:
    """DPM-Solver settings plus guidance and precision; defaults: the default run's sampler (config/config.yaml;
    U-ViT's own 50-NFE sampler is steps 50, order 3, singlestep, dpmsolver, t_end 1e-4).

    ``guidance_scale`` is w in eps = eps_u + w (eps_c - eps_u) (see :mod:`diffdistill.diffusion.guidance`):
    1 is plain conditional sampling and needs no null class. ``precision`` "bf16" runs only the
    network under autocast; the solver state stays fp32; "tf32" runs fp32 matmuls on TF32 tensor
    cores (CUDA only); "auto" is bf16 where it is fast and fp32 elsewhere (:func:`precision_on`).
    ``compile`` (not "none") samples through :class:`diffdistill.speed.FixedBatchNetwork`,
    torch.compile at one batch shape in that mode ("reduce-overhead": CUDA graphs).
    ``mode_guidance`` s > 0 pulls the clean-image prediction x0 to x0 + s (mode - x0) during the first
    ``mode_guidance_stop`` fraction of the ``steps`` network evaluations, towards one of
    ``modes_per_class`` k-means modes of the image's class (:mod:`diffdistill.diffusion.modes`; 0: off).
    """

    steps: int = 20
    order: int = 2
    method: str = "multistep"
    algorithm: str = "dpmsolver++"
    skip_type: str = "logSNR"
    t_end: float = 1e-3
    guidance_scale: float = 1.0
    precision: str = "fp32"
    compile: str = "none"
    mode_guidance: float = 0.0
    mode_guidance_stop: float = 0.5
    modes_per_class: int = 10

    def __post_init__(self):
        problems = []
        if int(self.steps) < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if int(self.order) not in (1, 2, 3):
            problems.append(f"order must be 1, 2 or 3, got {self.order}")
        choices = (("method", dpm_solver.METHODS), ("algorithm", dpm_solver.ALGORITHMS),
                   ("skip_type", dpm_solver.SKIP_TYPES), ("precision", PRECISION_CHOICES),
                   ("compile", speed.COMPILE_MODES))
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                problems.append(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if not 0.0 < float(self.t_end) < 1.0:
            problems.append(f"t_end must be in (0, 1), got {self.t_end}")
        if not 0.0 <= float(self.mode_guidance) <= 1.0:
            problems.append(f"mode_guidance must be in [0, 1] (0: off, 1: x0 replaced by the mode), got {self.mode_guidance}")
        if not 0.0 <= float(self.mode_guidance_stop) <= 1.0:
            problems.append(f"mode_guidance_stop must be in [0, 1] (the guided fraction of the steps), "
                            f"got {self.mode_guidance_stop}")
        if int(self.modes_per_class) < 1:
            problems.append(f"modes_per_class must be >= 1, got {self.modes_per_class}")
        if problems:
            raise DiffdistillError("sampler settings: " + "; ".join(problems))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.precision == "auto":
            raise DiffdistillError("sampler precision 'auto' has no dtype before on_device(device) resolves it")
        return PRECISIONS[self.precision]

    def on_device(self, device: torch.device | str) -> "SamplerSettings":
        """These settings with ``precision`` resolved for ``device`` (only "auto" changes)."""
        return replace(self, precision=precision_on(self.precision, device))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def guided_evaluations(self) -> int:
        """How many network evaluations, from the first, mode guidance changes (those before the stop)."""
        return math.ceil(self.mode_guidance_stop * self.steps - 1e-9)


def precision_on(precision: str, device: torch.device | str) -> str:
    """The precision a run uses on ``device``: "auto" is bf16 on a CUDA device that supports it and fp32
    elsewhere. A CPU runs the network under bf16 autocast several times slower than in fp32
    (docs/reference.md, "Precision"), so a bf16 config would make a CPU run slower, not faster."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"
