"""DPM-Solver (fast / adaptive) and DPM-Solver++ update rules (k-diffusion convention, see
diffusion.sampling.samplers.registry)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.sampling.samplers.common import (
    Callback,
    Model,
    NoiseSampler,
    _info,
    _setup,
    _tree_sampler,
    ancestral_step,
    default_noise_sampler,
    to_d,
)

# --- DPM-Solver (fast / adaptive), in t = -log sigma and eps ---------------------------------


class _Eps:
    """eps(x, t) = (x - D(x; sigma(t))) / sigma(t) with the model's calls counted."""

    def __init__(self, model: Model, args: dict, s_in: Tensor) -> None:
        self.model, self.args, self.s_in = model, args, s_in

    def __call__(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        sigma = math.exp(-t)
        denoised = self.model(x, sigma * self.s_in, **self.args)
        return (x - denoised) / sigma, denoised


def _dpm_1(x: Tensor, t: float, t_next: float, eps: Tensor) -> Tensor:
    return x - math.exp(-t_next) * math.expm1(t_next - t) * eps


def _dpm_2(f: _Eps, x: Tensor, t: float, t_next: float, eps: Tensor, r1: float = 0.5,
           eps_r1: Tensor | None = None) -> tuple[Tensor, Tensor]:
    h = t_next - t
    s1 = t + r1 * h
    if eps_r1 is None:
        eps_r1 = f(x - math.exp(-s1) * math.expm1(r1 * h) * eps, s1)[0]
    sn = math.exp(-t_next)
    return x - sn * math.expm1(h) * eps - sn / (2 * r1) * math.expm1(h) * (eps_r1 - eps), eps_r1


def _dpm_3(f: _Eps, x: Tensor, t: float, t_next: float, eps: Tensor, r1: float = 1 / 3,
           r2: float = 2 / 3, eps_r1: Tensor | None = None) -> Tensor:
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_r1 is None:
        eps_r1 = f(x - math.exp(-s1) * math.expm1(r1 * h) * eps, s1)[0]
    u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
          - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = f(u2, s2)[0]
    sn = math.exp(-t_next)
    return x - sn * math.expm1(h) * eps - sn / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def _dpm_ends(sig: list[float]) -> tuple[float, float]:
    """ComfyUI: run from sigmas[0] to the last non-zero sigma."""
    sigma_min = sig[-1] if sig[-1] != 0 else sig[-2]
    return sigma_min, sig[0]


@torch.no_grad()
def sample_dpm_fast(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                    callback: Callback = None, disable: bool | None = None, eta: float = 0.0,
                    s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver-Fast: len(sigmas) - 1 model calls spread over uniform steps in log sigma from
    sigmas[0] to the last non-zero sigma (3rd-order steps, lower order at the end)."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    if len(sig) <= 1:
        return x
    sigma_min, sigma_max = _dpm_ends(sig)
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("dpm_fast: sigma_min and sigma_max must not be 0")
    nfe = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    f = _Eps(model, args, s_in)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = t_next, 0.0
        if eta:
            sd, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
            t_next_ = min(t_end, -math.log(sd))
            su = (math.exp(-t_next) ** 2 - math.exp(-t_next_) ** 2) ** 0.5
        eps, denoised = f(x, t)
        if callback is not None:
            callback(_info(x, i, math.exp(-t), denoised))
        if order == 1:
            x = _dpm_1(x, t, t_next_, eps)
        elif order == 2:
            x = _dpm_2(f, x, t, t_next_, eps)[0]
        else:
            x = _dpm_3(f, x, t, t_next_, eps)
        if su:
            x = x + noise_sampler(math.exp(-t), math.exp(-t_next)) * (su * s_noise)
    return x


@torch.no_grad()
def sample_dpm_adaptive(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callback = None, disable: bool | None = None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                        accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver-12/23 with a PID step-size controller (error of the embedded lower order);
    the number of model calls is chosen by the solver, only the ends of `sigmas` are used."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    if len(sig) <= 1:
        return x
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    sigma_min, sigma_max = _dpm_ends(sig)
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("dpm_adaptive: sigma_min and sigma_max must not be 0")
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    f = _Eps(model, args, s_in)
    t_end = -math.log(sigma_min)
    s = -math.log(sigma_max)
    # PID controller on 1 / error (k-diffusion's coefficients; order 1.5 for the SDE variant)
    ctrl_order = 1.5 if eta else order
    b1 = (pcoeff + icoeff + dcoeff) / ctrl_order
    b2 = -(pcoeff + 2 * dcoeff) / ctrl_order
    b3 = dcoeff / ctrl_order
    h = abs(h_init)
    errs: list[float] = []
    x_prev = x
    steps = 0
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        t_, su = t, 0.0
        if eta:
            sd, _ = ancestral_step(math.exp(-s), math.exp(-t), eta)
            t_ = min(t_end, -math.log(sd))
            su = (math.exp(-t) ** 2 - math.exp(-t_) ** 2) ** 0.5
        eps, denoised = f(x, s)
        if order == 2:
            x_low = _dpm_1(x, s, t_, eps)
            x_high = _dpm_2(f, x, s, t_, eps)[0]
        else:
            x_low, eps_r1 = _dpm_2(f, x, s, t_, eps, r1=1 / 3)
            x_high = _dpm_3(f, x, s, t_, eps, eps_r1=eps_r1)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        inv = 1 / (error + 1e-8)
        if not errs:
            errs = [inv, inv, inv]
        errs[0] = inv
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= accept_safety
        if accept:
            errs[2], errs[1] = errs[1], errs[0]
        h *= factor
        if accept:
            x_prev = x_low
            x = x_high
            if su:
                x = x + noise_sampler(math.exp(-s), math.exp(-t)) * (su * s_noise)
            s = t
        if callback is not None:
            callback({**_info(x, steps, math.exp(-s), denoised), "error": error, "h": h})
        steps += 1
    return x


# --- DPM-Solver++ family ----------------------------------------------------------------------


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                              callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                              s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(2S) single-step to sigma_down (midpoint in lambda), then noise * sigma_up."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sigma_down == 0:
            x = x + to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        else:
            t, t_next = -math.log(sig[i]), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / sig[i]) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = model(x_2, math.exp(-s) * s_in, **args)
            x = (sigma_down / sig[i]) * x - math.expm1(-h) * denoised_2
        if sig[i + 1] > 0:
            x = x + noise_sampler(sig[i], sig[i + 1]) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                     callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                     r: float = 0.5, cpu_tree: bool = True) -> Tensor:
    """DPM-Solver++ (stochastic): two model calls per step, Brownian-tree noise."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or _tree_sampler(x, sig, seed, cpu_tree, midpoint_r=r)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sig[i + 1] == 0:
            x = x + to_d(x, sig[i], denoised) * (sig[i + 1] - sig[i])
            continue
        t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
        s = t + (t_next - t) * r
        # step 1: to lambda = s
        sd, su = ancestral_step(sig[i], math.exp(-s), eta)
        s_ = -math.log(sd)
        x_2 = (sd / sig[i]) * x - math.expm1(t - s_) * denoised
        x_2 = x_2 + noise_sampler(sig[i], math.exp(-s)) * (s_noise * su)
        denoised_2 = model(x_2, math.exp(-s) * s_in, **args)
        # step 2: to sigma_{i+1} with the blended prediction
        sd, su = ancestral_step(sig[i], sig[i + 1], eta)
        t_next_ = -math.log(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sig[i]) * x - math.expm1(t - t_next_) * denoised_d
        x = x + noise_sampler(sig[i], sig[i + 1]) * (s_noise * su)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                    callback: Callback = None, disable: bool | None = None) -> Tensor:
    """DPM-Solver++(2M): second-order multistep on the denoised predictions."""
    sig, args, _, s_in = _setup(x, sigmas, extra_args)
    old_denoised: Tensor | None = None
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sig[i + 1] == 0:
            # first-order step with sigma_next = 0: (0 / sigma) x - (e^{-inf} - 1) D = D
            x = denoised
        else:
            t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t + math.log(sig[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        solver_type: str = "midpoint", cpu_tree: bool = True) -> Tensor:
    """DPM-Solver++(2M) SDE (midpoint or heun correction), Brownian-tree noise."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or _tree_sampler(x, sig, seed, cpu_tree)
    old_denoised: Tensor | None = None
    h_last: float | None = None
    h = 0.0
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (sig[i + 1] / sig[i] * math.exp(-eta_h)) * x + phi * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((phi / (-h - eta_h) + 1) * (1 / r)) * (denoised - old_denoised)
                else:
                    x = x + (0.5 * phi * (1 / r)) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sig[i], sig[i + 1]) * (
                    sig[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        cpu_tree: bool = True) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep on the denoised predictions, Brownian noise."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or _tree_sampler(x, sig, seed, cpu_tree)
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h: float | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and denoised_2 is not None and denoised_1 is not None and h_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise_sampler(sig[i], sig[i + 1]) * (
                    sig[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
