"""DPM-Solver and DPM-Solver++ for the continuous VP schedule (Lu et al., NeurIPS 2022 and 2022).

The probability-flow ODE, written in lambda = log(alpha / sigma) (half the log-SNR), has an exact
linear part, so from time s to time t with h = lambda_t - lambda_s:

  noise prediction ("dpmsolver"):  x_t = (alpha_t/alpha_s) x_s - sigma_t int_0^h e^(h-u) eps(lambda_s+u) du
  data prediction ("dpmsolver++"): x_t = (sigma_t/sigma_s) x_s + alpha_t int_0^h e^(u-h) x0(lambda_s+u) du

with x0 = (x - sigma eps) / alpha. Expanding the prediction m in a Taylor series in lambda,
m = m0 + u m' + u^2/2 m'', integrates exactly to

  x_t = ratio x_s + scale (psi_1(g) m0 + psi_2(g) h m' + psi_3(g) h^2 m'')
  psi_1(g) = e^g - 1,  psi_2(g) = psi_1(g)/g - 1,  psi_3(g) = psi_2(g)/g - 1/2,

where noise prediction has ratio alpha_t/alpha_s, scale -sigma_t, g = h and data prediction has
ratio sigma_t/sigma_s, scale -alpha_t, g = -h (the data formula is the noise formula with the roles
of alpha and sigma swapped and lambda reversed). The solvers differ only in how they estimate
h m' and h^2 m'' from network evaluations:

* ``"singlestep"`` (DPM-Solver-fast): extra evaluations inside each step at lambda_s + r h;
  order 2 (DPM-Solver-2 / DPM-Solver++(2S)) and order 3 (DPM-Solver-3 and its data-prediction
  twin). A budget of ``steps`` evaluations is split into outer steps by :func:`singlestep_orders`.
* ``"multistep"``: one evaluation per step; the derivatives come from the predictions of the
  previous one or two grid points (DPM-Solver++(2M) and (3M) for data prediction and their
  noise-prediction counterparts). The first steps use lower orders (:func:`multistep_orders`); with
  fewer than 10 steps the last steps do too, as its authors recommend for stability near t = 0.

``method``, ``algorithm``, ``order`` and ``skip_type`` mean exactly what they mean in the authors'
``dpm_solver_pytorch.py`` (docs/reference.md, "DPM-Solver", "Exactness against the authors' code"):

* skip types ``logSNR`` (uniform in lambda), ``time_uniform`` and ``time_quadratic`` (uniform in
  sqrt(t));
* singlestep outer grid: K + 1 points uniform in lambda for ``logSNR``; for the other skip types
  the points at the cumulative sums of the step orders on the fine grid of ``steps`` + 1 points. The
  intermediate points of a step (r1, r2) come from a grid of the same skip type between its ends;
* multistep order 3 estimates the second-derivative term with the authors' divided difference
  D2 = (D1_0 - D1_1) / (r0 + r1), which is about h^2 m''/2, i.e. half the Taylor term, and applies
  it with the coefficient of h^2 m''. That is the published DPM-Solver(++)(3M).

Conventions: ``noise_fn(x, t)`` returns the predicted noise eps for continuous t in [0, 1] of shape
(B,), in x's dtype (see :func:`diffdistill.diffusion.guidance.guided_noise_fn`). The solver state stays in
x_T's dtype; coefficients are computed in float64 and applied as Python floats.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffdistill.diffusion.schedule import VPSchedule

log = logging.getLogger(__name__)

NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# x0_pull(x0, evaluation): the change to make to the clean-image prediction of that network evaluation
# (0-based), or None to leave it (diffdistill.diffusion.modes.ModePull).
X0Pull = Callable[[torch.Tensor, int], "torch.Tensor | None"]
METHODS = ("multistep", "singlestep")  # as in the authors' dpm_solver_pytorch.py
ALGORITHMS = ("dpmsolver", "dpmsolver++")
SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")


def _validate(steps, order, method, algorithm, skip_type, t_start, t_end) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 < t_end < t_start <= 1.0:
        raise ValueError(f"need 0 < t_end < t_start <= 1, got t_start={t_start!r}, t_end={t_end!r}")


def time_grid(
    skip_type: str, t_start: float, t_end: float, n: int, schedule: VPSchedule = VPSchedule()
) -> torch.Tensor:
    """n + 1 float64 times from t_start down to t_end, uniform in lambda ("logSNR"), in t
    ("time_uniform") or in sqrt(t) ("time_quadratic": t_i = (sqrt t_start + i (sqrt t_end - sqrt t_start) / n)^2)."""
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    if skip_type == "logSNR":
        lam = schedule.lambda_(ends)  # (2,)
        lams = torch.linspace(lam[0].item(), lam[1].item(), n + 1, dtype=torch.float64)  # (n + 1,)
        grid = schedule.inverse_lambda(lams)
    elif skip_type == "time_quadratic":
        grid = torch.linspace(math.sqrt(t_start), math.sqrt(t_end), n + 1, dtype=torch.float64) ** 2
    else:
        grid = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
    # inverse_lambda(lambda(t)) is t only up to round-off; the ends are part of the contract.
    grid[0], grid[-1] = t_start, t_end
    return grid  # (n + 1,)


def multistep_orders(steps: int, order: int) -> list[int]:
    """Order of each multistep step: warm up 1, 2, ...; below 10 steps also ramp down at the end."""
    orders = [min(order, i + 1) for i in range(steps)]
    if steps < 10:
        orders = [min(o, steps - i) for i, o in enumerate(orders)]
    return orders


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Orders of the outer singlestep steps; their sum is ``steps`` (the network evaluations).

    Order 3: K = steps // 3 + 1 outer steps, e.g. 50 -> sixteen order-3 steps and one order-2 step.
    """
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        if steps % 3 == 1:
            return [3] * (k - 1) + [1]
        return [3] * (k - 1) + [2]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def singlestep_outer_grid(
    skip_type: str, t_start: float, t_end: float, orders: list[int], schedule: VPSchedule = VPSchedule()
) -> torch.Tensor:
    """The len(orders) + 1 outer times of a singlestep run, as the authors choose them.

    ``logSNR``: uniform in lambda over the outer steps. Other skip types: the fine grid of
    sum(orders) + 1 points, taken at indices 0, o1, o1 + o2, ... so that an order-3 step spans three
    fine intervals.
    """
    if skip_type == "logSNR":
        return time_grid(skip_type, t_start, t_end, len(orders), schedule)
    fine = time_grid(skip_type, t_start, t_end, sum(orders), schedule)  # (steps + 1,)
    return fine[[0, *itertools.accumulate(orders)]]  # (len(orders) + 1,)


@dataclass
class _Solver:
    """One algorithm's model evaluation and exponential-integrator update, for scalar times."""

    noise_fn: NoiseFn
    schedule: VPSchedule
    data_prediction: bool
    x0_pull: X0Pull | None = None
    nfe: int = 0

    def _scalars(self, t: float) -> tuple[float, float, float]:
        """(log alpha_t, log sigma_t, lambda_t) in float64."""
        log_alpha = float(self.schedule.log_alpha(t))  # the schedule's formula on a Python float
        log_sigma = 0.5 * math.log(-math.expm1(2.0 * log_alpha))
        return log_alpha, log_sigma, log_alpha - log_sigma

    def lam(self, t: float) -> float:
        return self._scalars(t)[2]

    def t_of_lambda(self, lam: float) -> float:
        return self.schedule.inverse_lambda(torch.tensor(lam, dtype=torch.float64)).item()

    def inner_fractions(self, skip_type: str, s: float, t: float, order: int) -> list[float]:
        """r_k = (lambda(u_k) - lambda_s) / h for the inner points u_k of an ``order``-interval grid
        of ``skip_type`` from s to t (1/3 and 2/3 on a logSNR grid), as the authors compute them."""
        inner = time_grid(skip_type, s, t, order, self.schedule).tolist()  # (order + 1,)
        lams = [self.lam(u) for u in inner]
        h = lams[-1] - lams[0]
        return [(lam - lams[0]) / h for lam in lams[1:-1]]

    def model(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The prediction the update integrates: eps, or x0 = (x - sigma eps) / alpha."""
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        # copy=True: a multistep solver keeps this tensor across steps, and a network run under
        # CUDA graphs would overwrite its own output buffer on the next call.
        eps = self.noise_fn(x, t_batch).to(x.dtype, copy=True)  # (B, ...)
        self.nfe += 1
        if not self.data_prediction and self.x0_pull is None:
            return eps
        log_alpha, log_sigma, _ = self._scalars(t)
        x0 = (x - math.exp(log_sigma) * eps) / math.exp(log_alpha)
        pull = None if self.x0_pull is None else self.x0_pull(x0, self.nfe - 1)
        if pull is None:
            return x0 if self.data_prediction else eps
        # The pulled x0 as it is, or as the noise that gives it: eps' = (x - alpha x0') / sigma.
        return x0 + pull if self.data_prediction else eps - math.exp(log_alpha - log_sigma) * pull

    def update(self, x, m0, s: float, t: float, d1=None, d2=None) -> torch.Tensor:
        """x_t from x_s given m0 = m(s), d1 ~ h m'(s) and d2 ~ h^2 m''(s) (module docstring)."""
        log_alpha_s, log_sigma_s, lam_s = self._scalars(s)
        log_alpha_t, log_sigma_t, lam_t = self._scalars(t)
        h = lam_t - lam_s
        if self.data_prediction:
            ratio, scale, g = math.exp(log_sigma_t - log_sigma_s), -math.exp(log_alpha_t), -h
        else:
            ratio, scale, g = math.exp(log_alpha_t - log_alpha_s), -math.exp(log_sigma_t), h
        psi1 = math.expm1(g)
        psi2 = psi1 / g - 1.0
        psi3 = psi2 / g - 0.5
        out = ratio * x + (scale * psi1) * m0
        if d1 is not None:
            out = out + (scale * psi2) * d1
        if d2 is not None:
            out = out + (scale * psi3) * d2
        return out


def _multistep(solver: _Solver, x: torch.Tensor, ts: list[float], orders: list[int], keep: list | None):
    """One evaluation per step; h m' and h^2 m'' from divided differences of past predictions.

    Order 3 uses the authors' D2 (about h^2 m''/2, module docstring).
    """
    lams = [solver.lam(t) for t in ts]
    history = [solver.model(x, ts[0])]  # predictions at ts[i], newest last
    for i, order in enumerate(orders):
        s, t, h = ts[i], ts[i + 1], lams[i + 1] - lams[i]
        m0 = history[-1]
        if order == 1:
            x = solver.update(x, m0, s, t)
        else:
            r0 = (lams[i] - lams[i - 1]) / h
            d1_0 = (m0 - history[-2]) / r0  # ~ h m' - h h0/2 m''
            if order == 2:
                # DPM-Solver++(2M): a first-order step with the extrapolated prediction m0 + d1/2.
                x = solver.update(x, m0 + 0.5 * d1_0, s, t)
            else:
                r1 = (lams[i - 1] - lams[i - 2]) / h
                d1_1 = (history[-2] - history[-3]) / r1  # ~ h m' - h (h0 + h1/2) m''
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # ~ h m'
                d2 = (d1_0 - d1_1) / (r0 + r1)  # the authors' D2 ~ h^2 m''/2
                x = solver.update(x, m0, s, t, d1, d2)
        if keep is not None:
            keep.append(x)
        if i + 1 < len(orders):
            history = (history + [solver.model(x, t)])[-3:]
    return x


def _singlestep_update(solver: _Solver, x: torch.Tensor, s: float, t: float, order: int,
                       skip_type: str) -> torch.Tensor:
    """One DPM-Solver-1/2/3 step (or its data-prediction twin) from s to t: ``order`` evaluations.

    The intermediate points sit at lambda_s + r h with r from :meth:`_Solver.inner_fractions`; the
    updates are the authors' "dpmsolver" solver type (order 2: m0 + (m1 - m0) / (2 r1) in the
    first-order formula; order 3: the r2 difference alone in the second-order formula).
    """
    m0 = solver.model(x, s)
    if order == 1:
        return solver.update(x, m0, s, t)
    lam_s, lam_t = solver.lam(s), solver.lam(t)
    h = lam_t - lam_s
    if order == 2:
        (r1,) = solver.inner_fractions(skip_type, s, t, 2)
        s1 = solver.t_of_lambda(lam_s + r1 * h)
        m1 = solver.model(solver.update(x, m0, s, s1), s1)
        return solver.update(x, m0 + (m1 - m0) / (2.0 * r1), s, t)
    r1, r2 = solver.inner_fractions(skip_type, s, t, 3)
    s1, s2 = solver.t_of_lambda(lam_s + r1 * h), solver.t_of_lambda(lam_s + r2 * h)
    m1 = solver.model(solver.update(x, m0, s, s1), s1)
    # Second-order step to s2, its slope (r2 h) m' estimated by (r2 / r1) (m1 - m0).
    m2 = solver.model(solver.update(x, m0, s, s2, d1=(r2 / r1) * (m1 - m0)), s2)
    # With r2 = 2/3 the r2 difference alone makes the step third order (like Heun's third-order RK).
    return solver.update(x, m0, s, t, d1=(m2 - m0) / r2)


def sample(
    noise_fn: NoiseFn,
    x_T: torch.Tensor,
    *,
    steps: int,
    order: int,
    method: str = "multistep",
    algorithm: str = "dpmsolver++",
    skip_type: str = "logSNR",
    t_start: float = 1.0,
    t_end: float = 1e-4,
    schedule: VPSchedule = VPSchedule(),
    return_intermediates: bool = False,
    x0_pull: X0Pull | None = None,
):
    """Solve the probability-flow ODE from x_T at t_start to t_end with ``steps`` network calls.

    x_T: (B, ...) noise. Returns x at t_end in x_T's dtype, or with ``return_intermediates`` the
    pair (x, [x_T, x after each outer step]). Bad arguments raise ValueError naming the argument.
    ``x0_pull`` changes the clean-image prediction x0 = (x - sigma eps) / alpha of each evaluation
    to x0 + pull before the solver uses it (stored for later multistep steps too); "dpmsolver" uses
    the noise that gives the changed x0. It calls the network no more often.
    """
    _validate(steps, order, method, algorithm, skip_type, t_start, t_end)
    if x_T.dim() < 1:
        raise ValueError(f"x_T must have a batch dimension, got shape {tuple(x_T.shape)}")
    solver = _Solver(noise_fn, schedule, data_prediction=algorithm == "dpmsolver++", x0_pull=x0_pull)
    keep = [x_T] if return_intermediates else None
    if method == "multistep":
        orders = multistep_orders(steps, order)
        ts = time_grid(skip_type, t_start, t_end, steps, schedule).tolist()
        x = _multistep(solver, x_T, ts, orders, keep)
    else:
        orders = singlestep_orders(steps, order)
        ts = singlestep_outer_grid(skip_type, t_start, t_end, orders, schedule).tolist()
        x = x_T
        for i, step_order in enumerate(orders):
            x = _singlestep_update(solver, x, ts[i], ts[i + 1], step_order, skip_type)
            if keep is not None:
                keep.append(x)
    log.debug("%s %s order %d: %d network evaluations", method, algorithm, order, solver.nfe)
    return (x, keep) if return_intermediates else x
