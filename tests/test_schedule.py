"""VP-SDE schedule and training loss against the closed form of docs/reference.md, "Noise schedule"."""

import math

import pytest
import torch

from diffdistill.diffusion import schedule
from diffdistill.errors import DiffdistillError

TIMES = [1e-5, 1e-3, 0.05, 0.25, 0.5, 0.75, 0.999, 1.0]


def _closed_form(t: float) -> tuple[float, float, float]:
    """docs/reference.md, "Noise schedule": log alpha_t = -(0.1 t + 9.95 t^2) / 2, sigma = sqrt(1 - alpha^2)."""
    log_alpha = -(0.1 * t + 9.95 * t * t) / 2
    alpha = math.exp(log_alpha)
    sigma = math.sqrt(1 - alpha * alpha)
    return alpha, sigma, log_alpha - math.log(sigma)


@pytest.mark.parametrize("t", TIMES)
def test_alpha_sigma_lambda_closed_form(t):
    vp = schedule.VPSchedule()
    tt = torch.tensor([t], dtype=torch.float64)
    alpha, sigma, lam = _closed_form(t)
    assert vp.alpha(tt).item() == pytest.approx(alpha, rel=1e-12)
    assert vp.sigma(tt).item() == pytest.approx(sigma, rel=1e-9)
    assert vp.lambda_(tt).item() == pytest.approx(lam, rel=1e-9, abs=1e-9)
    assert (vp.alpha(tt) ** 2 + vp.sigma(tt) ** 2).item() == pytest.approx(1.0, abs=1e-12)


def test_beta_is_linear_from_0p1_to_20():
    # d(log alpha)/dt = -beta(t)/2 with beta(t) = 0.1 + 19.9 t (finite difference in float64)
    vp, h = schedule.VPSchedule(), 1e-6
    for t in (0.1, 0.5, 0.9):
        tt = torch.tensor([t - h, t + h], dtype=torch.float64)
        slope = (vp.log_alpha(tt)[1] - vp.log_alpha(tt)[0]).item() / (2 * h)
        assert slope == pytest.approx(-(0.1 + 19.9 * t) / 2, rel=1e-6)


def test_inverse_lambda_round_trip_float64():
    vp = schedule.VPSchedule()
    t = torch.linspace(1e-4, 1.0, 1001, dtype=torch.float64)
    back = vp.inverse_lambda(vp.lambda_(t))
    assert torch.allclose(back, t, rtol=1e-9, atol=1e-12)


def test_add_noise_formula():
    vp = schedule.VPSchedule()
    x0, noise = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t = vp.add_noise(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        alpha, sigma, _ = _closed_form(ti)
        assert torch.allclose(x_t[i], alpha * x0[i] + sigma * noise[i], atol=1e-12)


class Spy(torch.nn.Module):
    """Records the network inputs; optionally returns the true noise recovered by the closed form."""

    def __init__(self, x0=None):
        super().__init__()
        self.x0, self.calls = x0, []

    def forward(self, x_t, timesteps, y=None):
        self.calls.append((x_t, timesteps, y))
        if self.x0 is None:
            return torch.zeros_like(x_t)
        out = torch.empty_like(x_t)
        for i, ti in enumerate((timesteps / 999.0).tolist()):  # the network receives 999 t
            alpha, sigma, _ = _closed_form(ti)
            out[i] = (x_t[i] - alpha * self.x0[i]) / sigma
        return out


def test_loss_time_range_and_scale():
    spy, x0 = Spy(), torch.zeros(4096, 1, 1, 1)
    schedule.diffusion_loss(spy, x0, generator=torch.Generator().manual_seed(0))
    timesteps = spy.calls[0][1]
    assert timesteps.shape == (4096,) and timesteps.dtype.is_floating_point
    assert timesteps.min() >= 999 * 1e-5 - 1e-6 and timesteps.max() <= 999.0 + 1e-6
    assert timesteps.min() < 5 and timesteps.max() > 994  # covers (0, 1] on the 999 scale
    assert timesteps.mean().item() == pytest.approx(999 / 2, rel=0.03)  # uniform
    assert not torch.equal(timesteps, timesteps.round())  # continuous, not integer steps


def test_loss_is_noise_mse_on_x_t():
    x0 = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    perfect = schedule.diffusion_loss(Spy(x0), x0, generator=torch.Generator().manual_seed(1))
    assert perfect.item() < 1e-10  # predicting the true eps of x_t = alpha x0 + sigma eps gives 0
    zero = schedule.diffusion_loss(Spy(), x0, generator=torch.Generator().manual_seed(1))
    assert zero.item() == pytest.approx(1.0, abs=0.1)  # E[eps^2] = 1


def _labels_seen(p: float, seed: int, n: int = 20000, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % classes
    spy = Spy()
    schedule.diffusion_loss(spy, torch.zeros(n, 1, 1, 1), y, label_dropout=p, null_label=classes,
                            generator=torch.Generator().manual_seed(seed))
    return y, spy.calls[0][2]


def test_label_dropout_rate_and_null_index():
    y, seen = _labels_seen(0.1, seed=2)
    dropped = seen != y
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.all(seen[dropped] == 10)  # dropped labels become the null index
    assert torch.equal(seen[~dropped], y[~dropped])
    assert torch.equal(_labels_seen(0.1, seed=2)[1], seen)  # seeded: reproducible
    y, seen = _labels_seen(0.0, seed=2)
    assert torch.equal(seen, y)


def test_drop_labels_directly():
    y = torch.zeros(10000, dtype=torch.long)
    out = schedule.drop_labels(y, 0.3, 7, generator=torch.Generator().manual_seed(3))
    assert (out == 7).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert set(out.unique().tolist()) == {0, 7}


def test_dropout_without_null_label_raises():
    with pytest.raises((ValueError, DiffdistillError)):
        schedule.diffusion_loss(Spy(), torch.zeros(4, 1, 1, 1), torch.zeros(4, dtype=torch.long),
                                label_dropout=0.1, null_label=None)
