"""Tiny seeded random-weight models in the real architectures, and writers of ldm-layout checkpoints.

`tiny_components("sd1" | "sd2" | "sdxl", seed, inpaint=..., prediction=...)` builds diffusers /
transformers modules whose shapes follow the real families at a fraction of the width:
UNet block_out_channels (32, 64), one resnet per level; CLIP hidden 32 (SDXL "g": 64 with a
projection), 2 layers, the real 49408-token vocabulary and 77 positions. Every parameter is perturbed
with seeded noise (norm weights included), so a swapped key in a conversion shows up in outputs.
`write_ldm_checkpoint(components, path)` writes them in the original single-file ldm layout, which
the loader then reads through the same detection and conversion as real checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion.detect import ModelFamily, Prediction, family as make_family

VOCAB_SIZE = 49408
MAX_POSITIONS = 77


@dataclass
class TinyComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module]       # "l" / "h": CLIPTextModel, "g": CLIPTextModelWithProjection
    family: ModelFamily
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # marker keys written as-is (e.g. v_pred)


def clip_config(key: str, hidden: int, layers: int = 2, intermediate: int | None = None,
                projection_dim: int | None = None) -> CLIPTextConfig:
    """CLIP text config: "l" is OpenAI CLIP (quick_gelu), "h"/"g" OpenCLIP (gelu); head size 64
    (at least one head), which is also what the loader assumes when it rebuilds configs from shapes."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=MAX_POSITIONS, hidden_act="quick_gelu" if key == "l" else "gelu",
        layer_norm_eps=1e-5, projection_dim=projection_dim or hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if key == "l" else 0)


def tiny_unet_config(fam: ModelFamily, context_dim: int, pooled_dim: int = 0,
                     block_out_channels: tuple[int, ...] = (32, 64)) -> dict:
    """A small UNet2DConditionModel config shaped like the family (attention layout, projections)."""
    levels = len(block_out_channels)
    if fam.name == "sdxl":
        # SDXL: level 0 without attention; text_time added embedding (pooled text + 6 Fourier features)
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        time_dim = 8
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                     projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
                     transformer_layers_per_block=tuple(range(1, levels + 1)))
    else:
        # SD1/SD2: attention at every level except the last
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
        extra = {}
    up = tuple("CrossAttnUpBlock2D" if d.startswith("CrossAttn") else "UpBlock2D" for d in reversed(down))
    linear = fam.name != "sd1"
    heads = [max(1, c // 64) for c in block_out_channels] if linear else 8
    return dict(sample_size=8, in_channels=fam.unet_in_channels, out_channels=fam.latent_channels,
                block_out_channels=block_out_channels, layers_per_block=1,
                down_block_types=down, up_block_types=up, cross_attention_dim=context_dim,
                attention_head_dim=heads, use_linear_projection=linear,
                upcast_attention=fam.name == "sd2", **extra)


def tiny_vae_config(levels: int = 2, channels: int = 32, latent_channels: int = 4,
                    scaling_factor: float = 0.18215) -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
                block_out_channels=(channels,) * levels, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                norm_num_groups=32, sample_size=8 * 2 ** (levels - 1), scaling_factor=scaling_factor)


@torch.no_grad()
def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter, so norm weights/biases are not all 1/0."""
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


def tiny_components(family: str = "sd1", seed: int = 0, inpaint: bool = False,
                    prediction: Prediction = "eps", vae_levels: int = 2) -> TinyComponents:
    """Seeded tiny SD1 / SD2 / SDXL components (fp32, CPU, eval mode)."""
    fam = make_family(family, inpaint=inpaint, prediction=prediction)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)   # module initialisers draw from the global RNG
    if fam.name == "sdxl":
        encoders: dict[str, torch.nn.Module] = {
            "l": CLIPTextModel(clip_config("l", 32)),
            "g": CLIPTextModelWithProjection(clip_config("g", 64, projection_dim=64)),
        }
        context_dim, pooled_dim = 32 + 64, 64
    elif fam.name == "sd2":
        encoders = {"h": CLIPTextModel(clip_config("h", 32))}
        context_dim, pooled_dim = 32, 0
    else:
        encoders = {"l": CLIPTextModel(clip_config("l", 32))}
        context_dim, pooled_dim = 32, 0
    unet = UNet2DConditionModel(**tiny_unet_config(fam, context_dim, pooled_dim))
    vae = AutoencoderKL(**tiny_vae_config(vae_levels, scaling_factor=fam.latent_scale_factor))
    for m in (unet, vae, *encoders.values()):
        perturb_(m, gen)
        m.eval()
    extra: dict[str, torch.Tensor] = {}
    if fam.name == "sd2" and not fam.inpaint:
        # SD2 files carry no prediction marker; the loader reads the spread of this LayerNorm bias
        # (std > 0.09 -> v). Give the tiny model the spread its kind has.
        last_attn = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias
        with torch.no_grad():
            last_attn.copy_(torch.randn(last_attn.shape, generator=gen) * (0.2 if prediction == "v" else 0.02))
    if fam.name == "sdxl" and prediction == "v":
        extra["v_pred"] = torch.tensor([])
    return TinyComponents(unet=unet, vae=vae, text_encoders=encoders, family=fam, extra=extra)
