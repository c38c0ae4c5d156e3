"""Initial noise for sampling, by ComfyUI's and A1111's conventions (samplers.md section 7).

ComfyUI: one CPU generator seeded with the seed, one randn of the whole latent batch [B, C, h, w]
(so the same seed gives ComfyUI's noise); with a LATENT `batch_index` list, [1, C, h, w] draws for
indices 0..max in order and the requested ones picked. A fresh torch.Generator is used instead of
the global one (same numbers, no global side effect).
A1111: image i has its own seed (seed + i) and its own generator; its noise is randn([C, h, w]).
Step noise of stochastic samplers is built by the samplers (diffusion.sampling.samplers.registry) from the seed, or,
in A1111 mode, from the per-image seeds via `per_image_noise_sampler`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SEED_MAX = 2 ** 64 - 1


def _generator(seed: int) -> torch.Generator:
    if not 0 <= int(seed) <= SEED_MAX:
        raise ValueError(f"diffusion.sampling.noise: seed must be in 0..2^64-1, got {seed}")
    return torch.Generator(device="cpu").manual_seed(int(seed))


def prepare_noise(latent: Tensor, seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """ComfyUI's initial noise for `latent` [B, C, h, w] (CPU, the latent's dtype)."""
    gen = _generator(seed)
    shape = list(latent.shape)
    if not batch_index:
        return torch.randn(shape, generator=gen, dtype=latent.dtype, device="cpu")
    wanted = [int(i) for i in batch_index]
    if min(wanted) < 0:
        raise ValueError(f"diffusion.sampling.noise: batch_index entries must be >= 0, got {wanted}")
    draws: dict[int, Tensor] = {}
    for i in range(max(wanted) + 1):
        n = torch.randn([1] + shape[1:], generator=gen, dtype=latent.dtype, device="cpu")
        if i in wanted:
            draws[i] = n
    return torch.cat([draws[i] for i in wanted], dim=0)


def a1111_seeds(seed: int, batch: int) -> list[int]:
    """Per-image seeds of an A1111 batch: seed, seed + 1, ..."""
    return [(int(seed) + i) % (SEED_MAX + 1) for i in range(batch)]


def prepare_noise_a1111(latent: Tensor, seeds: Sequence[int]) -> Tensor:
    """A1111's CPU-RNG initial noise: image i = randn([C, h, w]) from a generator seeded seeds[i]."""
    if len(seeds) != latent.shape[0]:
        raise ValueError(f"diffusion.sampling.noise: {len(seeds)} seeds for a latent batch of {latent.shape[0]}")
    return torch.stack([torch.randn(list(latent.shape[1:]), generator=_generator(s), dtype=latent.dtype)
                        for s in seeds])


def per_image_noise_sampler(x: Tensor, seeds: Sequence[int], skip: int = 1) -> Callable[[float, float], Tensor]:
    """Step noise from one CPU generator per image (A1111), moved to x's device. `skip` draws of
    x's per-image shape are discarded first, so with skip=1 the generators continue after the
    initial noise of `prepare_noise_a1111`, as A1111's do."""
    gens = [_generator(s) for s in seeds]
    shape, dtype, device = list(x.shape[1:]), x.dtype, x.device
    for g in gens:
        for _ in range(skip):
            torch.randn(shape, generator=g, dtype=dtype)

    def sample(sigma: float, sigma_next: float) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]).to(device)
    return sample
