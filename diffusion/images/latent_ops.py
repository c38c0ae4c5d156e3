"""Resizing and cropping of [B, C, H, W] tensors: latents (LatentUpscale) and images (ImageScale).

Methods (ComfyUI's names): "nearest-exact", "bilinear", "area", "bicubic" are torch's
`F.interpolate` modes (align_corners False); "bislerp" interpolates like bilinear but spherically
along the channel vector of each position (direction by slerp, length by lerp), which keeps the
statistics of latents better when enlarging; "lanczos" goes through PIL on 8-bit pixels, so it is
for images in 0..1 only. crop "center" first cuts the input to the target aspect ratio (the same
amount off both sides), "disabled" stretches.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
Crop = Literal["disabled", "center"]


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Cut [.., H, W] equally from both sides of the longer relative side to the aspect width/height."""
    old_h, old_w = samples.shape[-2], samples.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:          # too wide: cut left and right
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:        # too tall: cut top and bottom
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)


def crop(samples: torch.Tensor, x: int, y: int, width: int, height: int) -> torch.Tensor:
    """The window [.., y:y+height, x:x+width], clamped to the tensor (never empty)."""
    h, w = samples.shape[-2], samples.shape[-1]
    x, y = min(max(0, x), w - 1), min(max(0, y), h - 1)
    return samples[..., y:min(h, y + max(1, height)), x:min(w, x + max(1, width))]


def upscale(samples: torch.Tensor, width: int, height: int, method: str, crop_mode: Crop = "disabled") -> torch.Tensor:
    """[B, C, H, W] -> [B, C, height, width] with one of LATENT_METHODS / IMAGE_METHODS."""
    if samples.ndim != 4:
        raise ValueError(f"upscale: expected a [B, C, H, W] tensor, found shape {tuple(samples.shape)}")
    if width < 1 or height < 1:
        raise ValueError(f"upscale: target size must be at least 1x1, found {width}x{height}")
    if crop_mode not in CROP_METHODS:
        raise ValueError(f"upscale: crop must be one of {CROP_METHODS}, found {crop_mode!r}")
    source = center_crop_to_aspect(samples, width, height) if crop_mode == "center" else samples
    if method == "bislerp":
        return bislerp(source, width, height)
    if method == "lanczos":
        return lanczos(source, width, height)
    if method not in ("nearest-exact", "bilinear", "area", "bicubic"):
        raise ValueError(f"upscale: unknown method {method!r}; expected one of "
                         f"{sorted(set(LATENT_METHODS) | set(IMAGE_METHODS))}")
    # interpolate wants float; keep the caller's dtype on the way out
    out = F.interpolate(source.float(), size=(height, width), mode=method,
                        **({"align_corners": False} if method in ("bilinear", "bicubic") else {}))
    return out.to(samples.dtype)


def _axis_weights(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 and fraction r per output position (half-pixel centres, like bilinear)."""
    pos = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5
    pos = pos.clamp(0, size_in - 1)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=size_in - 1)
    return i0, i1, (pos - i0).float()


def slerp(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Spherical interpolation of the vectors along `dim`; lengths interpolated linearly.

    Nearly parallel or opposite vectors (and zero vectors) fall back to plain lerp, where the
    spherical formula divides by sin(omega) ~ 0.
    """
    na, nb = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    dot = (ua * ub).sum(dim=dim, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-4
    so_safe = torch.where(safe, so, torch.ones_like(so))
    direction = (torch.sin((1 - r) * omega) / so_safe) * ua + (torch.sin(r * omega) / so_safe) * ub
    spherical = direction * (na * (1 - r) + nb * r)
    linear = a * (1 - r) + b * r
    degenerate = ~safe | (na <= 1e-12) | (nb <= 1e-12)
    return torch.where(degenerate, linear, spherical)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize [B, C, H, W] by slerp of channel vectors: first along width, then along height."""
    x = samples.float()
    h, w = x.shape[-2], x.shape[-1]
    i0, i1, r = _axis_weights(w, width)                   # [width]
    x = slerp(x[..., i0], x[..., i1], r.view(1, 1, 1, width))          # [B, C, H, width]
    j0, j1, s = _axis_weights(h, height)                  # [height]
    x = slerp(x[..., j0, :], x[..., j1, :], s.view(1, 1, height, 1))   # [B, C, height, width]
    return x.to(samples.dtype)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL Lanczos on 8-bit pixels of [B, C, H, W] values in 0..1 (C = 1, 3 or 4; others channel-wise)."""
    out = []
    for item in samples:
        array = np.clip(255.0 * item.detach().float().cpu().movedim(0, -1).numpy(), 0, 255).astype(np.uint8)
        if array.shape[-1] in (3, 4):
            img = Image.fromarray(array, mode="RGB" if array.shape[-1] == 3 else "RGBA")
            resized = np.array(img.resize((width, height), resample=Image.Resampling.LANCZOS))
        else:
            planes = [np.array(Image.fromarray(array[..., k], mode="L").resize((width, height),
                                                                                resample=Image.Resampling.LANCZOS))
                      for k in range(array.shape[-1])]
            resized = np.stack(planes, axis=-1)
        out.append(torch.from_numpy(resized.astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(device=samples.device, dtype=samples.dtype)


def upscale_latent_to_pixels(samples: torch.Tensor, width: int, height: int, method: str,
                             crop_mode: Crop = "disabled", factor: int = 8) -> torch.Tensor:
    """LatentUpscale's sizes: width/height in pixels (0 = keep aspect from the other), latent = pixels // factor."""
    h, w = samples.shape[-2], samples.shape[-1]
    if width == 0 and height == 0:
        return samples
    if width == 0:
        height = max(64, height)
        width = max(64, round(w * height / h))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(h * width / w))
    return upscale(samples, max(1, width // factor), max(1, height // factor), method, crop_mode)


def upscale_by(samples: torch.Tensor, scale_by: float, method: str) -> torch.Tensor:
    """LatentUpscaleBy: each side times scale_by, rounded (at least 1)."""
    if scale_by <= 0:
        raise ValueError(f"upscale_by: scale_by must be positive, found {scale_by}")
    h, w = samples.shape[-2], samples.shape[-1]
    return upscale(samples, max(1, round(w * scale_by)), max(1, round(h * scale_by)), method)
