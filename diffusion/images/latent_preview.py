"""Cheap latent -> RGB previews of the denoised prediction during sampling.

A per-family linear projection of the 4 latent channels to RGB (ComfyUI's "latent2rgb" factors for
the SD1/SD2 and SDXL latent spaces), applied to the first image of the batch:
rgb[h, w] = latent[:, h, w] @ factors + bias, then (rgb + 1) / 2 clamped to 0..1. One small matmul
per step. `make_previewer(method, family, vae_approx_dirs)` picks what a sampler's step callback
uses: "taesd" / "auto" decode with the TAESD decoder file when there is one (diffusion.images.taesd; the
projection otherwise), "latent2rgb" the projection, "none" nothing.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

# [4 latent channels, 3 RGB] for scaled latents (what samplers see)
SD1_FACTORS = ((0.3512, 0.2297, 0.3227),
               (0.3250, 0.4974, 0.2350),
               (-0.2829, 0.1762, 0.2721),
               (-0.2120, -0.2616, -0.7177))
SD1_BIAS = (0.0, 0.0, 0.0)
SDXL_FACTORS = ((0.3651, 0.4232, 0.4341),
                (-0.2533, -0.0042, 0.1068),
                (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188))
SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def factors_for(family_name: str) -> tuple[Tensor, Tensor]:
    """(factors [4, 3], bias [3]) of a family name ("sd1", "sd2", "sdxl")."""
    if family_name == "sdxl":
        return torch.tensor(SDXL_FACTORS), torch.tensor(SDXL_BIAS)
    return torch.tensor(SD1_FACTORS), torch.tensor(SD1_BIAS)


def latent_to_rgb(latent: Tensor, family_name: str = "sd1") -> Tensor:
    """latent [B, 4, h, w] or [4, h, w] -> first image as RGB [h, w, 3] in 0..1 (float32, CPU)."""
    x = latent[0] if latent.ndim == 4 else latent
    if x.shape[0] != 4:
        raise ValueError(f"latent_preview: expected a 4-channel latent, got {x.shape[0]} channels")
    factors, bias = factors_for(family_name)
    rgb = x.detach().float().cpu().permute(1, 2, 0) @ factors + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1)


def preview_image(latent: Tensor, family_name: str = "sd1") -> Image.Image:
    """A PIL RGB preview of the first latent of the batch, one pixel per latent cell (64x64 for a
    512x512 image; the UI scales it)."""
    rgb = latent_to_rgb(latent, family_name)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), mode="RGB")


Previewer = Callable[[Tensor], Image.Image | None]


def make_previewer(method: str, family_name: str, vae_approx_dirs: Sequence[str | os.PathLike[str]] = (),
                   warn: Callable[[str, dict], None] | None = None) -> Previewer | None:
    """The per-step preview function for a preview method ("auto", "taesd", "latent2rgb", "none");
    None when no previews are wanted. A TAESD file that cannot be read is a warning (through
    `warn`) and the projection is used instead."""
    method = (method or "auto").lower()
    if method in ("none", "false", ""):
        return None

    def projection(x0: Tensor) -> Image.Image | None:
        return preview_image(x0, family_name) if x0.shape[1] == 4 else None

    if method in ("auto", "taesd"):
        from diffusion.images import taesd            # diffusers' DecoderTiny: only when previews are wanted
        from diffusion.models.errors import ModelFileError

        path = taesd.find_decoder(family_name, vae_approx_dirs)
        if path is not None:
            try:
                decoder = taesd.load_decoder(path)
            except ModelFileError as e:
                if warn is not None:
                    warn(f"TAESD previews off: {e}", {"file": str(path)})
                return projection
            channels = int(decoder.layers[0].in_channels)
            return lambda x0: taesd.decode_preview(decoder, x0) if x0.shape[1] == channels else None
    return projection
