"""The one sampling entry point nodes call (ComfyUI's common_ksampler / KSampler / KSAMPLER).

`sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, ...)`:
1. sigmas: the scheduler on the model's table (steps + 1 and discard-penultimate for dpm_2,
   dpm_2_ancestral, uni_pc*); denoise < 1 computes int(steps / denoise) steps and keeps the last
   steps + 1 sigmas; end_step cuts the tail (its last sigma forced to 0 unless leftover noise is
   kept); start_step drops the head (past the end: the latent is returned unchanged).
2. noise: ComfyUI's (one CPU generator for the batch, batch_index aware) or A1111's per-image
   seeds; zeros when add_noise is off. x = latent + noise * sigma_0 (sqrt(1 + sigma_0^2) at sigma_max).
3. the CFG denoiser (diffusion.sampling.denoiser) with noise_mask handling, the sampler from SAMPLERS, the
   model patched onto its device for the run. It stays patched afterwards, as in ComfyUI: the next
   run re-patches only the weights whose records differ (a strength change costs one pass over
   the weights it touches, not a restore plus a patch), and the originals are kept aside until
   another patch set or `unpatch_model` needs them.
The LATENT's samples are VAE latents, as in ComfyUI: multiplied by the model's latent scale factor
before sampling (process_latent_in) and divided after (process_latent_out); the step callback's x0
and x are in the model's (scaled) space, which is what the previews expect.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from diffusion.sampling import noise as noise_mod
from diffusion.sampling import schedules as sch
from diffusion.sampling.denoiser import CFGDenoiser, MaskedDenoiser, ModelSampling, encode_conditioning, latent_mask
from diffusion.sampling.samplers import registry as smp

# callback(step, total_steps, denoised x0 [B, C, h, w], x [B, C, h, w])
StepCallback = Callable[[int, int, Tensor, Tensor], None]
SDE_SAMPLERS = frozenset(n for n in smp.SAMPLERS if "_sde" in n)


@dataclass(frozen=True)
class SamplerChoice:
    """A SAMPLER value (KSamplerSelect): a sampler name with extra keyword options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def function(self) -> Callable[..., Tensor]:
        return smp.get_sampler(self.name)


def _diffusion_model(model: Any) -> Any:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "apply_model"):
        raise TypeError(f"diffusion.sampling.sample: the model input must be a MODEL (ModelPatcher around a DiffusionModel), "
                        f"got {type(model).__name__}")
    return inner


SAMPLING_OPTION = "model_sampling"     # model_options key: {"prediction": "eps"|"v", "zsnr": bool}


def with_model_sampling(model: Any, prediction: str, zsnr: bool) -> Any:
    """A clone of a MODEL that samples as `prediction` ("eps" or "v") with or without the
    zero-terminal-SNR sigma rescale (ComfyUI's ModelSamplingDiscrete)."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"model sampling: prediction must be 'eps' or 'v', got {prediction!r}")
    out = model.clone()
    out.model_options[SAMPLING_OPTION] = {"prediction": prediction, "zsnr": bool(zsnr)}
    return out


def model_sampling(model: Any, quantize: bool = True) -> ModelSampling:
    """The ModelSampling of a MODEL (ModelPatcher, honouring a ModelSamplingDiscrete override) or
    a DiffusionModel."""
    inner = model if hasattr(model, "apply_model") else _diffusion_model(model)
    opts = (getattr(model, "model_options", None) or {}).get(SAMPLING_OPTION) or {}
    return ModelSampling.from_model(inner, quantize, prediction=opts.get("prediction"), zsnr=opts.get("zsnr"))


def sigmas_for(sampling: ModelSampling, sampler_name: str, scheduler: str, steps: int,
               denoise: float = 1.0) -> Tensor:
    """ComfyUI's KSampler.set_steps: the schedule, discard-penultimate and the denoise cut."""
    discard = sampler_name in smp.DISCARD_PENULTIMATE_SIGMA

    def full(n: int) -> Tensor:
        s = sch.calculate_sigmas(sampling.sigmas, scheduler, n + 1 if discard else n)
        return sch.discard_penultimate(s) if discard else s

    if denoise is None or denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return sampling.sigmas.new_zeros([0])
    return full(int(steps / denoise))[-(steps + 1):]


def cut_sigmas(sigmas: Tensor, start_step: int | None, end_step: int | None,
               force_full_denoise: bool) -> Tensor | None:
    """KSamplerAdvanced's start/end steps; None when start_step leaves nothing to sample."""
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[:end_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


def _fix_channels(latent_image: Tensor, channels: int) -> Tensor:
    if latent_image.shape[1] == channels:
        return latent_image
    if not bool(latent_image.any()):       # an empty latent of another family: zeros that fit
        return latent_image.new_zeros([latent_image.shape[0], channels, *latent_image.shape[2:]])
    raise ValueError(f"diffusion.sampling.sample: the latent has {latent_image.shape[1]} channels, the model expects {channels}")


@torch.no_grad()
def sample(model: Any, seed: int, steps: int, cfg: float, sampler_name: str | SamplerChoice, scheduler: str,
           positive: list, negative: list, latent: Mapping[str, Any], denoise: float = 1.0,
           start_step: int | None = None, end_step: int | None = None, add_noise: bool = True,
           return_with_leftover_noise: bool = False, callback: StepCallback | None = None,
           noise: Tensor | None = None, sigmas: Tensor | None = None,
           noise_mode: Literal["comfy", "a1111"] = "comfy", timesteps: Literal["comfy", "k-diffusion"] = "comfy",
           device: torch.device | str | None = None, sampler_options: Mapping[str, Any] | None = None,
           ) -> dict[str, Any]:
    """Sample `latent` (a LATENT dict) and return a new LATENT dict (CPU float32 samples).

    `sigmas` given (SamplerCustom) replaces steps/scheduler/denoise. `noise` given replaces the
    seeded noise. noise_mode "a1111": image i gets seed + i (initial and step noise) and the
    initial noise is scaled by sigma_0; timesteps "k-diffusion": fractional UNet timesteps.
    """
    choice = sampler_name if isinstance(sampler_name, SamplerChoice) else SamplerChoice(str(sampler_name))
    fn = choice.function()
    options = {**choice.options, **(sampler_options or {})}
    if "samples" not in latent or not isinstance(latent["samples"], Tensor):
        raise ValueError("diffusion.sampling.sample: latent_image must be a LATENT dict with a 'samples' tensor")
    dm = _diffusion_model(model)
    sampling = model_sampling(model, quantize=(timesteps == "comfy"))
    latent_image = _fix_channels(latent["samples"].float().cpu(), int(getattr(dm, "latent_channels", 4)))
    out = dict(latent)
    # LATENT holds VAE latents (ComfyUI): the model works on them times its scale factor
    scale = float(getattr(dm, "latent_scale_factor", 1.0))
    if sigmas is None:
        sigmas = sigmas_for(sampling, choice.name, scheduler, int(steps), float(denoise))
    cut = cut_sigmas(sigmas.float().cpu(), start_step, end_step, not return_with_leftover_noise)
    if cut is None or len(cut) <= 1:
        out["samples"] = latent_image
        return out
    latent_image = latent_image * scale                                  # process_latent_in
    sigmas = cut
    b = latent_image.shape[0]
    seeds: int | list[int] = int(seed) if noise_mode == "comfy" else noise_mod.a1111_seeds(int(seed), b)
    if noise is None:
        if not add_noise:
            noise = torch.zeros_like(latent_image)
        elif noise_mode == "comfy":
            noise = noise_mod.prepare_noise(latent_image, int(seed), latent.get("batch_index"))
        else:
            noise = noise_mod.prepare_noise_a1111(latent_image, seeds)     # type: ignore[arg-type]

    target = torch.device(device) if device is not None else getattr(model, "load_device", torch.device("cpu"))
    model.patch_model(target)
    dev_latent = latent_image.to(target)
    dev_noise = noise.float().to(target)
    raw_mask = latent.get("noise_mask")
    kw = dict(sampling=sampling, latent_shape=latent_image.shape, is_sdxl=bool(dm.family.is_sdxl),
              pooled_dim=int(getattr(dm, "pooled_dim", 0)), inpaint=bool(dm.family.inpaint),
              latent_image=latent_image, noise_mask=raw_mask, device=target, latent_scale=scale)
    pos = encode_conditioning(positive, name="positive", **kw)         # type: ignore[arg-type]
    neg = encode_conditioning(negative, name="negative", **kw)         # type: ignore[arg-type]
    denoiser: Any = CFGDenoiser(dm, sampling, pos, neg, cfg)
    if raw_mask is not None:
        h, w = latent_image.shape[-2:]
        mask = latent_mask(raw_mask, (h, w), b).to(target).expand(-1, latent_image.shape[1], -1, -1)
        inpaint_noise = dev_noise
        if choice.name == "ddim":       # ComfyUI's "random" inpaint noise for ddim
            gen = torch.Generator().manual_seed((int(seed) + 1) % 2 ** 64)
            inpaint_noise = torch.randn(noise.shape, generator=gen).to(target)
        denoiser = MaskedDenoiser(denoiser, dev_latent, inpaint_noise, mask)
    s0 = float(sigmas[0])
    max_denoise = noise_mode == "comfy" and sampling.is_max_denoise(s0)
    x = sampling.noise_scaling(s0, dev_noise, dev_latent, max_denoise)
    if noise_mode == "a1111" and "noise_sampler" in inspect.signature(fn).parameters \
            and choice.name not in SDE_SAMPLERS and "noise_sampler" not in options:
        options["noise_sampler"] = noise_mod.per_image_noise_sampler(x, seeds)   # type: ignore[arg-type]
    total = len(sigmas) - 1

    def k_callback(info: dict[str, Any]) -> None:
        if callback is not None:
            callback(int(info["i"]), total, info["denoised"], info["x"])

    samples = fn(denoiser, x, sigmas.to(target), extra_args={"seed": seeds}, callback=k_callback,
                 disable=True, **options)
    out["samples"] = samples.float().cpu() / scale                       # process_latent_out
    return out


# --- the split form (SamplerCustom / SamplerCustomAdvanced values) ---------------------------


@dataclass(frozen=True)
class NoiseSpec:
    """A NOISE value: ComfyUI's seeded initial noise (RandomNoise) or none (DisableNoise)."""

    seed: int = 0
    enabled: bool = True

    def generate(self, latent: Mapping[str, Any]) -> Tensor:
        samples = latent["samples"].float().cpu()
        if not self.enabled:
            return torch.zeros_like(samples)
        return noise_mod.prepare_noise(samples, self.seed, latent.get("batch_index"))


@dataclass(frozen=True)
class Guider:
    """A GUIDER value: model + conditioning + cfg (CFGGuider; BasicGuider = no negative, cfg 1)."""

    model: Any
    positive: list
    negative: list
    cfg: float = 1.0


def sample_custom(guider: Guider, noise: NoiseSpec, sampler: SamplerChoice, sigmas: Tensor,
                  latent: Mapping[str, Any], callback: StepCallback | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample with explicit sigmas; returns (output, denoised_output) LATENT dicts, the second
    being the last step's denoised prediction (the output itself when no step ran)."""
    last: dict[str, Tensor] = {}

    def cb(step: int, total: int, x0: Tensor, x: Tensor) -> None:
        last["x0"] = x0
        if callback is not None:
            callback(step, total, x0, x)

    out = sample(guider.model, noise.seed, max(len(sigmas) - 1, 0), guider.cfg, sampler, "normal",
                 guider.positive, guider.negative, latent, sigmas=sigmas, add_noise=noise.enabled,
                 noise=noise.generate(latent) if noise.enabled else None, callback=cb)
    if "x0" not in last:
        return out, out
    denoised = dict(out)
    scale = float(getattr(_diffusion_model(guider.model), "latent_scale_factor", 1.0))
    denoised["samples"] = last["x0"].float().cpu() / scale               # the sampler's x0 is model space
    return out, denoised
