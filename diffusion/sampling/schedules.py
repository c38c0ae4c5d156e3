"""The DDPM sigma table and the sigma schedules (samplers.md sections 1 and 3).

A schedule is a pure function returning a 1-D tensor of `steps + 1` decreasing sigmas that ends
in 0 (exceptions are noted per function). Table-based schedules take the model's sigma table
(`sigmas_from_alphas_cumprod`), an increasing Tensor[1000]; the others take sigma_min/sigma_max.
`SCHEDULERS` maps ComfyUI's scheduler names to `fn(table, steps) -> sigmas`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# --- 1. the discrete DDPM schedule ----------------------------------------------------------


def ddpm_betas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """SD's "linear" (diffusers: scaled_linear) betas: linspace of square roots, squared. float64."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_i = prod_{j<=i} (1 - beta_j)."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i): increasing Tensor[N]. Computed in float64
    and stored in `dtype` (ComfyUI keeps float32)."""
    ac = alphas_cumprod.double()
    return (((1.0 - ac) / ac) ** 0.5).to(dtype)


def rescale_zero_terminal_snr(sigmas: Tensor) -> Tensor:
    """Zero-terminal-SNR rescale of an increasing sigma table (samplers.md 1.3; Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1), in float64:
    sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2) is shifted so its last value is 0 and scaled so its first
    is unchanged; the last alpha_bar is then set to 4.8973451890853435e-08 (as ComfyUI) so that
    sigma_max stays finite (~4518.76)."""
    s = sigmas.double()
    sqrt_ab = 1.0 / torch.sqrt(1.0 + s * s)                 # [N], decreasing
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab * sqrt_ab
    ab[-1] = 4.8973451890853435e-08
    return (((1.0 - ab) / ab) ** 0.5).to(sigmas.dtype)


def default_sigma_table(dtype: torch.dtype = torch.float32) -> Tensor:
    """The SD1/SD2/SDXL training table (sigma_min 0.0291672, sigma_max 14.6146)."""
    return sigmas_from_alphas_cumprod(alphas_cumprod_from_betas(ddpm_betas()), dtype)


def sigma_to_t(table: Tensor, sigma: Tensor, quantize: bool = True) -> Tensor:
    """Timestep of `sigma` (any shape). quantize=True: ComfyUI's nearest table entry in log space
    (an integer, returned as float); False: k-diffusion's fractional t, linear in log sigma."""
    log_table = table.log()
    log_sigma = sigma.to(table.dtype).log()
    dists = log_sigma.reshape(1, -1) - log_table.reshape(-1, 1)        # [N, numel]
    if quantize:
        return dists.abs().argmin(dim=0).reshape(sigma.shape).to(table.dtype)
    # interval containing log sigma: last index whose log sigma is <= it (clamped to [0, N-2])
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=table.shape[0] - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def t_to_sigma(table: Tensor, t: Tensor) -> Tensor:
    """sigma(t) for fractional t in [0, N-1]: log-linear interpolation of the table."""
    log_table = table.log()
    t = t.to(table.dtype).clamp(0, table.shape[0] - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t - t.floor()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def percent_to_sigma(table: Tensor, percent: float) -> float:
    """ComfyUI's start_percent/end_percent -> sigma (0 % -> above any sigma, 100 % -> 0)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    t = torch.tensor((1.0 - percent) * (table.shape[0] - 1), dtype=table.dtype)
    return float(t_to_sigma(table, t))


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# --- 3. schedules -------------------------------------------------------------------------------


def normal(table: Tensor, steps: int) -> Tensor:
    """t linspace(t(sigma_max), t(sigma_min), steps), sigma(t), append 0 (k-diffusion get_sigmas).
    Zero-terminal-SNR tables (sigma(t_end) ~ 0) take steps + 1 points and no appended 0."""
    t_start = float(sigma_to_t(table, table[-1:]))
    t_end = float(sigma_to_t(table, table[:1]))
    if math.isclose(float(t_to_sigma(table, torch.tensor(t_end))), 0.0, abs_tol=1e-5):
        t = torch.linspace(t_start, t_end, steps + 1, dtype=table.dtype)
        return t_to_sigma(table, t)
    t = torch.linspace(t_start, t_end, steps, dtype=table.dtype)
    return _append_zero(t_to_sigma(table, t))


def sgm_uniform(table: Tensor, steps: int) -> Tensor:
    """t = linspace(999, 0, steps + 1) without its last point; sigma(t); append 0."""
    t_start = float(sigma_to_t(table, table[-1:]))
    t_end = float(sigma_to_t(table, table[:1]))
    t = torch.linspace(t_start, t_end, steps + 1, dtype=table.dtype)[:-1]
    return _append_zero(t_to_sigma(table, t))


def simple(table: Tensor, steps: int) -> Tensor:
    """sigma_k = table[-(1 + int(k * N / steps))], k = 0..steps-1; append 0."""
    stride = table.shape[0] / steps
    idx = [table.shape[0] - 1 - int(k * stride) for k in range(steps)]
    return _append_zero(table[idx])


def ddim_uniform(table: Tensor, steps: int) -> Tensor:
    """table[1], table[1 + c], ... (c = max(N // steps, 1)) reversed, then 0. Gives ceil(999 / c)
    steps, more than `steps` when N is not a multiple (n = 7 -> 8 steps)."""
    c = max(table.shape[0] // steps, 1)
    idx = list(range(1, table.shape[0], c))
    if math.isclose(float(table[1]), 0.0, abs_tol=1e-5):   # zsnr-like table: no extra 0
        idx = list(range(1, table.shape[0], max(table.shape[0] // (steps + 1), 1)))
        return table[idx].flip(0)
    return _append_zero(table[idx].flip(0))


def beta(table: Tensor, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> Tensor:
    """ComfyUI's beta schedule: t_k = rint(ppf_Beta(a, b)(1 - k/steps) * (N - 1)), table[t_k]
    dropping repeats, append 0 (may give fewer than `steps` steps). Needs scipy."""
    import numpy as np
    from scipy import stats

    total = table.shape[0] - 1
    u = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    ts = np.rint(stats.beta.ppf(u, alpha, beta_) * total)
    idx: list[int] = []
    for t in ts:
        if not idx or int(t) != idx[-1]:
            idx.append(int(t))
    return _append_zero(table[idx])


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """(sigma_max^(1/rho) + k/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho; append 0."""
    ramp = torch.linspace(0, 1, steps, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(steps: int, sigma_min: float, sigma_max: float,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """exp(linspace(log sigma_max, log sigma_min, steps)); append 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=dtype).exp())


def polyexponential(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """exp(r^rho (log sigma_max - log sigma_min) + log sigma_min), r = linspace(1, 0); append 0."""
    r = torch.linspace(1, 0, steps, dtype=dtype) ** rho
    lmin, lmax = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((r * (lmax - lmin) + lmin).exp())


def kl_optimal(steps: int, sigma_min: float, sigma_max: float,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """tan(w atan sigma_min + (1 - w) atan sigma_max), w = k/(steps-1); append 0 (ComfyUI)."""
    w = torch.linspace(0, 1, steps, dtype=dtype)
    return _append_zero(torch.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)))


def linear_quadratic(steps: int, sigma_max: float, threshold_noise: float = 0.025,
                     linear_steps: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Mochi's schedule (linear then quadratic in 1 - sigma/sigma_max), scaled by sigma_max."""
    if steps == 1:
        return torch.tensor([1.0, 0.0], dtype=dtype) * sigma_max
    lin = steps // 2 if linear_steps is None else linear_steps
    head = [i * threshold_noise / lin for i in range(lin)]
    diff = lin - threshold_noise * steps
    quad = steps - lin
    qa = diff / (lin * quad ** 2)
    qb = threshold_noise / lin - 2 * diff / quad ** 2
    qc = qa * lin ** 2
    tail = [qa * i ** 2 + qb * i + qc for i in range(lin, steps)]
    return torch.tensor([1.0 - v for v in head + tail + [1.0]], dtype=dtype) * sigma_max


def discard_penultimate(sigmas: Tensor) -> Tensor:
    """Drop the last non-zero sigma: [..., s_{n-1}, s_n, 0] -> [..., s_{n-1}, 0]."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])


# --- names ------------------------------------------------------------------------------------

Scheduler = Callable[[Tensor, int], Tensor]


def _ends(table: Tensor) -> tuple[float, float]:
    return float(table[0]), float(table[-1])


SCHEDULERS: dict[str, Scheduler] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": lambda table, n: karras(n, *_ends(table), dtype=table.dtype),
    "exponential": lambda table, n: exponential(n, *_ends(table), dtype=table.dtype),
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": lambda table, n: linear_quadratic(n, float(table[-1]), dtype=table.dtype),
    "kl_optimal": lambda table, n: kl_optimal(n, *_ends(table), dtype=table.dtype),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def calculate_sigmas(table: Tensor, scheduler: str, steps: int) -> Tensor:
    """The schedule named `scheduler` for `steps` steps on this sigma table."""
    fn = SCHEDULERS.get(scheduler)
    if fn is None:
        raise ValueError(f"diffusion.sampling.schedules: unknown scheduler {scheduler!r}; expected one of "
                         f"{', '.join(SCHEDULER_NAMES)}")
    if steps < 1:
        raise ValueError(f"diffusion.sampling.schedules: steps must be >= 1, got {steps}")
    return fn(table, steps)
