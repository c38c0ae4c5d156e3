"""Which model family a state dict holds, read from its key names and tensor shapes alone.

Rules (formats.md 1.3 / 1.4), first match wins:
  SDXL base    `conditioner.embedders.1.model.ln_final.weight` (OpenCLIP bigG as the second encoder)
  SDXL refiner `conditioner.embedders.0.model.*` without `embedders.1`   -> refused (not supported)
  SD2.x        `cond_stage_model.model.*` (OpenCLIP-H text encoder)
  SD1.x        `cond_stage_model.transformer.*` (HF CLIP-L text encoder)
  UNet only    the cross-attention width `attn2.to_k.weight.shape[1]`: 768 sd1, 1024 sd2, 2048 sdxl
Inpainting: `input_blocks.0.0.weight.shape[1] == 9`. Nothing here depends on absolute channel widths
except the UNet-only fallback, so tiny demo models are detected by the same code as real files.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import shape_of

UNET_PREFIX = "model.diffusion_model."
FamilyName = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class ModelFamily:
    """What kind of Stable Diffusion model a file holds (not its sizes: those live in module configs)."""

    name: FamilyName
    inpaint: bool = False                 # UNet takes 9 channels: latent 4 + mask 1 + masked-image latent 4
    prediction: Prediction = "eps"        # what the UNet outputs
    zsnr: bool = False                    # SDXL `ztsnr` marker: zero-terminal-SNR sigmas
    text_encoders: tuple[str, ...] = ("l",)   # encoder keys of diffusion.prompts.clip.CLIP: "l", "h", "g"
    latent_channels: int = 4
    latent_scale_factor: float = 0.18215

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def unet_in_channels(self) -> int:
        return self.latent_channels * 2 + 1 if self.inpaint else self.latent_channels

    def with_(self, **changes: object) -> ModelFamily:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


SD1 = ModelFamily("sd1", text_encoders=("l",), latent_scale_factor=0.18215)
SD2 = ModelFamily("sd2", text_encoders=("h",), latent_scale_factor=0.18215)
SDXL = ModelFamily("sdxl", text_encoders=("l", "g"), latent_scale_factor=0.13025)
FAMILIES: dict[str, ModelFamily] = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def family(name: str, inpaint: bool = False, prediction: Prediction = "eps") -> ModelFamily:
    """The family record for a name ("sd1", "sd2", "sdxl"), e.g. for tiny demo models."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name].with_(inpaint=inpaint, prediction=prediction)


def _has_prefix(keys: Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _cross_attention_width(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Context width D from the first `attn2.to_k.weight` [C, D] of the UNet."""
    for k in sd:
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return int(shape_of(sd, k)[1])
    return None


def _last_output_block(sd: Mapping[str, torch.Tensor]) -> int:
    n = -1
    for k in sd:
        if k.startswith(UNET_PREFIX + "output_blocks."):
            n = max(n, int(k[len(UNET_PREFIX + "output_blocks."):].split(".", 1)[0]))
    return n


def guess_sd2_prediction(sd: Mapping[str, torch.Tensor], in_channels: int) -> Prediction:
    """ComfyUI's rule: SD2 with 4 input channels is v-prediction when the population std of the
    last output block's first transformer `norm1.bias` exceeds 0.09; SD2 inpainting is eps."""
    if in_channels != 4:
        return "eps"
    key = f"{UNET_PREFIX}output_blocks.{_last_output_block(sd)}.1.transformer_blocks.0.norm1.bias"
    if key not in sd:
        return "eps"
    return "v" if float(sd[key].float().std(unbiased=False)) > 0.09 else "eps"


def describe_keys(sd: Mapping[str, object], limit: int = 5) -> str:
    keys = list(sd)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} tensors ({shown}{', ...' if len(keys) > limit else ''})"


def detect_family(sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str] = "<state dict>",
                  prediction: Literal["auto", "eps", "v"] = "auto") -> ModelFamily:
    """The family of an ldm-layout checkpoint state dict; ModelFileError if it is none we know."""
    in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    if in_key not in sd:
        raise ModelFileError(path, "no Stable Diffusion UNet (`model.diffusion_model.input_blocks.0.0.weight`) "
                                   f"in it; found {describe_keys(sd)}")
    in_channels = int(shape_of(sd, in_key)[1])
    if in_channels not in (4, 9):
        what = "an InstructPix2Pix model (8 input channels)" if in_channels == 8 else f"{in_channels} UNet input channels"
        raise ModelFileError(path, f"unsupported architecture: {what}; expected 4 (txt2img) or 9 (inpainting)")
    inpaint = in_channels == 9

    if "conditioner.embedders.1.model.ln_final.weight" in sd:
        fam = SDXL
    elif _has_prefix(sd, "conditioner.embedders.0.model."):
        raise ModelFileError(path, "an SDXL refiner checkpoint (single OpenCLIP bigG encoder); not supported")
    elif _has_prefix(sd, "embedder.model.") or (_has_prefix(sd, UNET_PREFIX + "label_emb.")
                                                 and not _has_prefix(sd, "conditioner.")):
        raise ModelFileError(path, "an SD2 unCLIP checkpoint (image embedder / class embedding); not supported")
    elif _has_prefix(sd, "cond_stage_model.model."):
        fam = SD2
    elif _has_prefix(sd, "cond_stage_model.transformer."):
        fam = SD1
    else:
        width = _cross_attention_width(sd)
        by_width = {768: SD1, 1024: SD2, 2048: SDXL}
        if width not in by_width:
            raise ModelFileError(path, "unknown architecture: no text encoder keys and a cross-attention width "
                                       f"of {width}; found {describe_keys(sd)}")
        fam = by_width[width]
    fam = fam.with_(inpaint=inpaint)

    if prediction != "auto":
        return fam.with_(prediction=prediction)
    if fam.name == "sd2":
        return fam.with_(prediction=guess_sd2_prediction(sd, in_channels))
    if fam.name == "sdxl":
        if "edm_mean" in sd and "edm_std" in sd:
            raise ModelFileError(path, "a Playground v2.5 (EDM) checkpoint; not supported")
        if "v_pred" in sd or "edm_vpred.sigma_max" in sd:
            return fam.with_(prediction="v", zsnr="ztsnr" in sd)
    return fam
