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

The functions live by family in samplers_classic (Euler, Heun, DPM2, LMS), samplers_dpm (DPM-Solver,
DPM-Solver++) and samplers_multistep (iPNDM, DEIS, DDPM, LCM, UniPC), the shared helpers and noise
samplers in sampler_common; this module names them (and re-exports them).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffusion.sampling.samplers.classic import (  # noqa: F401
    lms_coefficient,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_heunpp2,
    sample_lms,
)
from diffusion.sampling.samplers.common import (  # noqa: F401
    BrownianTreeNoiseSampler,
    Callback,
    Model,
    NoiseSampler,
    PrefetchedNoise,
    _tree_sampler,
    ancestral_step,
    default_noise_sampler,
    to_d,
)
from diffusion.sampling.samplers.dpm import (  # noqa: F401
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from diffusion.sampling.samplers.multistep import (  # noqa: F401
    deis_coefficients,
    ipndm_v_coefficients,
    sample_ddpm,
    sample_deis,
    sample_ipndm,
    sample_ipndm_v,
    sample_lcm,
    sample_uni_pc,
    sample_uni_pc_bh2,
)

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
    "ddim": sample_euler,          # ComfyUI: Euler, plus "random" inpaint noise (diffusion.sampling.sample)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

# ComfyUI computes the schedule for steps + 1 and drops the last non-zero sigma for these
DISCARD_PENULTIMATE_SIGMA: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def get_sampler(name: str) -> Callable[..., Tensor]:
    fn = SAMPLERS.get(name)
    if fn is None:
        raise ValueError(f"diffusion.sampling.samplers.registry: unknown sampler {name!r}; expected one of "
                         f"{', '.join(SAMPLER_NAMES)}")
    return fn
