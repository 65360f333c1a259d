"""The continuous VP-SDE noise schedule of the pixel-space U-ViT models, and the training loss.

beta(t) = 0.1 + 19.9 t on t in [0, 1];  log alpha_t = -(0.1 t + 9.95 t^2) / 2;
sigma_t = sqrt(1 - alpha_t^2);  lambda_t = log alpha_t - log sigma_t (half the log-SNR).
x_t = alpha_t x_0 + sigma_t eps; the network predicts eps and receives 999 t as its time input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TIME_SCALE = 999.0  # the official networks take 999 * t


@dataclass(frozen=True)
class VPSchedule:
    """Linear-beta variance-preserving schedule; all functions act elementwise on tensors of t."""

    beta_0: float = 0.1
    beta_1: float = 20.0

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        # sqrt(1 - alpha^2) via expm1 stays accurate for t near 0, where alpha^2 is close to 1.
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.log_alpha(t)
        log_sigma = 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        return log_alpha - log_sigma

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """t with lambda_t = lam: solves the quadratic in t, written without cancellation."""
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise, with t of shape (B,)."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.alpha(t).view(shape) * x0 + self.sigma(t).view(shape) * noise


def drop_labels(y: torch.Tensor, probability: float, null_label: int, generator=None) -> torch.Tensor:
    """Replace each label by ``null_label`` with the given probability (classifier-free guidance)."""
    if probability <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < probability
    return torch.where(drop, torch.full_like(y, null_label), y)


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    schedule: VPSchedule = VPSchedule(),
    label_dropout: float = 0.0,
    null_label: int | None = None,
    t_min: float = 1e-5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise-prediction MSE at t ~ U(t_min, 1), labels dropped to ``null_label`` for guidance."""
    batch = x0.shape[0]
    t = torch.rand(batch, device=x0.device, generator=generator) * (1.0 - t_min) + t_min
    noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, t, noise)
    if y is not None and label_dropout > 0:
        if null_label is None:
            raise ValueError("label_dropout > 0 needs a model with a null class (null_class=True)")
        y = drop_labels(y, label_dropout, null_label, generator)
    prediction = model(x_t, t * TIME_SCALE, y)
    return F.mse_loss(prediction.float(), noise.float())
