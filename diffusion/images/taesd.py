"""TAESD latent previews: the tiny decoder files ComfyUI users keep in `models/vae_approx/`.

Files: `taesd_decoder.*` (SD1/SD2 latents) and `taesdxl_decoder.*` (SDXL), `.safetensors` or a torch
pickle (read by the safe unpickler of diffusion.models.state_dict). Two key layouts:
- the original TAESD repository's `nn.Sequential` indices: `0` is a Clamp (no weights), `1` the input
  conv `[64, 4, 3, 3]`, `3.conv.0.weight` ... the residual blocks, `7`/`12`/`17` the bias-free convs
  after each upsample, `19` the output conv `[3, 64, 3, 3]`;
- diffusers' `AutoencoderTiny` (`decoder.layers.N...`), where the Clamp is a line of `forward`, so
  diffusers index = original index - 1.
The module is diffusers' `DecoderTiny` (we convert, we do not re-implement it). It decodes the
model-space latents the sampler sees (no scale factor), clamped as tanh(x / 3) * 3, to RGB in 0..1
at 8x the latent size; previews are capped at 512 px (256 px when decoding on a CPU, where a
512 px decode costs about a second) by area-averaging the latent first.
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DecoderTiny
from PIL import Image
from torch import Tensor

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import load_state_dict

# the decoder file a family's latents need (ComfyUI's names)
DECODER_NAMES = {"sd1": "taesd_decoder", "sd2": "taesd_decoder", "sdxl": "taesdxl_decoder"}
EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
MAX_PREVIEW = 512                      # longest side of a preview image (as ComfyUI)
MAX_PREVIEW_CPU = 256                  # on a CPU: a 512 px TAESD decode costs ~1 s per step

_ORIGINAL_KEY = re.compile(r"^(\d+)\.(.+)$")
_cache: OrderedDict[tuple[str, int, int], DecoderTiny] = OrderedDict()
_cache_lock = threading.Lock()


def find_decoder(family_name: str, dirs: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The TAESD decoder file for a family in the given folders (subfolders not searched)."""
    stem = DECODER_NAMES.get(family_name)
    if stem is None:
        return None
    for d in dirs:
        for ext in EXTENSIONS:
            p = Path(d) / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def to_diffusers_keys(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Either layout -> `layers.N...` keys of DecoderTiny."""
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key.startswith("decoder.layers."):
            out[key[len("decoder."):]] = t
            continue
        k = key[len("decoder."):] if key.startswith("decoder.") else key
        m = _ORIGINAL_KEY.match(k)
        if m is None or int(m.group(1)) < 1:
            raise ModelFileError(path, f"not a TAESD decoder: unexpected key {key!r} (expected `1.weight`, "
                                       "`3.conv.0.weight`, ... or `decoder.layers.N...`)")
        out[f"layers.{int(m.group(1)) - 1}.{m.group(2)}"] = t
    return out


def build_decoder(sd: dict[str, Tensor], path: Path) -> DecoderTiny:
    """DecoderTiny with the file's weights; the layout is read from the tensors (blocks per level)."""
    layers = to_diffusers_keys(sd, path)
    first = layers.get("layers.0.weight")
    if first is None or first.ndim != 4:
        raise ModelFileError(path, "not a TAESD decoder: no input conv (`1.weight` / `decoder.layers.0.weight`)")
    latent_channels, channels = int(first.shape[1]), int(first.shape[0])
    # each level is: residual blocks (`conv.0...`), an upsample (no weights) except after the last
    # level, then a plain conv (`weight`; the RGB output conv for the last level)
    last = max(int(k.split(".")[1]) for k in layers)
    num_blocks: list[int] = []
    count = 0
    for i in range(2, last + 1):                       # 0 conv, 1 activation
        if f"layers.{i}.conv.0.weight" in layers:
            count += 1
        elif f"layers.{i}.weight" in layers:
            num_blocks.append(count)
            count = 0
    out = layers.get(f"layers.{last}.weight")
    if out is None or not num_blocks or out.shape[0] != 3:
        raise ModelFileError(path, f"not a TAESD decoder: the last layer is {tuple(out.shape) if out is not None else None}, "
                                   "expected an RGB conv [3, C, 3, 3]")
    dec = DecoderTiny(in_channels=latent_channels, out_channels=3, num_blocks=tuple(num_blocks),
                      block_out_channels=(channels,) * len(num_blocks), upsampling_scaling_factor=2,
                      act_fn="relu", upsample_fn="nearest")
    missing, unexpected = dec.load_state_dict({k: v.float() for k, v in layers.items()}, strict=False)
    if missing or unexpected:
        raise ModelFileError(path, f"TAESD decoder layout not understood: missing {missing[:4]}, "
                                   f"unexpected {unexpected[:4]}")
    return dec.eval().requires_grad_(False)


def load_decoder(path: str | os.PathLike[str]) -> DecoderTiny:
    """The decoder of a file, read once per file version (a few MB; the last 4 are kept)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        dec = _cache.get(key)
        if dec is not None:
            _cache.move_to_end(key)
            return dec
    dec = build_decoder(load_state_dict(p), p)         # type: ignore[arg-type]
    with _cache_lock:
        _cache[key] = dec
        while len(_cache) > 4:
            _cache.popitem(last=False)
    return dec


@torch.no_grad()
def decode_preview(decoder: DecoderTiny, latent: Tensor, max_side: int | None = None) -> Image.Image:
    """First latent of the batch [B, C, h, w] -> PIL RGB at 8x, at most `max_side` px on its long side
    (default MAX_PREVIEW, MAX_PREVIEW_CPU for a decoder on the CPU). A latent larger than that is
    area-averaged first, so the decode itself stays small."""
    device = next(decoder.parameters()).device
    limit = max_side or (MAX_PREVIEW_CPU if device.type == "cpu" else MAX_PREVIEW)
    x = latent[:1].detach().float().to(device)
    h, w = x.shape[-2:]
    factor = math.ceil(max(h, w) * 8 / limit)
    if factor > 1:                                     # [1, C, ceil(h/f), ceil(w/f)]
        x = F.interpolate(x, size=(math.ceil(h / factor), math.ceil(w / factor)), mode="area")
    x = torch.tanh(x / 3.0) * 3.0                      # DecoderTiny.forward's clamp
    rgb = decoder.layers(x)[0].clamp(0, 1)             # [3, 8h, 8w] in 0..1
    img = Image.fromarray((rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy(), mode="RGB")
    if max(img.size) > limit:
        img.thumbnail((limit, limit))
    return img
