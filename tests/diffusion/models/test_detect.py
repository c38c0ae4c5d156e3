"""diffusion/models/detect.py and the config-from-shapes rules, on tiny ldm state dicts and on full-size
layouts (meta-device modules: real names and shapes, no memory)."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusion.demo.checkpoint import (
    SD15_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    ldm_state_dict,
    tiny_components,
)
from diffusion.models.convert.clip import clip_config, clip_l_to_ldm, openclip_to_ldm
from diffusion.models.convert.unet import unet_config_from_ldm, unet_to_ldm
from diffusion.models.detect import ModelFamily, detect_family, family
from diffusion.models.errors import ModelFileError


@pytest.mark.parametrize("name,inpaint,prediction", [
    ("sd1", False, "eps"), ("sd1", True, "eps"), ("sd2", False, "eps"), ("sd2", False, "v"),
    ("sd2", True, "eps"), ("sdxl", False, "eps"), ("sdxl", False, "v"), ("sdxl", True, "eps"),
])
def test_tiny_families_detected(name: str, inpaint: bool, prediction: str) -> None:
    sd = ldm_state_dict(tiny_components(name, seed=1, inpaint=inpaint, prediction=prediction))
    fam = detect_family(sd, "tiny.safetensors")
    assert (fam.name, fam.inpaint, fam.prediction) == (name, inpaint, prediction)
    assert fam.unet_in_channels == (9 if inpaint else 4)
    assert fam.text_encoders == {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}[name]


def test_prediction_override_and_family_records() -> None:
    sd = ldm_state_dict(tiny_components("sd2", prediction="v"))
    assert detect_family(sd, prediction="eps").prediction == "eps"
    assert family("sdxl").latent_scale_factor == 0.13025 and family("sd1").latent_scale_factor == 0.18215
    with pytest.raises(ValueError, match="unknown model family"):
        family("sd3")
    assert isinstance(family("sd1"), ModelFamily) and family("sd1") == family("sd1")


def _meta_ldm(unet_cfg: dict, encoders: dict[str, str]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        sd = unet_to_ldm(UNet2DConditionModel(**unet_cfg))
        if "l" in encoders:
            sd.update(clip_l_to_ldm(CLIPTextModel(clip_config("l", 768, 12, 3072, 49408, 77)), encoders["l"]))
        if "g" in encoders:
            g = CLIPTextModelWithProjection(clip_config("g", 1280, 32, 5120, 49408, 77, projection_dim=1280))
            sd.update(openclip_to_ldm(g, encoders["g"]))
    return sd


def test_full_size_sd15_layout() -> None:
    sd = _meta_ldm(SD15_UNET_CONFIG, {"l": "cond_stage_model.transformer."})
    assert len([k for k in sd if k.startswith("model.diffusion_model.")]) == 686      # formats.md 1.6
    assert tuple(sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320, 1, 1)
    fam = detect_family(sd, "sd15.safetensors")
    assert fam.name == "sd1" and not fam.inpaint
    cfg = unet_config_from_ldm(sd, fam)
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == SD15_UNET_CONFIG["down_block_types"]
    assert cfg["up_block_types"] == SD15_UNET_CONFIG["up_block_types"]
    assert cfg["cross_attention_dim"] == 768 and cfg["attention_head_dim"] == 8
    assert cfg["use_linear_projection"] is False and "addition_embed_type" not in cfg


def test_full_size_sdxl_layout() -> None:
    sd = _meta_ldm(SDXL_UNET_CONFIG, {"l": "conditioner.embedders.0.transformer.",
                                      "g": "conditioner.embedders.1.model."})
    assert len([k for k in sd if k.startswith("model.diffusion_model.")]) == 1680     # formats.md 1.6
    assert tuple(sd["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    assert tuple(sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape) == (3840, 1280)
    fam = detect_family(sd, "sdxl.safetensors")
    assert fam.name == "sdxl"
    cfg = unet_config_from_ldm(sd, fam, pooled_dim=1280)
    assert cfg["transformer_layers_per_block"][1:] == (2, 10)
    assert cfg["attention_head_dim"] == [5, 10, 20]
    assert cfg["addition_time_embed_dim"] == 256 and cfg["projection_class_embeddings_input_dim"] == 2816


def test_unet_only_file_falls_back_on_context_width() -> None:
    sd = _meta_ldm(SD15_UNET_CONFIG, {})
    assert detect_family(sd).name == "sd1"


def test_unknown_architectures_are_named() -> None:
    with pytest.raises(ModelFileError, match=r"x\.safetensors.*no Stable Diffusion UNet.*2 tensors"):
        detect_family({"foo.weight": torch.zeros(2), "bar": torch.zeros(1)}, "x.safetensors")
    sd = ldm_state_dict(tiny_components("sd1"))
    pix2pix = dict(sd)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    pix2pix["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 8, 3, 3)
    with pytest.raises(ModelFileError, match="InstructPix2Pix"):
        detect_family(pix2pix, "p2p.safetensors")
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
               for k, v in ldm_state_dict(tiny_components("sdxl")).items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ModelFileError, match="refiner"):
        detect_family(refiner, "refiner.safetensors")
    no_text = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}   # tiny width 32
    with pytest.raises(ModelFileError, match="cross-attention width of 32"):
        detect_family(no_text, "odd.safetensors")
