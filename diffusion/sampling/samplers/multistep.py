"""Multistep and distilled-model update rules: iPNDM, DEIS, DDPM, LCM, UniPC (k-diffusion
convention, see diffusion.sampling.samplers.registry)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from diffusion.sampling.samplers.common import (
    Callback,
    Model,
    NoiseSampler,
    _info,
    _setup,
    default_noise_sampler,
    to_d,
)


@torch.no_grad()
def sample_ipndm(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callback = None, disable: bool | None = None, max_order: int = 4) -> Tensor:
    """Improved PNDM: Adams-Bashforth steps in sigma on the last derivatives with the fixed
    (equal-step) coefficients of order 1..4: AB2 (3, -1)/2, AB3 (23, -16, 5)/12,
    AB4 (55, -59, 37, -9)/24; the step to sigma = 0 returns the prediction."""
    sig, args, _, s_in = _setup(x, sigmas, extra_args)
    coeffs = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
              4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    if not 1 <= max_order <= 4:
        raise ValueError(f"ipndm: max_order must be 1..4, got {max_order}")
    history: list[Tensor] = []            # previous derivatives, newest last
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        d = to_d(x, sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            c = coeffs[min(max_order, i + 1)]
            slope = d * c[0]
            for ck, dk in zip(c[1:], reversed(history)):
                slope = slope + dk * ck
            x = x + slope * (sig[i + 1] - sig[i])
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def ipndm_v_coefficients(sig: Sequence[float], i: int, order: int) -> tuple[float, ...]:
    """ComfyUI's (zju-pi diff-solvers) variable-step iPNDM coefficients for step i, newest first.
    h_n = sigma_{i+1} - sigma_i and h_{n-k} the previous step sizes. Orders 2 and 3 are the
    variable-step Adams-Bashforth weights; order 4 keeps the upstream formula as it is (on equal
    steps it gives (57, -65, 43, -11) / 24, not AB4's (55, -59, 37, -9) / 24, and on unequal
    steps its weights do not sum to 1)."""
    h = sig[i + 1] - sig[i]
    h1 = sig[i] - sig[i - 1]
    if order == 2:
        return (2 + h / h1) / 2, -(h / h1) / 2
    h2 = sig[i - 1] - sig[i - 2]
    t1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return (2 + h / h1) / 2 + t1, -(h / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2
    h3 = sig[i - 2] - sig[i - 3]
    t2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
          * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return ((2 + h / h1) / 2 + t1 + t2,
            -(h / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2)


@torch.no_grad()
def sample_ipndm_v(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                   callback: Callback = None, disable: bool | None = None, max_order: int = 4) -> Tensor:
    """iPNDM with coefficients from the actual sigma spacing (ipndm_v_coefficients)."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"ipndm_v: max_order must be 1..4, got {max_order}")
    sig, args, _, s_in = _setup(x, sigmas, extra_args)
    history: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        d = to_d(x, sig[i], denoised)
        order = min(max_order, i + 1)
        if sig[i + 1] == 0:
            x = denoised
        elif order == 1:
            x = x + d * (sig[i + 1] - sig[i])
        else:
            c = ipndm_v_coefficients(sig, i, order)
            slope = d * c[0]
            for ck, dk in zip(c[1:], reversed(history)):
                slope = slope + dk * ck
            x = x + slope * (sig[i + 1] - sig[i])
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def deis_coefficients(sig: Sequence[float], max_order: int, n: int = 10000) -> list[list[float]]:
    """DEIS "tab" coefficients (ComfyUI / zju-pi): sigmas mapped to the time t of a VP SDE fitted to
    EDM's range (sigma_min 0.002, sigma_max 80, eps_s 1e-3); for step i of order p the weights are
    sum over n points tau of linspace(t_i, t_{i+1}) of dsigma/dtau(tau) * L_j(tau) * (t_{i+1} - t_i)/n,
    L_j the Lagrange basis on t_i, ..., t_{i-p+1}, dsigma/dtau = -0.5 dlog(a)/dtau / sqrt(a (1 - a)),
    a(tau) = exp(-0.5 tau^2 (beta_1 - beta_0) - tau beta_0)."""
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(smin ** 2 + 1) / eps_s - math.log(smax ** 2 + 1)) / (eps_s - 1)
    beta_0 = math.log(smax ** 2 + 1) - 0.5 * beta_d
    beta_1 = beta_d + beta_0
    s = np.asarray(sig, dtype=np.float64)
    t = (np.sqrt(beta_0 ** 2 + 2 * beta_d * np.log(s ** 2 + 1)) - beta_0) / beta_d
    out: list[list[float]] = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        if order == 1 or s[i + 1] <= 0:       # Euler steps (the step to sigma = 0 included)
            out.append([])
            continue
        taus = np.linspace(t[i], t[i + 1], n)
        dtau = (t[i + 1] - t[i]) / n
        a = np.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        integrand = -0.5 * (-taus * (beta_1 - beta_0) - beta_0) / np.sqrt(a * (1 - a))
        nodes = [t[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = np.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly = poly * (taus - nodes[k]) / (nodes[j] - nodes[k])
            row.append(float(np.sum(integrand * poly) * dtau))
        out.append(row)
    return out


@torch.no_grad()
def sample_deis(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callback = None, disable: bool | None = None, max_order: int = 3) -> Tensor:
    """DEIS (tab): exponential-integrator multistep with precomputed weights (deis_coefficients);
    Euler on the first step and on the step to sigma = 0."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"deis: max_order must be 1..4, got {max_order}")
    sig, args, _, s_in = _setup(x, sigmas, extra_args)
    coeffs = deis_coefficients(sig, max_order)
    history: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        d = to_d(x, sig[i], denoised)
        order = 1 if sig[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x = x + d * (sig[i + 1] - sig[i])
        else:
            c = coeffs[i]
            x = x + d * c[0]
            for ck, dk in zip(c[1:order], reversed(history)):
                x = x + dk * ck
        history = (history + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


# --- DDPM, LCM (ComfyUI) ----------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callback = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Ancestral DDPM posterior steps in VP space (x_vp = x / sqrt(1 + sigma^2)), with
    alpha_bar = 1 / (1 + sigma^2) at the schedule's sigmas."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        eps = (x - denoised) / sig[i]
        x_vp = x / (1.0 + sig[i] ** 2) ** 0.5
        ac, ac_prev = 1 / (sig[i] ** 2 + 1), 1 / (sig[i + 1] ** 2 + 1)
        alpha = ac / ac_prev
        # posterior mean: (x_t - (1 - a) / sqrt(1 - alpha_bar) * eps) / sqrt(a)
        x = (1.0 / alpha) ** 0.5 * (x_vp - ((1 - alpha) / (1 - ac) ** 0.5) * eps)
        if sig[i + 1] > 0:
            x = x + noise_sampler(sig[i], sig[i + 1]) * ((1 - alpha) * (1 - ac_prev) / (1 - ac)) ** 0.5
            x = x * (1.0 + sig[i + 1] ** 2) ** 0.5
    return x


@torch.no_grad()
def sample_lcm(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
               callback: Callback = None, disable: bool | None = None,
               noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Latent-consistency sampling: jump to the prediction, re-noise to the next sigma."""
    sig, args, seed, s_in = _setup(x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed)
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i] * s_in, **args)
        if callback is not None:
            callback(_info(x, i, sig[i], denoised))
        x = denoised
        if sig[i + 1] > 0:
            x = x + noise_sampler(sig[i], sig[i + 1]) * sig[i + 1]
    return x


# --- UniPC (ComfyUI's uni_pc / uni_pc_bh2) ---------------------------------------------------


def _unipc_step(model: Callable[[Tensor, float], Tensor], x: Tensor, prev_d: list[Tensor],
                prev_s: list[float], s_t: float, order: int, variant: str, use_corrector: bool
                ) -> tuple[Tensor, Tensor | None]:
    """One UniPC-bh multistep update in VP space (x_vp = alpha x, alpha = 1/sqrt(1+sigma^2)) with
    data prediction D. prev_d/prev_s: the last predictions and their sigmas, newest last.
    Returns (x at s_t, the model output at the predicted point or None without corrector)."""
    def alpha(s: float) -> float:
        return 1.0 / math.sqrt(1.0 + s * s)

    s0, d0 = prev_s[-1], prev_d[-1]
    h = math.log(s0) - math.log(s_t)                     # lambda = -log sigma
    rks: list[float] = []
    d1s: list[Tensor] = []
    for k in range(1, order):
        rk = (math.log(s0) - math.log(prev_s[-(k + 1)])) / h
        rks.append(rk)
        d1s.append((prev_d[-(k + 1)] - d0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    # b_k = h phi_{k+1}(h) k! / B(h) by the recurrence phi_{k+1} = (phi_k - 1/k!) / h
    r_rows, b = [], []
    h_phi_k = math.expm1(hh) / hh - 1
    fact = 1
    for k in range(1, order + 1):
        r_rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, bv = np.array(r_rows, dtype=np.float64), np.array(b, dtype=np.float64)
    sigma_vp_ratio = (s_t * alpha(s_t)) / (s0 * alpha(s0))
    a_t = alpha(s_t)
    x_t_ = sigma_vp_ratio * x - (a_t * h_phi_1) * d0
    if d1s:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], bv[:-1]).tolist()
        pred_res = sum(rho * d for rho, d in zip(rhos_p, d1s))
        x_t = x_t_ - (a_t * b_h) * pred_res
    else:
        x_t = x_t_
    if not use_corrector:
        return x_t, None
    rhos_c = [0.5] if order == 1 else np.linalg.solve(R, bv).tolist()
    model_t = model(x_t, s_t)
    corr = (model_t - d0) * rhos_c[-1]
    for rho, d in zip(rhos_c[:-1], d1s):
        corr = corr + rho * d
    return x_t_ - (a_t * b_h) * corr, model_t


@torch.no_grad()
def sample_uni_pc(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                  callback: Callback = None, disable: bool | None = None, variant: str = "bh1") -> Tensor:
    """UniPC multistep predictor-corrector (data prediction, order min(3, steps - 1), lower order
    at the start and end, corrector after every step but the last). Runs in VP space; a final
    sigma of 0 is replaced by 0.001 and the result divided by alpha(0.001), as ComfyUI does.
    `steps` model calls."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"uni_pc: variant must be 'bh1' or 'bh2', got {variant!r}")
    sig, args, _, s_in = _setup(x, sigmas, extra_args)
    if sig[-1] == 0:
        sig[-1] = 0.001
    steps = len(sig) - 1
    order = min(3, len(sig) - 2)

    def data(x_vp: Tensor, s: float) -> Tensor:      # D of the k-space point x_vp / alpha
        return model(x_vp * math.sqrt(1.0 + s * s), s * s_in, **args)

    x = x / math.sqrt(1.0 + sig[0] ** 2)
    prev_d = [data(x, sig[0])]
    prev_s = [sig[0]]
    if callback is not None:
        callback(_info(x, 0, sig[0], prev_d[-1]))
    for step_index in range(1, steps):
        if step_index < order:
            x, m = _unipc_step(data, x, prev_d, prev_s, sig[step_index], step_index, variant, True)
            prev_d.append(m if m is not None else data(x, sig[step_index]))
            prev_s.append(sig[step_index])
        else:
            last = step_index + (1 if step_index == steps - 1 else 0)
            for step in range(step_index, last + 1):
                step_order = min(order, steps + 1 - step)
                x, m = _unipc_step(data, x, prev_d, prev_s, sig[step], step_order, variant, step != steps)
                prev_d, prev_s = prev_d[1:] + prev_d[-1:], prev_s[1:] + [sig[step]]
                if step < steps:
                    prev_d[-1] = m if m is not None else data(x, sig[step])
        if callback is not None:
            callback(_info(x, step_index, sig[step_index], prev_d[-1]))
    return x * math.sqrt(1.0 + sig[-1] ** 2)


def sample_uni_pc_bh2(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                      callback: Callback = None, disable: bool | None = None) -> Tensor:
    return sample_uni_pc(model, x, sigmas, extra_args, callback, disable, variant="bh2")
