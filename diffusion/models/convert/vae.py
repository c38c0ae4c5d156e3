"""VAE: ldm (`first_stage_model.*` or `vae.*`) <-> diffusers `AutoencoderKL`, and its config from shapes.

formats.md 1.7: encoder levels keep their order, decoder levels are reversed
(`decoder.up.k` <-> `decoder.up_blocks.(n-1-k)`); `nin_shortcut` <-> `conv_shortcut`;
the mid attention's q/k/v/proj_out are 1x1 convs [C, C, 1, 1] in ldm and Linear [C, C] in diffusers.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import shape_of

VAE_PREFIXES = ("first_stage_model.", "vae.")
ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
LINEAR_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def vae_prefix(sd: Mapping[str, torch.Tensor]) -> str | None:
    """`first_stage_model.` / `vae.` for a checkpoint, "" for a bare VAE file, None without a VAE."""
    for p in VAE_PREFIXES:
        if p + "encoder.conv_in.weight" in sd:
            return p
    return "" if "encoder.conv_in.weight" in sd else None


def diffusers_to_ldm_name(name: str, levels: int) -> str:
    """ldm name of one diffusers AutoencoderKL parameter (without the checkpoint prefix)."""
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        part, _, i, kind, j, tail = m.groups()
        level = int(i) if part == "encoder" else levels - 1 - int(i)
        group = "down" if part == "encoder" else "up"
        if kind == "resnets":
            return f"{part}.{group}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{group}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{tail}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        part, kind, j, tail = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        for d, l in ATTN_TO_LDM.items():
            if tail.startswith(d + "."):
                return f"{part}.mid.attn_1.{l}{tail[len(d):]}"
    m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", name)
    if m:
        return f"{m.group(1)}.norm_out.{m.group(2)}"
    return name      # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _is_linear_attn(name: str) -> bool:
    return ".mid_block.attentions." in name and any(f".{a}.weight" in name for a in LINEAR_ATTN)


def vae_config_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str, scaling_factor: float,
                        path: str | os.PathLike[str] = "<state dict>") -> dict:
    """An AutoencoderKL config from the ldm tensors under `prefix`."""
    p = prefix
    levels = sorted({int(k[len(p + "encoder.down."):].split(".", 1)[0]) for k in sd if k.startswith(p + "encoder.down.")})
    if not levels:
        raise ModelFileError(path, f"VAE without encoder levels (`{p}encoder.down.*`)")
    blocks = sorted({int(k[len(p + "encoder.down.0.block."):].split(".", 1)[0])
                     for k in sd if k.startswith(p + "encoder.down.0.block.")})
    channels = tuple(int(shape_of(sd, f"{p}encoder.down.{i}.block.{len(blocks) - 1}.conv2.weight")[0]) for i in levels)
    latent = int(shape_of(sd, p + "decoder.conv_in.weight")[1])
    config = dict(in_channels=int(shape_of(sd, p + "encoder.conv_in.weight")[1]),
                  out_channels=int(shape_of(sd, p + "decoder.conv_out.weight")[0]), latent_channels=latent,
                  block_out_channels=channels, layers_per_block=len(blocks),
                  down_block_types=("DownEncoderBlock2D",) * len(levels),
                  up_block_types=("UpDecoderBlock2D",) * len(levels),
                  sample_size=512, scaling_factor=scaling_factor)
    if p + "quant_conv.weight" not in sd:
        config["use_quant_conv"] = False
    if p + "post_quant_conv.weight" not in sd:
        config["use_post_quant_conv"] = False
    if p + "encoder.mid.attn_1.q.weight" not in sd:
        config["mid_block_add_attention"] = False
    return config


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], prefix: str, names: Iterable[str], config: Mapping,
                     path: str | os.PathLike[str] = "<state dict>") -> dict[str, torch.Tensor]:
    """The diffusers state dict for the given parameter names; every ldm VAE key must be consumed."""
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name in names:
        key = prefix + diffusers_to_ldm_name(name, levels)
        if key not in sd:
            missing.append(key)
            continue
        t = sd[key]
        if _is_linear_attn(name) and t.ndim > 2:
            t = t.reshape(t.shape[0], t.shape[1])      # 1x1 conv [C, C, 1, 1] (or [C, C, 1]) -> Linear [C, C]
        out[name] = t
        used.add(key)
    if missing:
        raise ModelFileError(path, f"VAE tensors missing: {', '.join(missing[:5])} ({len(missing)} in all)")
    left = [k for k in sd if k.startswith(prefix) and k not in used and (prefix or k.split(".")[0] in
            ("encoder", "decoder", "quant_conv", "post_quant_conv"))]
    if left:
        raise ModelFileError(path, f"VAE tensors not understood: {', '.join(left[:5])} ({len(left)} in all)")
    return out


def vae_to_ldm(vae: torch.nn.Module, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """ldm-layout tensors of a diffusers AutoencoderKL (attention Linear weights as 1x1 convs)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for name, t in vae.state_dict().items():
        if _is_linear_attn(name):
            t = t[:, :, None, None]
        out[prefix + diffusers_to_ldm_name(name, levels)] = t
    return out
