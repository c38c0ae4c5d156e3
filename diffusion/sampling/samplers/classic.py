"""Euler, Heun, DPM2 and LMS update rules (k-diffusion convention, see diffusion.sampling.samplers.registry)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion.sampling.samplers.common import (
    Callback,
    Model,
    NoiseSampler,
    _info,
    _setup,
    ancestral_step,
    default_noise_sampler,
    to_d,
)


@torch.no_grad()
def sample_euler(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callback = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Karras et al. Algorithm 2 with Euler steps; churn noise only when gamma > 0."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    n = len(sig) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            noise_sampler = noise_sampler or default_noise_sampler(x, seed)
            x = x + noise_sampler(sig[i], sig[i + 1]) * s_noise * (sigma_hat ** 2 - sig[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised, sigma_hat))
        x = x + to_d(x, sigma_hat, denoised) * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Euler step to sigma_down, then fresh noise * sigma_up (none on the final step to 0)."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sigma_down == 0:
            x = denoised
        else:
            x = x + to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        if sig[i + 1] > 0:
            x = x + noise_sampler(sig[i], sig[i + 1]) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callback = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Heun's second-order method (trapezoid of d at both ends); Euler on the step to 0."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    n = len(sig) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            noise_sampler = noise_sampler or default_noise_sampler(x, seed)
            x = x + noise_sampler(sig[i], sig[i + 1]) * s_noise * (sigma_hat ** 2 - sig[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised, sigma_hat))
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sig[i + 1], model(x_2, sig[i + 1] * s_in, **args))
            x = x + (d + d_2) * (dt / 2)
    return x


@torch.no_grad()
def sample_heunpp2(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                   callback: Callback = None, disable: bool | None = None, s_churn: float = 0.0,
                   s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                   noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Heun++ (ComfyUI): three derivatives (at sigma_i, sigma_{i+1}, sigma_{i+2}) weighted by
    sigma_{i+1} / (3 sigma_0) and sigma_{i+2} / (3 sigma_0); Heun-like with weights
    sigma_{i+1} / (2 sigma_0) on the second-to-last step; Euler on the last."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    n, s_end = len(sig) - 1, sig[-1]
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            noise_sampler = noise_sampler or default_noise_sampler(x, seed)
            x = x + noise_sampler(sig[i], sig[i + 1]) * s_noise * (sigma_hat ** 2 - sig[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised, sigma_hat))
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sig[i + 1], model(x_2, sig[i + 1] * s_in, **args))
        if sig[i + 2] == s_end:
            w2 = sig[i + 1] / (2 * sig[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sig[i + 2] - sig[i + 1])
            d_3 = to_d(x_3, sig[i + 2], model(x_3, sig[i + 2] * s_in, **args))
            w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
            x = x + (d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
    return x


@torch.no_grad()
def sample_dpm_2(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callback = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver-2 flavoured midpoint step at the geometric mean sigma; Euler on the step to 0."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    n = len(sig) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            noise_sampler = noise_sampler or default_noise_sampler(x, seed)
            x = x + noise_sampler(sig[i], sig[i + 1]) * s_noise * (sigma_hat ** 2 - sig[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised, sigma_hat))
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sig[i + 1])))
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **args))
            x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """dpm_2 midpoint step from sigma_i to sigma_down, then noise * sigma_up."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        d = to_d(x, sig[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            sigma_mid = math.exp(0.5 * (math.log(sig[i]) + math.log(sigma_down)))
            x_2 = x + d * (sigma_mid - sig[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **args))
            x = x + d_2 * (sigma_down - sig[i])
            x = x + noise_sampler(sig[i], sig[i + 1]) * (s_noise * sigma_up)
    return x


def lms_coefficient(order: int, t: Sequence[float], i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j} on the nodes
    t_i, ..., t_{i-order+1}; exact (polynomial integration in float64)."""
    if order - 1 > i:
        raise ValueError(f"lms: order {order} too high for step {i}")
    coef = [1.0]                                   # ascending powers of the basis polynomial
    for k in range(order):
        if k == j:
            continue
        root, scale = float(t[i - k]), 1.0 / (float(t[i - j]) - float(t[i - k]))
        nxt = [0.0] * (len(coef) + 1)              # (p(x) * (x - root)) * scale
        for n, c in enumerate(coef):
            nxt[n + 1] += c * scale
            nxt[n] -= c * root * scale
        coef = nxt

    def antideriv(x: float) -> float:
        return sum(c * x ** (n + 1) / (n + 1) for n, c in enumerate(coef))

    return antideriv(float(t[i + 1])) - antideriv(float(t[i]))


@torch.no_grad()
def sample_lms(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
               callback: Callback = None, disable: bool | None = None, order: int = 4) -> Tensor:
    """Linear multistep in sigma over the last `order` derivatives. As ComfyUI, the final step to
    sigma = 0 returns the denoised prediction (k-diffusion integrates to 0 instead)."""
    sig, args, _, s_in = _setup(x, sigmas, extra_args)
    ds: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        if sig[i + 1] == 0:
            x = denoised
            continue
        ds.append(to_d(x, sig[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        update = torch.zeros_like(x)
        for j, d in enumerate(reversed(ds)):
            update.add_(d, alpha=lms_coefficient(cur, sig, i, j))
        x = x + update
    return x
