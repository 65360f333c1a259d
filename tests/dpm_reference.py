"""An independent, literal DPM-Solver for the tests: the authors' algorithm in their own notation.

Written from the published description (docs/reference.md, "DPM-Solver"): explicit phi_1, phi_2,
phi_3 coefficients per update, the authors' sample loop (timesteps, model_prev_list, inner grids of
singlestep steps) and their closed-form inverse of lambda for the linear VP schedule. It shares no
code with ``diffdistill.diffusion.dpm_solver``, whose factored update (one psi-form for both algorithms) it
checks. Scalars are Python floats (float64); x is whatever tensor the caller passes.
"""

import math

import torch

BETA_0, BETA_1 = 0.1, 20.0  # beta(t) = 0.1 + 19.9 t


def log_alpha(t):
    return -0.25 * t**2 * (BETA_1 - BETA_0) - 0.5 * t * BETA_0


def sigma(t):
    return math.sqrt(1.0 - math.exp(2.0 * log_alpha(t)))


def lam(t):
    return log_alpha(t) - math.log(sigma(t))


def inverse_lambda(lamb):
    tmp = 2.0 * (BETA_1 - BETA_0) * float(torch.logaddexp(torch.tensor(-2.0 * lamb, dtype=torch.float64),
                                                            torch.tensor(0.0, dtype=torch.float64)))
    delta = BETA_0**2 + tmp
    return tmp / (math.sqrt(delta) + BETA_0) / (BETA_1 - BETA_0)


def time_steps(skip_type, t_T, t_0, n):
    if skip_type == "logSNR":
        return [inverse_lambda(v) for v in torch.linspace(lam(t_T), lam(t_0), n + 1, dtype=torch.float64).tolist()]
    if skip_type == "time_uniform":
        return torch.linspace(t_T, t_0, n + 1, dtype=torch.float64).tolist()
    if skip_type == "time_quadratic":
        return (torch.linspace(t_T**0.5, t_0**0.5, n + 1, dtype=torch.float64) ** 2).tolist()
    raise ValueError(skip_type)


class ReferenceSolver:
    def __init__(self, noise_fn, algorithm):
        self.noise_fn, self.pp = noise_fn, algorithm == "dpmsolver++"

    def model_fn(self, x, t):
        eps = self.noise_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        return (x - sigma(t) * eps) / math.exp(log_alpha(t)) if self.pp else eps

    def coeffs(self, s, t):
        h = lam(t) - lam(s)
        if self.pp:
            phi_1 = math.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            return h, sigma(t) / sigma(s), math.exp(log_alpha(t)), phi_1, phi_2, phi_2 / h - 0.5
        phi_1 = math.expm1(h)
        phi_2 = phi_1 / h - 1.0
        return h, math.exp(log_alpha(t) - log_alpha(s)), sigma(t), phi_1, phi_2, phi_2 / h - 0.5

    def first(self, x, s, t, model_s):
        _, ratio, c, phi_1, _, _ = self.coeffs(s, t)
        return ratio * x - (c * phi_1) * model_s

    def singlestep_second(self, x, s, t, r1):
        h = lam(t) - lam(s)
        s1 = inverse_lambda(lam(s) + r1 * h)
        model_s = self.model_fn(x, s)
        model_s1 = self.model_fn(self.first(x, s, s1, model_s), s1)
        _, ratio, c, phi_1, _, _ = self.coeffs(s, t)
        return ratio * x - (c * phi_1) * model_s - (0.5 / r1) * (c * phi_1) * (model_s1 - model_s)

    def singlestep_third(self, x, s, t, r1, r2):
        h = lam(t) - lam(s)
        s1, s2 = inverse_lambda(lam(s) + r1 * h), inverse_lambda(lam(s) + r2 * h)
        model_s = self.model_fn(x, s)
        model_s1 = self.model_fn(self.first(x, s, s1, model_s), s1)
        _, ratio2, c2, phi_12, _, _ = self.coeffs(s, s2)
        phi_22 = phi_12 / (r2 * h) + 1.0 if self.pp else phi_12 / (r2 * h) - 1.0
        sign = 1.0 if self.pp else -1.0
        x_s2 = ratio2 * x - (c2 * phi_12) * model_s + sign * (r2 / r1) * (c2 * phi_22) * (model_s1 - model_s)
        model_s2 = self.model_fn(x_s2, s2)
        _, ratio, c, phi_1, phi_2, _ = self.coeffs(s, t)
        return ratio * x - (c * phi_1) * model_s + sign * (1.0 / r2) * (c * phi_2) * (model_s2 - model_s)

    def multistep(self, x, models, times, t, order):
        if order == 1:
            return self.first(x, times[-1], t, models[-1])
        h, ratio, c, phi_1, phi_2, phi_3 = self.coeffs(times[-1], t)
        r0 = (lam(times[-1]) - lam(times[-2])) / h
        d1_0 = (1.0 / r0) * (models[-1] - models[-2])
        if order == 2:
            return ratio * x - (c * phi_1) * models[-1] - 0.5 * (c * phi_1) * d1_0
        r1 = (lam(times[-2]) - lam(times[-3])) / h
        d1_1 = (1.0 / r1) * (models[-2] - models[-3])
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        sign = 1.0 if self.pp else -1.0
        return ratio * x - (c * phi_1) * models[-1] + sign * (c * phi_2) * d1 - (c * phi_3) * d2


def singlestep_plan(steps, order, skip_type, t_T, t_0):
    if order == 3:
        k = steps // 3 + 1
        orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    elif order == 2:
        orders = [2] * (steps // 2) if steps % 2 == 0 else [2] * (steps // 2) + [1]
    else:
        orders = [1] * steps
    if skip_type == "logSNR":
        outer = time_steps(skip_type, t_T, t_0, len(orders))
    else:
        fine = time_steps(skip_type, t_T, t_0, steps)
        outer = [fine[i] for i in torch.cumsum(torch.tensor([0] + orders), 0).tolist()]
    return outer, orders


def reference_sample(noise_fn, x, steps, order, method, algorithm, skip_type, t_T=1.0, t_0=1e-4):
    solver = ReferenceSolver(noise_fn, algorithm)
    if method == "singlestep":
        outer, orders = singlestep_plan(steps, order, skip_type, t_T, t_0)
        for i, o in enumerate(orders):
            s, t = outer[i], outer[i + 1]
            inner = [lam(u) for u in time_steps(skip_type, s, t, o)]
            h = inner[-1] - inner[0]
            if o == 1:
                x = solver.first(x, s, t, solver.model_fn(x, s))
            elif o == 2:
                x = solver.singlestep_second(x, s, t, (inner[1] - inner[0]) / h)
            else:
                x = solver.singlestep_third(x, s, t, (inner[1] - inner[0]) / h, (inner[2] - inner[0]) / h)
        return x
    timesteps = time_steps(skip_type, t_T, t_0, steps)
    times, models = [timesteps[0]], [solver.model_fn(x, timesteps[0])]
    for step in range(1, order):
        x = solver.multistep(x, models, times, timesteps[step], step)
        times.append(timesteps[step])
        models.append(solver.model_fn(x, timesteps[step]))
    for step in range(order, steps + 1):
        step_order = min(order, steps + 1 - step) if steps < 10 else order
        x = solver.multistep(x, models, times, timesteps[step], step_order)
        for i in range(order - 1):  # the lists keep the newest `order` points
            times[i], models[i] = times[i + 1], models[i + 1]
        times[-1] = timesteps[step]
        if step < steps:  # no evaluation after the last step
            models[-1] = solver.model_fn(x, timesteps[step])
    return x
