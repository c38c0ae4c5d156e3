"""UNet: ldm (`model.diffusion_model.*`) <-> diffusers `UNet2DConditionModel`, and its config from shapes.

Block arithmetic (formats.md 1.6), L = layers_per_block:
  down_blocks.b.resnets.j / attentions.j  <->  input_blocks.{1 + b(L+1) + j}.0 / .1
  down_blocks.b.downsamplers.0.conv       <->  input_blocks.{(b+1)(L+1)}.0.op
  up_blocks.b.resnets.j / attentions.j    <->  output_blocks.{b(L+1) + j}.0 / .1   (L+1 resnets per level)
  up_blocks.b.upsamplers.0.conv           <->  output_blocks.{b(L+1) + L}.{1 without attention, 2 with}.conv
Inside resnets the layer names change (norm1 <-> in_layers.0 ...); attention internals keep their names.
One map (diffusers name -> ldm name) serves both directions; no tensor changes shape.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch

from diffusion.models.detect import UNET_PREFIX, ModelFamily
from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import shape_of

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_tail(tail: str) -> str:
    layer, rest = tail.split(".", 1)
    return f"{RESNET_TO_LDM[layer]}.{rest}"


def diffusers_to_ldm_name(name: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """ldm name (without `model.diffusion_model.`) of one diffusers UNet parameter name."""
    L = layers_per_block
    for d, l in TOP_TO_LDM.items():
        if name.startswith(d + "."):
            return l + name[len(d):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        kind, b, part, j, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down":
            if part == "downsamplers":
                return f"input_blocks.{(b + 1) * (L + 1)}.0.op.{tail.removeprefix('conv.')}"
            n = 1 + b * (L + 1) + j
            return f"input_blocks.{n}.0.{_resnet_tail(tail)}" if part == "resnets" else f"input_blocks.{n}.1.{tail}"
        n = b * (L + 1) + j
        if part == "upsamplers":
            n = b * (L + 1) + L
            return f"output_blocks.{n}.{2 if up_has_attention[b] else 1}.{tail}"
        return f"output_blocks.{n}.0.{_resnet_tail(tail)}" if part == "resnets" else f"output_blocks.{n}.1.{tail}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        part, j, tail = m.groups()
        if part == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{0 if j == '0' else 2}.{_resnet_tail(tail)}"
    raise KeyError(f"no ldm name for diffusers UNet parameter {name!r}")


def unet_key_map(diffusers_names: Iterable[str], config: Mapping) -> dict[str, str]:
    """diffusers parameter name -> full ldm key (with `model.diffusion_model.`)."""
    L = int(config["layers_per_block"])
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    return {n: UNET_PREFIX + diffusers_to_ldm_name(n, L, up_attn) for n in diffusers_names}


# --- config from shapes (formats.md 1.5) -------------------------------------------------------

def _block_indices(sd: Mapping[str, torch.Tensor], group: str) -> list[int]:
    pre = UNET_PREFIX + group + "."
    return sorted({int(k[len(pre):].split(".", 1)[0]) for k in sd if k.startswith(pre)})


def _transformer_depth(sd: Mapping[str, torch.Tensor], block: str) -> int:
    pre = f"{UNET_PREFIX}{block}.transformer_blocks."
    found = {int(k[len(pre):].split(".", 1)[0]) for k in sd if k.startswith(pre)}
    return max(found) + 1 if found else 0


def unet_config_from_ldm(sd: Mapping[str, torch.Tensor], fam: ModelFamily,
                         path: str | os.PathLike[str] = "<state dict>", pooled_dim: int | None = None) -> dict:
    """A UNet2DConditionModel config read from an ldm state dict's names and shapes."""
    P = UNET_PREFIX
    conv_in = shape_of(sd, P + "input_blocks.0.0.weight")        # [C0, in, 3, 3]
    model_channels, in_channels = int(conv_in[0]), int(conv_in[1])
    # Walk input_blocks: resnets of the current level until a downsampler (`N.0.op`) closes it.
    levels: list[dict] = [{"resnets": 0, "channels": None, "depth": 0}]
    for n in _block_indices(sd, "input_blocks")[1:]:
        if f"{P}input_blocks.{n}.0.op.weight" in sd:
            levels.append({"resnets": 0, "channels": None, "depth": 0})
            continue
        conv2_key = f"{P}input_blocks.{n}.0.out_layers.3.weight"
        if conv2_key not in sd:
            raise ModelFileError(path, f"unknown UNet layout: input_blocks.{n} is neither a resnet nor a downsampler")
        lvl = levels[-1]
        lvl["resnets"] += 1
        lvl["channels"] = int(shape_of(sd, conv2_key)[0])
        lvl["depth"] = max(lvl["depth"], _transformer_depth(sd, f"input_blocks.{n}.1"))
    per_level = {lvl["resnets"] for lvl in levels}
    if len(per_level) != 1 or 0 in per_level:
        raise ModelFileError(path, f"unknown UNet layout: resnets per level {[l['resnets'] for l in levels]}")
    attn_k = next((shape_of(sd, k) for k in sd if k.startswith(P) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape_of(sd, k) for k in sd if k.startswith(P) and k.endswith(".proj_in.weight")), None)
    if attn_k is None or proj_in is None:
        raise ModelFileError(path, "unknown UNet layout: no cross-attention (attn2.to_k) layers")
    linear = len(proj_in) == 2                                   # SD2/SDXL Linear; SD1 1x1 conv
    channels = [int(l["channels"]) for l in levels]
    has_attn = [l["depth"] > 0 for l in levels]
    mid_depth = _transformer_depth(sd, "middle_block.1")
    depths = [l["depth"] or 1 for l in levels]
    if mid_depth != depths[-1]:
        raise ModelFileError(path, f"unsupported UNet: middle block depth {mid_depth} differs from the last "
                                   f"level's {depths[-1]}")
    # Heads are not stored in shapes: ldm SD1 uses 8 heads, SD2/SDXL head size 64.
    heads: int | list[int] = [max(1, c // 64) for c in channels] if linear else 8
    config: dict = dict(
        sample_size=128 if fam.is_sdxl else 64, in_channels=in_channels,
        out_channels=int(shape_of(sd, P + "out.2.weight")[0]), block_out_channels=tuple(channels),
        layers_per_block=levels[0]["resnets"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        cross_attention_dim=int(attn_k[1]), attention_head_dim=heads,
        use_linear_projection=linear, transformer_layers_per_block=tuple(depths),
        upcast_attention=fam.name == "sd2")
    time_dim = int(shape_of(sd, P + "time_embed.0.weight")[0])
    if time_dim != 4 * model_channels:
        config["time_embedding_dim"] = time_dim
    if P + "label_emb.0.0.weight" in sd:
        adm = int(shape_of(sd, P + "label_emb.0.0.weight")[1])       # pooled text + 6 Fourier features
        if not fam.is_sdxl:
            raise ModelFileError(path, f"unsupported UNet class embedding of width {adm} in a {fam.name} file")
        fourier = (adm - pooled_dim) // 6 if pooled_dim else 256
        if pooled_dim and (adm - pooled_dim) % 6:
            raise ModelFileError(path, f"SDXL added embedding width {adm} does not fit pooled width {pooled_dim}")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=fourier,
                      projection_class_embeddings_input_dim=adm)
    return config


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], names: Iterable[str], config: Mapping,
                      path: str | os.PathLike[str] = "<state dict>") -> dict[str, torch.Tensor]:
    """The diffusers state dict for the given parameter names; every ldm UNet key must be consumed."""
    key_map = unet_key_map(names, config)
    missing = [l for l in key_map.values() if l not in sd]
    if missing:
        raise ModelFileError(path, f"UNet tensors missing: {', '.join(missing[:5])}"
                                   f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    used = set(key_map.values())
    left = [k for k in sd if k.startswith(UNET_PREFIX) and k not in used]
    if left:
        raise ModelFileError(path, f"UNet tensors not understood: {', '.join(left[:5])}"
                                   f"{' ...' if len(left) > 5 else ''} ({len(left)} in all)")
    return {d: sd[l] for d, l in key_map.items()}


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ldm-layout tensors of a diffusers UNet (for writers of test and demo checkpoints)."""
    state = unet.state_dict()
    return {l: state[d] for d, l in unet_key_map(state, unet.config).items()}
