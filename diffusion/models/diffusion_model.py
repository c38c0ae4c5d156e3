"""DiffusionModel: the diffusers UNet of a checkpoint plus what a sampler needs to drive it.

`apply_model` takes ldm-style inputs (latent x [B, C, h, w], timestep [B] on the 0..999 scale, text
context [B, T, D]) and returns the raw UNet output (eps or v, per `prediction`). SDXL's added
conditioning comes either as `text_embeds` [B, P] + `time_ids` [B, 6] (diffusers' form) or as ComfyUI's
`y` [B, P + 6*F] (pooled text followed by the Fourier features of the six size numbers). Inpainting
models take `concat` [B, 5, h, w] (mask 1 channel, masked-image latent 4) appended to x; without it
ComfyUI's text-to-image default is used (mask 1, a constant grey-image latent).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import UNet2DConditionModel

from diffusion.models.detect import ModelFamily

# ComfyUI's latent of a blank grey image (SD1/SD2 and SDXL latent formats), per channel.
GREY_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of the "scaled linear" schedule all SD1/SD2/SDXL models were trained with: float64 [steps]."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusionModel(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel, family: ModelFamily, prediction: Literal["eps", "v"],
                 alphas_cumprod: torch.Tensor | None = None) -> None:
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet = unet
        self.family = family
        self.prediction: Literal["eps", "v"] = prediction
        # a plain attribute, not a buffer: model dtype casts and patch keys must not touch it
        self.alphas_cumprod = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).detach().cpu()

    # --- what samplers and nodes read -----------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels

    @property
    def latent_scale_factor(self) -> float:
        return self.family.latent_scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def fourier_dim(self) -> int:
        """Width F of the Fourier features of each SDXL size number (256 for real SDXL; 0 otherwise)."""
        return int(self.unet.config.addition_time_embed_dim or 0) if self.family.is_sdxl else 0

    @property
    def adm_channels(self) -> int:
        """Width of ComfyUI's `y` vector (2816 for SDXL base; 0 without added conditioning)."""
        return int(self.unet.config.projection_class_embeddings_input_dim or 0) if self.family.is_sdxl else 0

    @property
    def pooled_dim(self) -> int:
        """Width P of the pooled text embedding SDXL expects (1280 for real SDXL)."""
        return self.adm_channels - 6 * self.fourier_dim if self.family.is_sdxl else 0

    # --- the forward pass -------------------------------------------------------------------------
    def default_concat(self, x: torch.Tensor) -> torch.Tensor:
        """Inpainting input for plain text-to-image: mask of ones and a grey-image latent: [B, 5, h, w]."""
        b, _, h, w = x.shape
        grey = torch.tensor(GREY_LATENT, dtype=x.dtype, device=x.device).view(1, 4, 1, 1).expand(b, 4, h, w)
        return torch.cat([torch.ones(b, 1, h, w, dtype=x.dtype, device=x.device), grey], dim=1)

    def apply_model(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                    y: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                    time_ids: torch.Tensor | None = None, concat: torch.Tensor | None = None) -> torch.Tensor:
        """Raw UNet output (eps or v) for x [B, C, h, w] at timesteps [B]; same dtype as x."""
        out_dtype = x.dtype
        if self.family.inpaint:
            x = torch.cat([x, (concat if concat is not None else self.default_concat(x)).to(x)], dim=1)
        elif concat is not None:
            raise ValueError(f"a concat input was given to a non-inpainting {self.family.name} model")
        expected = int(self.unet.config.in_channels)
        if x.shape[1] != expected:
            raise ValueError(f"the UNet takes {expected} input channels, got x with {x.shape[1]}")
        dtype, device = self.dtype, self.device
        b = x.shape[0]
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} does not match latent batch {b}")
        kwargs: dict = {}
        hook = None
        if self.family.is_sdxl:
            if y is not None:
                # y = [pooled P | Fourier features 6*F]: hand the features to add_time_proj's output
                p, feats = y[:, :self.pooled_dim], y[:, self.pooled_dim:]
                text_embeds, time_ids = p, torch.zeros(b, 6, device=device)
                fixed = feats.reshape(b * 6, self.fourier_dim).to(device=device, dtype=dtype)
                hook = self.unet.add_time_proj.register_forward_hook(lambda mod, args, out: fixed.to(out.dtype))
            if text_embeds is None or time_ids is None:
                raise ValueError("an SDXL model needs the pooled text embedding and size conditioning "
                                 "(text_embeds + time_ids, or y)")
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds.to(device=device, dtype=dtype),
                                           "time_ids": time_ids.to(device=device, dtype=dtype)}
        try:
            out = self.unet(x.to(device=device, dtype=dtype), timestep.to(torch.float32),
                            encoder_hidden_states=context.to(device=device, dtype=dtype),
                            return_dict=False, **kwargs)[0]
        finally:
            if hook is not None:
                hook.remove()
        return out.to(out_dtype)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.apply_model(*args, **kwargs)
