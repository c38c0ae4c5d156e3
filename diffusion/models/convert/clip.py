"""Text encoders: ldm / OpenCLIP key layouts <-> transformers CLIP text models, and configs from shapes.

formats.md 1.8. CLIP-L (SD1 `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`)
is already in transformers naming. OpenCLIP (SD2 `cond_stage_model.model.`, SDXL
`conditioner.embedders.1.model.`) needs renames, the fused attention `in_proj_weight` [3D, D] split
into q/k/v rows, and `text_projection` [D, P] (used as x @ P) transposed into a Linear weight [P, D].
transformers >= 5.6 `CLIPTextModel` has no `text_model.` level; `...WithProjection` keeps it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion.models.errors import ModelFileError

IGNORED = ("position_ids", "logit_scale", "attn_mask")
OPENCLIP_TO_HF = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED


def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: sd[k] for k in sd if k.startswith(prefix) and not _ignored(k)}


def _layers(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def clip_config(kind: str, hidden: int, layers: int, intermediate: int, vocab: int, positions: int,
                projection_dim: int | None = None) -> CLIPTextConfig:
    """Config of one encoder: "l" OpenAI CLIP (quick_gelu), "h"/"g" OpenCLIP (gelu); head size 64."""
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=positions,
                          hidden_act="quick_gelu" if kind == "l" else "gelu", layer_norm_eps=1e-5,
                          projection_dim=projection_dim or hidden, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407 if kind == "l" else 0)


# --- CLIP-L (transformers naming inside the checkpoint) -----------------------------------------

def clip_l_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str, path: str | os.PathLike[str] = "<state dict>",
                    with_projection: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build a CLIPTextModel from the tensors under `prefix` (e.g. `cond_stage_model.transformer.`)."""
    sub = _sub(sd, prefix)
    if sub and not any(k.startswith("text_model.") for k in sub):
        sub = {"text_model." + k: v for k, v in sub.items()}     # very old SD1 files lack `text_model.`
    tm = {k[len("text_model."):]: v for k, v in sub.items() if k.startswith("text_model.")}
    try:
        tok = tm["embeddings.token_embedding.weight"]                # [vocab, D]
        cfg = clip_config("l", int(tok.shape[1]), _layers(list(tm), r"encoder\.layers\.(\d+)\."),
                          int(tm["encoder.layers.0.mlp.fc1.weight"].shape[0]), int(tok.shape[0]),
                          int(tm["embeddings.position_embedding.weight"].shape[0]))
    except KeyError as e:
        raise ModelFileError(path, f"CLIP text encoder under {prefix!r} lacks {e.args[0]!r}") from None
    model = _empty(CLIPTextModelWithProjection if with_projection else CLIPTextModel, cfg)
    state = {("text_model." + k if hasattr(model, "text_model") else k): v for k, v in tm.items()}
    if "text_projection.weight" in sub and with_projection:
        state["text_projection.weight"] = sub["text_projection.weight"]
    _load(model, state, path, prefix, dtype)
    return model


def clip_l_to_ldm(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> `<prefix>text_model.*` tensors."""
    nested = hasattr(model, "text_model")
    return {prefix + (k if nested else "text_model." + k): v for k, v in model.state_dict().items()
            if not _ignored(k)}


# --- OpenCLIP ----------------------------------------------------------------------------------

def openclip_to_hf_name(key: str) -> str | None:
    """transformers name (inside `text_model.`) of an OpenCLIP key, None for the fused/projection keys."""
    if key == "token_embedding.weight":
        return "embeddings.token_embedding.weight"
    if key == "positional_embedding":
        return "embeddings.position_embedding.weight"
    if key.startswith("ln_final."):
        return "final_layer_norm." + key[len("ln_final."):]
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if m:
        i, tail = m.groups()
        for o, h in OPENCLIP_TO_HF.items():
            if tail.startswith(o + "."):
                return f"encoder.layers.{i}.{h}{tail[len(o):]}"
    return None


def openclip_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str, with_projection: bool,
                      path: str | os.PathLike[str] = "<state dict>", dtype: torch.dtype | None = None
                      ) -> torch.nn.Module:
    """Build a transformers CLIP text model from OpenCLIP tensors under `prefix`."""
    sub = _sub(sd, prefix)
    try:
        tok = sub["token_embedding.weight"]                              # [vocab, D]
        hidden = int(tok.shape[1])
        proj = sub.get("text_projection")                                # [D, P]
        cfg = clip_config("g" if with_projection else "h", hidden,
                          _layers(list(sub), r"transformer\.resblocks\.(\d+)\."),
                          int(sub["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]), int(tok.shape[0]),
                          int(sub["positional_embedding"].shape[0]),
                          int(proj.shape[1]) if proj is not None else None)
    except KeyError as e:
        raise ModelFileError(path, f"OpenCLIP text encoder under {prefix!r} lacks {e.args[0]!r}") from None
    hf: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sub.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k)
        if m:
            i, what = m.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):   # rows [0:D], [D:2D], [2D:3D]
                hf[f"encoder.layers.{i}.self_attn.{name}.{what}"] = part
        elif k == "text_projection":
            continue
        elif (name := openclip_to_hf_name(k)) is not None:
            hf[name] = v
        else:
            unknown.append(k)
    if unknown:
        raise ModelFileError(path, f"OpenCLIP tensors not understood under {prefix!r}: {', '.join(unknown[:5])}")
    model = _empty(CLIPTextModelWithProjection if with_projection else CLIPTextModel, cfg)
    state = {("text_model." + k if hasattr(model, "text_model") else k): v for k, v in hf.items()}
    if with_projection:
        if proj is None:
            raise ModelFileError(path, f"OpenCLIP text encoder under {prefix!r} lacks 'text_projection'")
        state["text_projection.weight"] = proj.t().contiguous()         # [D, P] -> Linear weight [P, D]
    _load(model, state, path, prefix, dtype)
    return model


def openclip_to_ldm(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model -> OpenCLIP tensors under `prefix` (inverse of openclip_from_ldm)."""
    state = model.state_dict()
    tm = {k.removeprefix("text_model."): v for k, v in state.items() if not _ignored(k)}
    inverse = {}
    out: dict[str, torch.Tensor] = {}
    hidden = model.config.hidden_size
    for i in range(model.config.num_hidden_layers):
        for what in ("weight", "bias"):
            q, k, v = (tm.pop(f"encoder.layers.{i}.self_attn.{n}.{what}") for n in ("q_proj", "k_proj", "v_proj"))
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{what}"] = torch.cat([q, k, v], dim=0)
    for o, h in OPENCLIP_TO_HF.items():
        inverse[h] = o
    for k, v in tm.items():
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.t().contiguous()
        elif k == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k[len("final_layer_norm."):]] = v
        else:
            m = re.match(r"encoder\.layers\.(\d+)\.(.+)", k)
            if not m:
                raise KeyError(f"no OpenCLIP name for {k!r}")
            i, tail = m.groups()
            name = next(o + tail[len(h):] for h, o in inverse.items() if tail.startswith(h + "."))
            out[f"{prefix}transformer.resblocks.{i}.{name}"] = v
    if prefix + "text_projection" not in out:
        # real SD2 files carry a [D, D] projection the SD pipelines never use; write one for realism
        out[prefix + "text_projection"] = torch.eye(hidden)
    return out


def _empty(cls: type, cfg: CLIPTextConfig) -> torch.nn.Module:
    """The module without initialising weights (meta device); `_load` assigns the real tensors."""
    with torch.device("meta"):
        return cls(cfg)


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike[str], prefix: str,
          dtype: torch.dtype | None = None) -> None:
    expected = {k for k in model.state_dict() if not _ignored(k)}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise ModelFileError(path, f"text encoder under {prefix!r} does not fit its config: "
                                   f"missing {missing[:5]}, unexpected {extra[:5]}")
    own = model.state_dict()
    for k, v in state.items():
        want = own[k].shape
        if v.shape != want:
            raise ModelFileError(path, f"text encoder tensor {prefix}{k}: shape {list(v.shape)}, expected {list(want)}")
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):    # non-persistent buffer: rebuild it
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    model.eval().requires_grad_(False)
