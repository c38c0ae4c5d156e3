"""Shared pieces of the samplers (samplers.md section 4): the model / callback types, the
derivative and ancestral-step helpers, argument set-up, and the noise samplers (ComfyUI's seeded
default and torchsde Brownian trees). The update rules live in samplers_classic, samplers_dpm and
samplers_multistep; diffusion.sampling.samplers.registry maps names to them.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

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
