"""The sampler's settings: DPM-Solver's, guidance's, mode guidance's and the network's precision,
checked when made (docs/reference.md, "DPM-Solver", "Guidance", "Mode guidance", "Precision")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from diffdistill import settings, speed
from diffdistill.diffusion import dpm_solver
from diffdistill.errors import DiffdistillError
from diffdistill.settings import setting

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

    steps: int = setting(20, minimum=1, description="network evaluations per image")
    order: int = setting(2, minimum=1, maximum=3)
    method: str = setting("multistep", choices=dpm_solver.METHODS,
                          description="the DPM-Solver authors' multistep / singlestep")
    algorithm: str = setting("dpmsolver++", choices=dpm_solver.ALGORITHMS,
                             description="dpmsolver (noise prediction) | dpmsolver++ (data prediction)")
    skip_type: str = setting("logSNR", choices=dpm_solver.SKIP_TYPES)
    t_end: float = setting(1e-3, exclusive_minimum=0, maximum=0.1)
    guidance_scale: float = setting(1.0, minimum=0,
                                    description="eps = eps_u + w (eps_c - eps_u); 1 = plain conditional")
    precision: str = setting("fp32", choices=PRECISION_CHOICES, description=(
        "auto: bf16 on a CUDA GPU that supports it, fp32 elsewhere (the sidecars record which); bf16: network "
        "under autocast; tf32: fp32 with TF32 matmuls (CUDA)"))
    compile: str = setting("none", choices=speed.COMPILE_MODES, description=(
        "torch.compile of the network at one fixed batch shape (last batch padded), in this mode; "
        "reduce-overhead adds CUDA graphs; compile time counts inside the budget"))
    mode_guidance: float = setting(0.0, minimum=0, maximum=1, description=(
        "mode guidance (docs/reference.md): the predicted clean image x0 becomes x0 + s (mode - x0) before the "
        "stop; 0 = off; > 0 makes the job read the real training split for the modes"))
    mode_guidance_stop: float = setting(0.5, minimum=0, maximum=1, description=(
        "the fraction of the steps (network evaluations), from the first, that mode guidance acts on"))
    modes_per_class: int = setting(10, minimum=1, description=(
        "k-means modes per class (pixel space); image i of a class is guided to mode i mod k"))

    def __post_init__(self):
        settings.check(self, "sampler settings")

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
