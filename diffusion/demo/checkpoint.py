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

from diffusion.models.detect import ModelFamily, Prediction
from diffusion.models.detect import family as make_family

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
                     block_out_channels: tuple[int, ...] = (32, 64), fast: bool = False) -> dict:
    """A small UNet2DConditionModel config shaped like the family (attention layout, projections).

    `fast` (the demo checkpoint): SD1/SD2 attention only at the half-resolution level, as SDXL
    does, because self-attention over all 4096 latent cells of a 512x512 image costs ~25x the rest
    of a tiny UNet's step on a CPU."""
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
        if fast:
            down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
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
                    prediction: Prediction = "eps", vae_levels: int = 2, fast: bool = False) -> TinyComponents:
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
    unet = UNet2DConditionModel(**tiny_unet_config(fam, context_dim, pooled_dim, fast=fast))
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


# --- writers of ldm-layout single-file checkpoints ---------------------------------------------

TEXT_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"l": "cond_stage_model.transformer."},
    "sd2": {"h": "cond_stage_model.model."},
    "sdxl": {"l": "conditioner.embedders.0.transformer.", "g": "conditioner.embedders.1.model."},
}


def ldm_state_dict(components: TinyComponents) -> dict[str, torch.Tensor]:
    """All components in the original single-file layout (UNet, VAE, text encoders, markers)."""
    from diffusion.models.convert.clip import clip_l_to_ldm, openclip_to_ldm
    from diffusion.models.convert.unet import unet_to_ldm
    from diffusion.models.convert.vae import vae_to_ldm

    sd = {**unet_to_ldm(components.unet), **vae_to_ldm(components.vae)}
    for key, model in components.text_encoders.items():
        prefix = TEXT_PREFIXES[components.family.name][key]
        sd.update(clip_l_to_ldm(model, prefix) if key == "l" else openclip_to_ldm(model, prefix))
    sd.update(components.extra)
    return sd


def write_ldm_checkpoint(components: TinyComponents, path: str | os.PathLike[str],
                         dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write `components` as one ldm-layout file: `.safetensors`, or `.ckpt`/`.pt` (torch.save of a
    {"state_dict": ...} dict like the original training code). Written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().clone()
          for k, v in ldm_state_dict(components).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if path.suffix.lower() in (".safetensors", ".sft"):
        save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
    else:
        torch.save({"state_dict": sd, "global_step": 0}, tmp)
    os.replace(tmp, path)
    return path


DEMO_NAMES = {"sd1": "easel-demo-sd1.safetensors", "sdxl": "easel-demo-sdxl.safetensors"}


def ensure_demo_checkpoint(folder: str | os.PathLike[str], family: str = "sd1", seed: int = 0) -> Path:
    """The tiny demo checkpoint in `folder` (e.g. models/checkpoints), written when missing.

    Its VAE has 4 levels (channels 32) so images are 8x the latent size, as with real models."""
    if family not in DEMO_NAMES:
        raise ValueError(f"no demo checkpoint for family {family!r}; expected one of {sorted(DEMO_NAMES)}")
    path = Path(folder) / DEMO_NAMES[family]
    if not path.is_file():
        comps = tiny_components(family, seed=seed, vae_levels=4, fast=True)
        write_ldm_checkpoint(comps, path, metadata={"easel_demo": f"tiny random {family}, seed {seed}"})
    return path


# --- full-size SD1.5-architecture random checkpoint (benchmarks) --------------------------------

SD15_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                        attention_head_dim=8)
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
SDXL_UNET_CONFIG = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                        layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                        transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def _random_like(shapes: dict[str, torch.Size], gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Init-like random tensors: 1-D norm weights near 1, biases near 0, matrices ~ N(0, 1/fan_in).
    Drawn on the generator's device (a CUDA generator is much faster), returned on the CPU."""
    out = {}
    dev = gen.device
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            t = base + 0.02 * torch.randn(shape, generator=gen, device=dev)
        else:
            fan_in = max(1, int(torch.Size(shape[1:]).numel()))
            t = torch.randn(shape, generator=gen, device=dev) * fan_in ** -0.5
        out[name] = t.to(dtype).cpu()
    return out


def full_size_components(family: str = "sd1", dtype: torch.dtype = torch.float16, seed: int = 0,
                         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """ldm-layout random tensors of a full-size SD1.5 (or SDXL base) architecture, built without
    instantiating fp32 modules (shapes from meta-device modules)."""
    from diffusion.models.convert.clip import clip_config as hf_clip_config
    from diffusion.models.convert.clip import clip_l_to_ldm, openclip_to_ldm
    from diffusion.models.convert.unet import unet_key_map
    from diffusion.models.convert.vae import _is_linear_attn
    from diffusion.models.convert.vae import diffusers_to_ldm_name as vae_name

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL_UNET_CONFIG if family == "sdxl" else SD15_UNET_CONFIG))
        vae = AutoencoderKL(**{**SD15_VAE_CONFIG, "scaling_factor": 0.13025 if family == "sdxl" else 0.18215})
        encoders: dict[str, torch.nn.Module] = {"l": CLIPTextModel(hf_clip_config("l", 768, 12, 3072, VOCAB_SIZE, 77))}
        if family == "sdxl":
            encoders["g"] = CLIPTextModelWithProjection(
                hf_clip_config("g", 1280, 32, 5120, VOCAB_SIZE, 77, projection_dim=1280))
    sd: dict[str, torch.Tensor] = {}
    ushapes = {k: v.shape for k, v in unet.state_dict().items()}
    key_map = unet_key_map(ushapes, unet.config)
    for k, t in _random_like(ushapes, gen, dtype).items():
        sd[key_map[k]] = t
    for k, t in _random_like({k: v.shape for k, v in vae.state_dict().items()}, gen, dtype).items():
        sd["first_stage_model." + vae_name(k, 4)] = t[:, :, None, None] if _is_linear_attn(k) else t
    for key, enc in encoders.items():
        prefix = TEXT_PREFIXES["sdxl" if family == "sdxl" else "sd1"][key]
        shapes = {k: v.shape for k, v in enc.state_dict().items() if not k.endswith("position_ids")}
        real = _random_like(shapes, gen, dtype)
        names = clip_l_to_ldm(_Holder(real, enc), prefix) if key == "l" else openclip_to_ldm(_Holder(real, enc), prefix)
        sd.update({k: v.to(dtype) for k, v in names.items()})
    return sd


class _Holder(torch.nn.Module):
    """A state-dict stand-in with the config and nesting of a meta-device text model."""

    def __init__(self, state: dict[str, torch.Tensor], like: torch.nn.Module) -> None:
        super().__init__()
        self._state, self.config = state, like.config
        if hasattr(like, "text_model"):
            self.text_model = torch.nn.Identity()

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._state)


def write_full_size_checkpoint(path: str | os.PathLike[str], family: str = "sd1",
                               dtype: torch.dtype = torch.float16, seed: int = 0,
                               device: torch.device | str = "cpu") -> Path:
    """A full-size random SD1.5-architecture (or SDXL) checkpoint in ldm layout, for benchmarks."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(full_size_components(family, dtype, seed, device), str(tmp), metadata={"easel_demo": f"full-size random {family}"})
    os.replace(tmp, path)
    return path
