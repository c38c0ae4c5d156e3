"""Sampler update rules in the k-diffusion convention (samplers.md section 4).

Every sampler is one function `sample_<name>(model, x, sigmas, extra_args=None, callback=None,
disable=None, ...) -> x` where `model(x, sigma[B], **extra_args) -> denoised` (sigma on the CPU) works in "sigma
space" (x = x0 + sigma * eps) and `sigmas` is a decreasing 1-D schedule. Loop state lives in locals.
Scalar coefficients are computed in Python floats (float64) from `sigmas.tolist()`: one host
sync per run, no tiny tensor ops per step. `callback(info)` gets {"x", "i", "sigma", "sigma_hat",
"denoised"} once per step. `disable` is accepted for k-diffusion compatibility (no progress bar).

Stochastic samplers draw from a noise sampler `fn(sigma, sigma_next) -> Tensor like x`; when none is
passed they build ComfyUI's from `extra_args["seed"]` (popped before the model sees extra_args):
ancestral steps use a device generator seeded with seed (seed + 1 on the CPU), SDE samplers a
torchsde Brownian tree with entropy = seed. `SAMPLERS` maps ComfyUI's names to the functions.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

Model = Callable[..., Tensor]
NoiseSampler = Callable[[float, float], Tensor]
Callback = Callable[[dict[str, Any]], None] | None


# --- helpers ----------------------------------------------------------------------------------


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): deterministic target and fresh-noise amount of an ancestral step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _setup(x: Tensor, sigmas: Tensor, extra_args: dict | None) -> tuple[list[float], dict, int | None, Tensor]:
    """(sigmas as floats, model kwargs without the seed, seed, ones[B] to build sigma vectors).
    The sigma vectors live on the CPU: reading them (range checks, timesteps) never waits for
    the accelerator; the denoiser moves them to x's device where it computes with them."""
    args = dict(extra_args or {})
    seed = args.pop("seed", None)
    return [float(s) for s in sigmas.tolist()], args, seed, torch.ones([x.shape[0]], dtype=x.dtype)


def default_noise_sampler(x: Tensor, seed: int | None = None) -> NoiseSampler:
    """ComfyUI's step noise: torch.randn(x.shape) from a generator on x's device, seeded with
    `seed`, or `seed + 1` on the CPU (so it differs from the initial noise); global RNG if None."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(((seed + 1) if x.device.type == "cpu" else seed) % 2 ** 64)
    shape, dtype, device = x.shape, x.dtype, x.device
    return lambda sigma, sigma_next: torch.randn(shape, dtype=dtype, device=device, generator=gen)


class BrownianTreeNoiseSampler:
    """Noise from torchsde Brownian trees over sigma: W(s0, s1) / sqrt(|s1 - s0|).

    `seed` an int: one tree for the whole batch (ComfyUI); a list of len B: one tree per image
    (A1111's per-image seeds). Trees live on the CPU unless cpu=False (ComfyUI's `_gpu` variants).
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float,
                 seed: int | Sequence[int] | None = None, cpu: bool = True) -> None:
        import torchsde  # the Brownian tree; only SDE samplers need it

        t0, t1 = sorted((float(sigma_min), float(sigma_max)))
        self.sign = 1.0 if float(sigma_min) < float(sigma_max) else -1.0
        self.device, self.dtype = x.device, x.dtype
        w0 = torch.zeros_like(x, device="cpu" if cpu else x.device)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, []).item())
        self.batched = isinstance(seed, Sequence)
        seeds = list(seed) if isinstance(seed, Sequence) else [seed]
        if self.batched:
            if len(seeds) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler: {len(seeds)} seeds for a batch of {x.shape[0]}")
            w0 = w0[0]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        s0, s1 = float(sigma), float(sigma_next)
        sign = 1.0 if s0 < s1 else -1.0
        a, b = (s0, s1) if s0 < s1 else (s1, s0)
        with warnings.catch_warnings():
            # torchsde stores the interval ends in float32 and warns when sigma_max, queried in
            # float64, lies a rounding error beyond them; the value returned is still correct
            warnings.simplefilter("ignore", UserWarning)
            w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return (w / abs(s1 - s0) ** 0.5).to(self.device, self.dtype)


class PrefetchedNoise:
    """Brownian-tree noise for the steps' (sigma, sigma_next) pairs, computed ahead in a thread.

    A tree query is a few milliseconds of Python; the pairs an SDE sampler asks for at its step
    ends are known before sampling starts, so a worker thread answers them while the model runs.
    Other queries (midpoints) are answered directly. Tree values do not depend on query order,
    so results are identical to querying in the loop; one lock serialises access to the trees."""

    def __init__(self, base: BrownianTreeNoiseSampler, pairs: Sequence[tuple[float, float]]) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.ready: dict[tuple[float, float], threading.Event] = {(float(a), float(b)): threading.Event()
                                                                   for a, b in pairs}
        self.values: dict[tuple[float, float], Tensor] = {}
        self.thread = threading.Thread(target=self._fill, name="easel-brownian-prefetch", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        for key, event in self.ready.items():
            try:
                with self.lock:
                    self.values[key] = self.base(*key)
            finally:
                event.set()

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        key = (float(sigma), float(sigma_next))
        event = self.ready.get(key)
        if event is not None:
            event.wait()
            value = self.values.pop(key, None)
            if value is not None:
                return value
        with self.lock:
            return self.base(*key)


def _tree_sampler(x: Tensor, sig: list[float], seed: int | None, cpu: bool = True,
                  midpoint_r: float | None = None) -> NoiseSampler:
    """Brownian-tree noise with the step-end pairs (and, for two-stage samplers, the pairs to the
    log-sigma midpoint at fraction `midpoint_r`, computed exactly as the sampler does) prefetched."""
    positive = [s for s in sig if s > 0]
    tree = BrownianTreeNoiseSampler(x, min(positive), max(sig), seed=seed, cpu=cpu)
    pairs: list[tuple[float, float]] = []
    for a, b in zip(sig[:-1], sig[1:]):
        if b > 0:
            if midpoint_r is not None:
                t, t_next = -math.log(a), -math.log(b)
                pairs.append((a, math.exp(-(t + (t_next - t) * midpoint_r))))
            pairs.append((a, b))
    return PrefetchedNoise(tree, pairs)


def _info(x: Tensor, i: int, sigma: float, denoised: Tensor, sigma_hat: float | None = None) -> dict:
    return {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
            "denoised": denoised}


# --- Euler / Heun / DPM2 family ---------------------------------------------------------------


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


# --- names ------------------------------------------------------------------------------------


def _variant(fn: Callable[..., Tensor], **fixed: Any) -> Callable[..., Tensor]:
    def sampler(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callback = None, disable: bool | None = None, **kw: Any) -> Tensor:
        return fn(model, x, sigmas, extra_args, callback, disable, **{**fixed, **kw})
    sampler.__name__ = fn.__name__ + "_" + "_".join(f"{k}_{v}" for k, v in fixed.items())
    sampler.__doc__ = f"{fn.__name__} with {fixed}."
    return sampler


# ComfyUI's KSampler names (its order), restricted to the ones implemented here
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": _variant(sample_dpmpp_sde, cpu_tree=False),
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": _variant(sample_dpmpp_2m_sde, cpu_tree=False),
    "dpmpp_2m_sde_heun": _variant(sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_2m_sde_heun_gpu": _variant(sample_dpmpp_2m_sde, solver_type="heun", cpu_tree=False),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": _variant(sample_dpmpp_3m_sde, cpu_tree=False),
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "ddim": sample_euler,          # ComfyUI: Euler, plus "random" inpaint noise (diffusion.sample)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

# ComfyUI computes the schedule for steps + 1 and drops the last non-zero sigma for these
DISCARD_PENULTIMATE_SIGMA: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def get_sampler(name: str) -> Callable[..., Tensor]:
    fn = SAMPLERS.get(name)
    if fn is None:
        raise ValueError(f"diffusion.samplers: unknown sampler {name!r}; expected one of "
                         f"{', '.join(SAMPLER_NAMES)}")
    return fn
