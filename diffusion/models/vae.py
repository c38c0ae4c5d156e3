"""VAE: pixels [B, H, W, 3] in 0..1 <-> VAE latents [B, C, H/r, W/r] with a diffusers AutoencoderKL.

decode: z -> AutoencoderKL.decode -> (x + 1) / 2, clamped, as [B, H, W, 3] float32 on CPU.
encode: pixels centre-cropped to a multiple of r -> 2x - 1 -> latent mean (deterministic).
LATENT values hold VAE latents, as in ComfyUI: the sampler multiplies them by the model's latent
scale factor (0.18215 SD1/SD2, 0.13025 SDXL) and divides after, so a VAE never needs to know it.
Tiled variants cut the input into overlapping tiles and blend the results with linear ramps over the
overlap, so large images fit in little memory; decode falls back to tiles when the accelerator is out
of memory.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL

from diffusion.models import devices
from diffusion.models.detect import ModelFamily

MAX_PIXELS_PER_CHUNK = 4 * 1024 * 1024      # images decoded at once: about four 1024x1024


class VAE:
    def __init__(self, module: AutoencoderKL, family: ModelFamily | None, load_device: torch.device | str,
                 offload_device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 keep_loaded: bool = True) -> None:
        self.module = module.eval().requires_grad_(False)
        self.family = family
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.dtype = dtype or next(module.parameters()).dtype
        # torch's own .to: diffusers' override warns about dtype casts of modules it would keep in fp32
        torch.nn.Module.to(self.module, dtype=self.dtype)
        self.keep_loaded = keep_loaded        # False (lowvram): back to the offload device after each use

    # ComfyUI plugins look for these names
    @property
    def first_stage_model(self) -> AutoencoderKL:
        return self.module

    @property
    def downscale_ratio(self) -> int:
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.module.config.latent_channels)

    def _load(self) -> None:
        if self.load_device == self.offload_device:
            return
        nbytes = devices.module_bytes(self.module)
        if next(self.module.parameters()).device != self.load_device:
            devices.make_room(self.load_device, nbytes, keep=self)
            torch.nn.Module.to(self.module, device=self.load_device)
        ref = weakref.WeakMethod(self.offload)     # the registry of loaded models must not keep it alive
        devices.mark_loaded(self, self.load_device, nbytes, lambda: None if (fn := ref()) is None else fn())

    def offload(self) -> None:
        """Move the weights to the offload device (called when another model needs the memory)."""
        torch.nn.Module.to(self.module, self.offload_device)
        devices.mark_offloaded(self)

    def _done(self) -> None:
        if not self.keep_loaded and self.load_device != self.offload_device:
            self.offload()

    # --- raw passes on one chunk (device tensors in, device tensors out) --------------------------
    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:          # [b, C, h, w] -> [b, 3, H, W] in -1..1
        z = z.to(device=self.load_device, dtype=self.dtype)
        return self.module.decode(z, return_dict=False)[0].float()

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:          # [b, 3, H, W] in -1..1 -> [b, C, h, w]
        x = x.to(device=self.load_device, dtype=self.dtype)
        return self.module.encode(x, return_dict=False)[0].mode().float()

    # --- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, C, h, w] -> images [B, H, W, 3] float32 in 0..1 on the CPU."""
        self._check_latent(samples)
        self._load()
        try:
            r = self.downscale_ratio
            per = max(1, MAX_PIXELS_PER_CHUNK // (samples.shape[2] * samples.shape[3] * r * r))
            try:
                out = [self._decode_raw(samples[i:i + per]).cpu() for i in range(0, samples.shape[0], per)]
                images = torch.cat(out)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                return self.decode_tiled(samples)
        finally:
            self._done()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, H, W, C>=3] in 0..1 -> VAE latents [B, C, H/r, W/r] (float32, CPU)."""
        x = self._prepare_pixels(pixels)
        self._load()
        try:
            return torch.cat([self._encode_raw(x[i:i + 1]).cpu() for i in range(x.shape[0])])
        finally:
            self._done()

    @torch.no_grad()
    def decode_tiled(self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64, overlap: int = 16) -> torch.Tensor:
        """Like `decode`, tile by tile; tile sizes and overlap in latent pixels."""
        self._check_latent(samples)
        self._load()
        try:
            images = tiled(self._decode_raw, samples, (tile_y, tile_x), overlap, self.downscale_ratio, 1, 3)
        finally:
            self._done()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def encode_tiled(self, pixels: torch.Tensor, tile_x: int = 512, tile_y: int = 512, overlap: int = 64) -> torch.Tensor:
        """Like `encode`, tile by tile; tile sizes and overlap in image pixels."""
        x = self._prepare_pixels(pixels)
        r = self.downscale_ratio
        self._load()
        try:
            return tiled(self._encode_raw, x, (max(r, tile_y // r * r), max(r, tile_x // r * r)),
                         overlap // r * r, 1, r, self.latent_channels)
        finally:
            self._done()

    # --- helpers -----------------------------------------------------------------------------------
    def _check_latent(self, samples: torch.Tensor) -> None:
        if samples.ndim != 4 or samples.shape[1] != self.latent_channels:
            raise ValueError(f"VAE decode expects latents [B, {self.latent_channels}, h, w], got {list(samples.shape)}")

    def _prepare_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] 0..1 -> centre-cropped to multiples of r, [B, 3, H', W'] in -1..1."""
        if pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise ValueError(f"VAE encode expects images [B, H, W, 3], got {list(pixels.shape)}")
        r = self.downscale_ratio
        h, w = pixels.shape[1] // r * r, pixels.shape[2] // r * r
        if h == 0 or w == 0:
            raise ValueError(f"image {pixels.shape[1]}x{pixels.shape[2]} is smaller than the VAE's {r}x{r} cell")
        top, left = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
        x = pixels[:, top:top + h, left:left + w, :3].float()
        return x.permute(0, 3, 1, 2) * 2.0 - 1.0


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def _ramp(n: int, fade: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blend weights: linear ramps of `fade` samples on sides that overlap a neighbour."""
    w = torch.ones(n)
    fade = min(fade, n // 2)
    if fade > 0:
        ramp = (torch.arange(fade, dtype=torch.float32) + 1) / (fade + 1)
        if at_start:
            w[:fade] = ramp
        if at_end:
            w[n - fade:] = ramp.flip(0)
    return w


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: tuple[int, int], overlap: int,
          up: int, down: int, out_channels: int) -> torch.Tensor:
    """Run `fn` on overlapping tiles of x [B, C, H, W]; the output grid is the input's times up/down.
    Tiles are blended with linear ramps across their overlaps. Returns float32 on the CPU."""
    b, _, H, W = x.shape
    oh, ow = H * up // down, W * up // down
    out = torch.zeros(b, out_channels, oh, ow)
    weight = torch.zeros(1, 1, oh, ow)
    ys, xs = _starts(H, tile[0], overlap), _starts(W, tile[1], overlap)
    fade = overlap * up // down
    for y0 in ys:
        for x0 in xs:
            part = fn(x[:, :, y0:y0 + tile[0], x0:x0 + tile[1]]).float().cpu()
            py, px = y0 * up // down, x0 * up // down
            th, tw = part.shape[2], part.shape[3]
            wy = _ramp(th, fade, y0 > 0, y0 + tile[0] < H)
            wx = _ramp(tw, fade, x0 > 0, x0 + tile[1] < W)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, py:py + th, px:px + tw] += part * mask
            weight[:, :, py:py + th, px:px + tw] += mask
    return out / weight.clamp_min(1e-8)
