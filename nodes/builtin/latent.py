"""Latent nodes: EmptyLatentImage, LatentUpscale, LatentUpscaleBy (ComfyUI names, inputs and order).

LATENT = {"samples": Tensor[B, C, h, w], "noise_mask"?: Tensor, "batch_index"?: list[int]}.
SD1, SD2 and SDXL latents all have 4 channels at 1/8 of the pixel size; the empty latent does not
know the model, so it is made with those values (the sampler checks the channels against its model).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffusion.images import latent_ops

MAX_RESOLUTION = 16384
LATENT_CHANNELS = 4        # SD1 / SD2 / SDXL
LATENT_FACTOR = 8          # pixels per latent cell (VAE downscale)


class EmptyLatentImage:
    """A batch of zero latents for a width x height picture."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict[str, torch.Tensor]]:
        # [B, 4, H/8, W/8] zeros; the sampler adds the seeded noise
        samples = torch.zeros([batch_size, LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR])
        return ({"samples": samples},)


class LatentUpscale:
    """Resize latents to a pixel size (0 for one side keeps the aspect ratio)."""

    upscale_methods: ClassVar[list[str]] = list(latent_ops.LATENT_METHODS)
    crop_methods: ClassVar[list[str]] = list(latent_ops.CROP_METHODS)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (cls.upscale_methods,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "crop": (cls.crop_methods,),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"

    def upscale(self, samples: dict[str, Any], upscale_method: str, width: int, height: int,
                crop: str) -> tuple[dict[str, Any]]:
        out = dict(samples)   # noise_mask / batch_index travel along unchanged
        out["samples"] = latent_ops.upscale_latent_to_pixels(samples["samples"], width, height, upscale_method,
                                                             crop, factor=LATENT_FACTOR)
        return (out,)


class LatentUpscaleBy:
    """Resize latents by a factor."""

    upscale_methods: ClassVar[list[str]] = list(latent_ops.LATENT_METHODS)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (cls.upscale_methods,),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"

    def upscale(self, samples: dict[str, Any], upscale_method: str, scale_by: float) -> tuple[dict[str, Any]]:
        out = dict(samples)
        out["samples"] = latent_ops.upscale_by(samples["samples"], scale_by, upscale_method)
        return (out,)


NODE_CLASS_MAPPINGS = {
    "EmptyLatentImage": EmptyLatentImage,
    "LatentUpscale": LatentUpscale,
    "LatentUpscaleBy": LatentUpscaleBy,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EmptyLatentImage": "Empty Latent Image",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
}
