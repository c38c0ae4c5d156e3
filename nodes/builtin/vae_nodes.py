"""VAE nodes: VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled (ComfyUI names, inputs and order).

Thin: each calls one method of `diffusion.models.vae.VAE` (decode [B,C,h,w] -> IMAGE [B,H,W,3] in 0..1,
encode IMAGE -> VAE latent, unscaled as in ComfyUI). Tile sizes and overlaps of the tiled nodes are in pixels, as in
ComfyUI; the temporal inputs exist for workflow compatibility and do nothing for image VAEs.
"""
from __future__ import annotations

from typing import Any

import torch


def _pixels_rgb(pixels: torch.Tensor, node: str) -> torch.Tensor:
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise ValueError(f"{node}: input 'pixels' must be an IMAGE [B, H, W, 3+], found shape {tuple(pixels.shape)}")
    return pixels[..., :3]   # drop an alpha channel


def _latent(samples: Any, node: str) -> torch.Tensor:
    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise TypeError(f"{node}: input 'samples' must be a LATENT dict with a 'samples' tensor, "
                         f"found {type(samples).__name__}")
    return samples["samples"]


class VAEDecode:
    """Latents -> images."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                             "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."

    def decode(self, vae: Any, samples: dict[str, Any]) -> tuple[torch.Tensor]:
        return (vae.decode(_latent(samples, "VAEDecode")),)


class VAEDecodeTiled:
    """Latents -> images, tile by tile (less memory for large pictures)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "samples": ("LATENT",), "vae": ("VAE",),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                      "tooltip": "Only used for video VAEs: frames to decode at a time."}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                         "tooltip": "Only used for video VAEs: frames to overlap."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "_for_testing"

    def decode(self, vae: Any, samples: dict[str, Any], tile_size: int, overlap: int = 64,
               temporal_size: int = 64, temporal_overlap: int = 8) -> tuple[torch.Tensor]:
        if tile_size < overlap * 4:
            overlap = tile_size // 4   # as ComfyUI: an overlap over a quarter of the tile is cut back
        # diffusion.models.vae.VAE.decode_tiled takes latent units: pixels / the VAE's downscale ratio (8)
        ratio = int(getattr(vae, "downscale_ratio", 8))
        tile = max(1, tile_size // ratio)
        return (vae.decode_tiled(_latent(samples, "VAEDecodeTiled"), tile_x=tile, tile_y=tile,
                                 overlap=overlap // ratio),)


class VAEEncode:
    """Images -> latents."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae: Any, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor]]:
        return ({"samples": vae.encode(_pixels_rgb(pixels, "VAEEncode"))},)


class VAEEncodeTiled:
    """Images -> latents, tile by tile."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "pixels": ("IMAGE",), "vae": ("VAE",),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                      "tooltip": "Only used for video VAEs: frames to encode at a time."}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                         "tooltip": "Only used for video VAEs: frames to overlap."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing"

    def encode(self, vae: Any, pixels: torch.Tensor, tile_size: int, overlap: int,
               temporal_size: int = 64, temporal_overlap: int = 8) -> tuple[dict[str, torch.Tensor]]:
        if tile_size < overlap * 4:
            overlap = tile_size // 4
        # encode_tiled takes image pixels, as the node's inputs
        latent = vae.encode_tiled(_pixels_rgb(pixels, "VAEEncodeTiled"), tile_x=tile_size, tile_y=tile_size,
                                  overlap=overlap)
        return ({"samples": latent},)


NODE_CLASS_MAPPINGS = {
    "VAEDecode": VAEDecode,
    "VAEEncode": VAEEncode,
    "VAEDecodeTiled": VAEDecodeTiled,
    "VAEEncodeTiled": VAEEncodeTiled,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VAEDecode": "VAE Decode",
    "VAEEncode": "VAE Encode",
    "VAEDecodeTiled": "VAE Decode (Tiled)",
    "VAEEncodeTiled": "VAE Encode (Tiled)",
}
