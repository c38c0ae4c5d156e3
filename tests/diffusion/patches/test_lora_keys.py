"""LoRA key names -> parameter names of our modules (formats.md 1.6, 2.2, 2.6)."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion.demo.checkpoint import tiny_components
from diffusion.patches.lora.keys import (_block_layout, clip_key_map, diffusers_to_ldm, encoder_prefixes, module_paths,
                                 split_key, unet_key_map)


@pytest.mark.parametrize("key,module,part", [
    ("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", "lora_unet_mid_block_attentions_0_proj_in", "down"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down"),
    ("unet.x.to_q.lora.up.weight", "unet.x.to_q", "up"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out", "up"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "down"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", "lora_te_text_model_encoder_layers_0_mlp_fc1", "alpha"),
    ("m.hada_w1_a", "m", "hada_w1_a"), ("m.lokr_w2_b", "m", "lokr_w2_b"), ("m.lokr_t2", "m", "lokr_t2"),
    ("m.diff_b", "m", "diff_b"), ("m.dora_scale", "m", "dora_scale"),
    ("unet.m.lora_magnitude_vector", "unet.m", "dora_scale"), ("m.on_input", "m", "on_input"),
])
def test_split_key(key, module, part):
    assert split_key(key) == (module, part)


def test_split_key_unknown_suffix():
    assert split_key("lora_unet_x.something_else") is None


def full_unet_paths(family: str) -> list[str]:
    if family == "sd1":
        cfg = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
    else:
        cfg = dict(block_out_channels=(320, 640, 1280),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return module_paths(n for n, _ in unet.named_parameters())


# formats.md 1.6 "Resulting prefixes" table
SD1_LDM = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
    "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.resnets.2.norm2": "output_blocks.2.0.out_layers.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.0.proj_out": "output_blocks.3.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.11.1.transformer_blocks.0.ff.net.2",
    "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
}
SDXL_LDM = {
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
    "add_embedding.linear_1": "label_emb.0.0",
}


@pytest.mark.parametrize("family,table", [("sd1", SD1_LDM), ("sdxl", SDXL_LDM)])
def test_diffusers_to_ldm_matches_the_table(family, table):
    paths = full_unet_paths(family)
    layout = _block_layout(paths)
    for d, ldm in table.items():
        assert d in paths
        assert diffusers_to_ldm(d, layout) == ldm
    assert all(diffusers_to_ldm(p, layout) is not None for p in paths)
    # every module gets its own ldm name
    names = [diffusers_to_ldm(p, layout) for p in paths]
    assert len(set(names)) == len(names)


def test_unet_key_map_spellings():
    paths = full_unet_paths("sd1")
    kmap = unet_key_map("unet." + p + ".weight" for p in paths)
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    target = "unet." + q
    for spelling in ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                     "unet." + q, q, "base_model.model." + q,
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q",
                     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q",
                     "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"]:
        assert kmap[spelling] == target, spelling
    out0 = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"
    assert kmap["up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out"] == out0
    assert kmap["lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"] == out0
    assert kmap["lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0"] == out0
    assert kmap["lora_unet_up_blocks_0_upsamplers_0_conv"] == "unet.up_blocks.0.upsamplers.0.conv"
    assert kmap["lora_unet_output_blocks_2_1_conv"] == "unet.up_blocks.0.upsamplers.0.conv"


def test_encoder_prefixes_per_family():
    assert encoder_prefixes(["l"])["l"] == (["lora_te_", "lora_te1_"], ["text_encoder."])
    assert encoder_prefixes(["h"])["h"][0] == ["lora_te_", "lora_te1_"]
    both = encoder_prefixes(["l", "g"])
    assert both["g"] == (["lora_te2_"], ["text_encoder_2."])
    assert "lora_te_" in encoder_prefixes(["g"])["g"][0]


def test_clip_key_map_flattened_and_nested_encoders():
    c = tiny_components("sdxl")
    names = [f"{k}.{n}" for k, m in c.text_encoders.items() for n, _ in m.named_parameters()]
    kmap = clip_key_map(names)
    # CLIPTextModel (transformers >= 5.6) has no text_model. in its keys; WithProjection keeps it
    assert kmap["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "l.encoder.layers.0.self_attn.q_proj"
    assert kmap["lora_te_text_model_encoder_layers_1_mlp_fc2"] == "l.encoder.layers.1.mlp.fc2"
    assert kmap["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"] == "l.encoder.layers.0.self_attn.k_proj"
    assert kmap["lora_te2_text_model_encoder_layers_1_self_attn_out_proj"] == "g.text_model.encoder.layers.1.self_attn.out_proj"
    assert kmap["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"] == "g.text_model.encoder.layers.0.mlp.fc1"
    assert kmap["lora_te2_text_projection"] == "g.text_projection"
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in kmap
    assert not any(v.startswith("g.") for k, v in kmap.items() if k.startswith("lora_te1_"))
