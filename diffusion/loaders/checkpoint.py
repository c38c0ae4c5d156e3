"""Loading checkpoints: a single ldm-layout file or a diffusers folder -> (MODEL, CLIP, VAE) values.

    patcher, clip, vae = load_checkpoint(path)              # device/dtypes from devices.current_config()
    vae = load_vae(path)                                     # a standalone VAE file (ldm or diffusers names)

Single files: read safely (state_dict.py), detect the family from names and shapes (detect.py), build
each module's config from shapes (convert_*.py), create the modules on the meta device and assign the
file's tensors (cast to the run's dtypes) -- no random initialisation, no Hub, no YAML.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffusion.models import devices
from diffusion.models.convert.clip import clip_l_from_ldm, openclip_from_ldm
from diffusion.models.convert.unet import unet_config_from_ldm, unet_to_diffusers
from diffusion.models.convert.vae import (
    _is_linear_attn,
    vae_config_from_ldm,
    vae_prefix,
    vae_to_diffusers,
)
from diffusion.models.convert.vae import diffusers_to_ldm_name as vae_ldm_name
from diffusion.models.detect import ModelFamily, detect_family
from diffusion.models.detect import family as make_family
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import load_state_dict, open_state_dict, shape_of, with_dtype
from diffusion.models.vae import VAE
from diffusion.patches.patcher import ModelPatcher
from diffusion.prompts.clip import CLIP

PredictionChoice = Literal["auto", "eps", "v"]
TEXT_PREFIXES = {"sd1": {"l": "cond_stage_model.transformer."},
                 "sd2": {"h": "cond_stage_model.model."},
                 "sdxl": {"l": "conditioner.embedders.0.transformer.", "g": "conditioner.embedders.1.model."}}


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, path: os.PathLike | str,
            what: str) -> None:
    """Give a meta-device module the file's tensors (cast to dtype); shape mismatches -> ModelFileError."""
    expected = module.state_dict()
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise ModelFileError(path, f"{what} tensor {k}: shape {list(v.shape)}, the layout implies "
                                       f"{list(expected[k].shape)}")
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    module.eval().requires_grad_(False)


def build_unet(sd: Mapping[str, torch.Tensor], fam: ModelFamily, dtype: torch.dtype,
               path: os.PathLike | str = "<state dict>") -> UNet2DConditionModel:
    proj_key = "conditioner.embedders.1.model.text_projection"            # [D, P]: P = pooled width
    pooled = int(shape_of(sd, proj_key)[1]) if proj_key in sd else None
    cfg = unet_config_from_ldm(sd, fam, path, pooled_dim=pooled)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    state = unet_to_diffusers(sd, list(unet.state_dict()), cfg, path)
    _assign(unet, state, dtype, path, "UNet")
    return unet


def build_vae(sd: Mapping[str, torch.Tensor], prefix: str, scale: float, dtype: torch.dtype,
              path: os.PathLike | str = "<state dict>") -> AutoencoderKL:
    cfg = vae_config_from_ldm(sd, prefix, scale, path)
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    state = vae_to_diffusers(sd, prefix, list(vae.state_dict()), cfg, path)
    _assign(vae, state, dtype, path, "VAE")
    return vae


def build_text_encoders(sd: Mapping[str, torch.Tensor], fam: ModelFamily, dtype: torch.dtype,
                        path: os.PathLike | str = "<state dict>") -> dict[str, torch.nn.Module]:
    """{"l"/"h"/"g": transformers model}; empty when the file has no text encoder (UNet-only files)."""
    encoders: dict[str, torch.nn.Module] = {}
    for key, prefix in TEXT_PREFIXES[fam.name].items():
        if not any(k.startswith(prefix) for k in sd):
            continue
        if key == "l":
            encoders[key] = clip_l_from_ldm(sd, prefix, path, dtype=dtype)
        else:
            encoders[key] = openclip_from_ldm(sd, prefix, with_projection=key == "g", path=path, dtype=dtype)
    return encoders


def load_checkpoint(path: str | os.PathLike[str], config: devices.DeviceConfig | None = None,
                    prediction: PredictionChoice = "auto", embedding_dirs: Sequence[str | os.PathLike[str]] = ()
                    ) -> tuple[ModelPatcher, CLIP | None, VAE | None]:
    """(MODEL, CLIP, VAE) of a checkpoint file or diffusers folder. CLIP / VAE are None when absent."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, config, prediction, embedding_dirs)
    config = config or devices.current_config()
    device = devices.torch_device(config)
    # safetensors: read tensor by tensor, cast as read (peak memory ~ the built modules, not file + modules)
    sd = open_state_dict(path)
    fam = detect_family(sd, path, prediction)
    unet_dtype, text_dtype = devices.unet_dtype(config, device), devices.text_dtype(config, device)
    vae_dtype = devices.vae_dtype(config, device)
    unet = build_unet(with_dtype(sd, unet_dtype), fam, unet_dtype, path)
    encoders = build_text_encoders(with_dtype(sd, text_dtype), fam, text_dtype, path)
    prefix = vae_prefix(sd)
    vae_module = (build_vae(with_dtype(sd, vae_dtype), prefix, fam.latent_scale_factor, vae_dtype, path)
                  if prefix is not None else None)
    return _values(unet, encoders, vae_module, fam, config, embedding_dirs)


def _values(unet: UNet2DConditionModel, encoders: dict[str, torch.nn.Module], vae_module: AutoencoderKL | None,
            fam: ModelFamily, config: devices.DeviceConfig, embedding_dirs: Sequence[str | os.PathLike[str]]
            ) -> tuple[ModelPatcher, CLIP | None, VAE | None]:
    device, offload = devices.torch_device(config), devices.offload_device(config)
    model = DiffusionModel(unet, fam, fam.prediction)
    patcher = ModelPatcher(model, device, offload)
    clip = CLIP(encoders, fam, device, offload, embedding_dirs=[Path(d) for d in embedding_dirs]) if encoders else None
    vae = (VAE(vae_module, fam, device, offload, dtype=devices.vae_dtype(config, device), keep_loaded=not config.lowvram)
           if vae_module is not None else None)
    return patcher, clip, vae


# --- diffusers folders ---------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(path, f"unreadable JSON: {e}") from None


def load_diffusers_folder(folder: Path, config: devices.DeviceConfig | None = None,
                          prediction: PredictionChoice = "auto", embedding_dirs: Sequence[str | os.PathLike[str]] = ()
                          ) -> tuple[ModelPatcher, CLIP | None, VAE | None]:
    """A diffusers pipeline folder (unet/, vae/, text_encoder/, text_encoder_2/, scheduler/), local only."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = config or devices.current_config()
    device = devices.torch_device(config)
    if not (folder / "unet" / "config.json").is_file():
        raise ModelFileError(folder, "a folder without unet/config.json: not a diffusers pipeline folder")
    ucfg = _read_json(folder / "unet" / "config.json")
    te_dir = folder / "text_encoder"
    te_cfg = _read_json(te_dir / "config.json") if (te_dir / "config.json").is_file() else {}
    if ucfg.get("addition_embed_type") == "text_time":
        name = "sdxl"
    elif te_cfg.get("hidden_act") == "gelu" or ucfg.get("cross_attention_dim") == 1024:
        name = "sd2"
    elif ucfg.get("cross_attention_dim") == 768 or te_cfg:
        name = "sd1"
    else:
        raise ModelFileError(folder, f"unknown architecture in unet/config.json: {ucfg.get('_class_name')}, "
                                     f"cross_attention_dim {ucfg.get('cross_attention_dim')}")
    pred = prediction
    if pred == "auto":
        sched = folder / "scheduler" / "scheduler_config.json"
        pred = "v" if sched.is_file() and _read_json(sched).get("prediction_type") == "v_prediction" else "eps"
    fam = make_family(name, inpaint=int(ucfg.get("in_channels", 4)) == 9, prediction=pred)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True,
                                                    torch_dtype=devices.unet_dtype(config, device))
        encoders: dict[str, torch.nn.Module] = {}
        tdtype = devices.text_dtype(config, device)
        if te_cfg:
            encoders["h" if name == "sd2" else "l"] = CLIPTextModel.from_pretrained(te_dir, local_files_only=True,
                                                                                    dtype=tdtype)
        if (folder / "text_encoder_2" / "config.json").is_file():
            encoders["g"] = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                        local_files_only=True, dtype=tdtype)
        vae_module = (AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True,
                                                    torch_dtype=devices.vae_dtype(config, device))
                      if (folder / "vae" / "config.json").is_file() else None)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(folder, f"diffusers folder could not be read: {str(e).splitlines()[0]}") from None
    for m in (unet, vae_module, *encoders.values()):
        if m is not None:
            m.eval().requires_grad_(False)
    if vae_module is not None:
        fam = fam.with_(latent_scale_factor=float(vae_module.config.scaling_factor))
    return _values(unet, encoders, vae_module, fam, config, embedding_dirs)


# --- standalone VAE files ------------------------------------------------------------------------

SDXL_VAE_SCALE, SD_VAE_SCALE = 0.13025, 0.18215


def guess_vae_scale(path: Path, metadata: dict[str, str]) -> float:
    """The `scaling_factor` written into a standalone VAE's diffusers config (for plugins that read
    it; Easel's sampler scales by the MODEL's factor). SD1/SD2 and SDXL VAEs have identical shapes,
    so it comes from metadata or the name (`sdxl_vae.safetensors`); SD's 0.18215 otherwise."""
    for key in ("scaling_factor", "modelspec.scaling_factor"):
        if key in metadata:
            try:
                return float(metadata[key])
            except ValueError:
                pass
    arch = metadata.get("modelspec.architecture", "").lower()
    return SDXL_VAE_SCALE if "xl" in path.name.lower() or "xl" in arch else SD_VAE_SCALE


def load_vae(path: str | os.PathLike[str], config: devices.DeviceConfig | None = None,
             scale_factor: float | None = None) -> VAE:
    """A VAE from a standalone file (bare ldm names, `first_stage_model.`/`vae.` prefixed, or diffusers
    names) or from a checkpoint that contains one."""
    path = Path(path)
    config = config or devices.current_config()
    device = devices.torch_device(config)
    loaded = load_state_dict(path, with_metadata=True)
    assert isinstance(loaded, tuple)
    sd, meta = loaded
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        # diffusers names: map to ldm names (linear attention weights back to 1x1 convs) and go one way
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        sd = {vae_ldm_name(k, levels): (v[:, :, None, None] if _is_linear_attn(k) and v.ndim == 2 else v)
              for k, v in sd.items()}
    prefix = vae_prefix(sd)
    if prefix is None:
        from diffusion.models.detect import describe_keys
        raise ModelFileError(path, f"no VAE in it (expected `encoder.conv_in.weight`); found {describe_keys(sd)}")
    scale = scale_factor if scale_factor is not None else guess_vae_scale(path, meta)
    module = build_vae(sd, prefix, scale, devices.vae_dtype(config, device), path)
    return VAE(module, None, device, devices.offload_device(config), dtype=devices.vae_dtype(config, device),
               keep_loaded=not config.lowvram)
