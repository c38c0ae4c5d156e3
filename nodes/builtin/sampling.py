"""Sampling nodes with ComfyUI's class names, inputs and input order: KSampler, KSamplerAdvanced,
and the split form SamplerCustom / SamplerCustomAdvanced / KSamplerSelect / BasicScheduler /
RandomNoise / DisableNoise / CFGGuider / BasicGuider / SplitSigmas.

Each node calls diffusion.sampling.sample; per step the callback checks for an interrupt and reports
progress with a latent preview (graph.runtime). Values: SAMPLER = diffusion.sampling.sample.SamplerChoice,
SIGMAS = Tensor[n + 1], NOISE = diffusion.sampling.sample.NoiseSpec, GUIDER = diffusion.sampling.sample.Guider.
"""
from __future__ import annotations

from typing import Any

import torch

from diffusion.images.latent_preview import make_previewer
from diffusion.sampling import sample as sampling
from diffusion.sampling.samplers.registry import SAMPLER_NAMES
from diffusion.sampling.schedules import SCHEDULER_NAMES, calculate_sigmas
from graph.runtime import current
from nodes.folders import current_folders

SEED_MAX = 0xFFFFFFFFFFFFFFFF
Latent = dict[str, Any]


def step_callback(model: Any) -> sampling.StepCallback:
    """Per step: honour an interrupt, then report progress with a preview of the denoised latent
    (the runtime's preview_method: TAESD from models/vae_approx, the latent2rgb projection, none)."""
    rt = current()
    rt.check_interrupt()
    family = getattr(getattr(getattr(model, "model", None), "family", None), "name", "sd1")
    folders = rt.folders if rt.folders is not None else current_folders()
    previewer = make_previewer(rt.preview_method, family, folders.dirs("vae_approx") if folders else (), rt.warn)

    def cb(step: int, total: int, x0: torch.Tensor, x: torch.Tensor) -> None:
        rt.check_interrupt()
        rt.progress(min(step + 1, total), total, previewer(x0) if previewer is not None else None)
    return cb


def _common_inputs() -> dict[str, Any]:
    return {
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (list(SAMPLER_NAMES),),
        "scheduler": (list(SCHEDULER_NAMES),),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
    }


class KSampler:
    """Denoise a latent with a sampler, a schedule and classifier-free guidance."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            **_common_inputs(),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."

    def sample(self, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: list, negative: list, latent_image: Latent, denoise: float = 1.0) -> tuple[Latent]:
        return (sampling.sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, denoise=denoise, callback=step_callback(model)),)


class KSamplerAdvanced:
    """KSampler with start/end steps, optional noise and leftover noise (base -> refiner hand-off)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        common = _common_inputs()
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            **common,
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model: Any, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, positive: list, negative: list, latent_image: Latent, start_at_step: int,
               end_at_step: int, return_with_leftover_noise: str, denoise: float = 1.0) -> tuple[Latent]:
        return (sampling.sample(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, denoise=denoise, start_step=start_at_step, end_step=end_at_step,
                                add_noise=add_noise != "disable",
                                return_with_leftover_noise=return_with_leftover_noise == "enable",
                                callback=step_callback(model)),)


class KSamplerSelect:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"sampler_name": (list(SAMPLER_NAMES),)}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"

    def get_sampler(self, sampler_name: str) -> tuple[sampling.SamplerChoice]:
        choice = sampling.SamplerChoice(sampler_name)
        choice.function()                   # unknown names fail here, naming the sampler
        return (choice,)


class BasicScheduler:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "scheduler": (list(SCHEDULER_NAMES),),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"

    def get_sigmas(self, model: Any, scheduler: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        # ComfyUI: no discard-penultimate here; denoise < 1 keeps the tail of a longer schedule
        if denoise <= 0.0:
            return (torch.zeros([0]),)
        total = steps if denoise >= 1.0 else int(steps / denoise)
        sigmas = calculate_sigmas(sampling.model_sampling(model).sigmas, scheduler, total)
        return (sigmas[-(steps + 1):],)


class SplitSigmas:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"sigmas": ("SIGMAS",), "step": ("INT", {"default": 0, "min": 0, "max": 10000})}}

    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/sigmas"

    def get_sigmas(self, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sigmas[:step + 1], sigmas[step:]


class RandomNoise:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
        }}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"

    def get_noise(self, noise_seed: int) -> tuple[sampling.NoiseSpec]:
        return (sampling.NoiseSpec(int(noise_seed)),)


class DisableNoise:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"

    def get_noise(self) -> tuple[sampling.NoiseSpec]:
        return (sampling.NoiseSpec(0, enabled=False),)


class CFGGuider:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        }}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model: Any, positive: list, negative: list, cfg: float) -> tuple[sampling.Guider]:
        return (sampling.Guider(model, positive, negative, float(cfg)),)


class BasicGuider:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"

    def get_guider(self, model: Any, conditioning: list) -> tuple[sampling.Guider]:
        return (sampling.Guider(model, conditioning, [], 1.0),)


class SamplerCustom:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "add_noise": ("BOOLEAN", {"default": True}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }}

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"

    def sample(self, model: Any, add_noise: bool, noise_seed: int, cfg: float, positive: list, negative: list,
               sampler: sampling.SamplerChoice, sigmas: torch.Tensor, latent_image: Latent) -> tuple[Latent, Latent]:
        guider = sampling.Guider(model, positive, negative, float(cfg))
        noise = sampling.NoiseSpec(int(noise_seed), enabled=bool(add_noise))
        return sampling.sample_custom(guider, noise, sampler, sigmas, latent_image, callback=step_callback(model))


class SamplerCustomAdvanced:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "noise": ("NOISE",),
            "guider": ("GUIDER",),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }}

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"

    def sample(self, noise: sampling.NoiseSpec, guider: sampling.Guider, sampler: sampling.SamplerChoice,
               sigmas: torch.Tensor, latent_image: Latent) -> tuple[Latent, Latent]:
        return sampling.sample_custom(guider, noise, sampler, sigmas, latent_image, callback=step_callback(guider.model))


NODE_CLASS_MAPPINGS = {
    "KSampler": KSampler,
    "KSamplerAdvanced": KSamplerAdvanced,
    "KSamplerSelect": KSamplerSelect,
    "BasicScheduler": BasicScheduler,
    "SplitSigmas": SplitSigmas,
    "RandomNoise": RandomNoise,
    "DisableNoise": DisableNoise,
    "CFGGuider": CFGGuider,
    "BasicGuider": BasicGuider,
    "SamplerCustom": SamplerCustom,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KSampler": "KSampler",
    "KSamplerAdvanced": "KSampler (Advanced)",
    "KSamplerSelect": "KSamplerSelect",
    "BasicScheduler": "BasicScheduler",
    "SplitSigmas": "SplitSigmas",
    "RandomNoise": "RandomNoise",
    "DisableNoise": "DisableNoise",
    "CFGGuider": "CFGGuider",
    "BasicGuider": "BasicGuider",
    "SamplerCustom": "SamplerCustom",
    "SamplerCustomAdvanced": "SamplerCustomAdvanced",
}
