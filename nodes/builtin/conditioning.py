"""Text conditioning nodes with ComfyUI's class names, inputs and input order.

CONDITIONING = list of [cond Tensor[1, T, D], dict]; dict keys as ComfyUI: `pooled_output`,
`area` ((h, w, y, x) in latent cells, i.e. pixels // 8), `strength`, `set_area_to_bounds`,
`start_percent`, `end_percent`, and for SDXL `width`, `height`, `crop_w`, `crop_h`, `target_width`,
`target_height`. Nodes never modify their inputs: every entry is copied (tensors are shared).
"""
from __future__ import annotations

from typing import Any

import torch

from diffusion.prompts.clip import CLIP
from graph.runtime import current

MAX_RESOLUTION = 16384
Conditioning = list[list[Any]]


def _require_clip(clip: CLIP | None, node: str) -> CLIP:
    if clip is None:
        raise RuntimeError(f"{node}: the clip input is None; the checkpoint loaded upstream has no text encoder. "
                           "Load a checkpoint with a text encoder, or a separate CLIP model.")
    return clip


def _warn_embedding(message: str) -> None:
    current().warn(message, {"kind": "embedding"})


def _with_values(conditioning: Conditioning, values: dict[str, Any]) -> Conditioning:
    """A copy of `conditioning` with `values` set in every entry's dict."""
    return [[cond, {**extras, **values}] for cond, extras in conditioning]


class CLIPTextEncode:
    """Encode a prompt with ComfyUI's weight syntax `(text:1.2)` and `embedding:name` words."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "clip": ("CLIP",),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = "Encodes a text prompt with a CLIP model into a conditioning that guides the diffusion model."

    def encode(self, clip: CLIP, text: str) -> tuple[Conditioning]:
        return (_require_clip(clip, "CLIPTextEncode").encode(text, on_warning=_warn_embedding),)


class CLIPSetLastLayer:
    """Clip skip: -1 the last layer, -2 the penultimate (A1111 "clip skip 2"), ..."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "clip": ("CLIP",),
            "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1}),
        }}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"

    def set_last_layer(self, clip: CLIP, stop_at_clip_layer: int) -> tuple[CLIP]:
        out = _require_clip(clip, "CLIPSetLastLayer").clone()
        out.clip_layer(stop_at_clip_layer)
        return (out,)


class CLIPTextEncodeSDXL:
    """SDXL: separate texts for the bigG (`text_g`) and CLIP-L (`text_l`) encoders, plus the size and
    crop conditioning the UNet receives beside the pooled output."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        size = {"min": 0, "max": MAX_RESOLUTION}
        return {"required": {
            "clip": ("CLIP",),
            "width": ("INT", {"default": 1024, **size}),
            "height": ("INT", {"default": 1024, **size}),
            "crop_w": ("INT", {"default": 0, **size}),
            "crop_h": ("INT", {"default": 0, **size}),
            "target_width": ("INT", {"default": 1024, **size}),
            "target_height": ("INT", {"default": 1024, **size}),
            "text_g": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "text_l": ("STRING", {"multiline": True, "dynamicPrompts": True}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"

    def encode(self, clip: CLIP, width: int, height: int, crop_w: int, crop_h: int, target_width: int,
               target_height: int, text_g: str, text_l: str) -> tuple[Conditioning]:
        clip = _require_clip(clip, "CLIPTextEncodeSDXL")
        tokens = clip.tokenize_pair(text_g, text_l, on_warning=_warn_embedding)
        cond, pooled = clip.encode_token_chunks(tokens, "comfy")
        extras = {"pooled_output": pooled, "width": int(width), "height": int(height), "crop_w": int(crop_w),
                  "crop_h": int(crop_h), "target_width": int(target_width), "target_height": int(target_height)}
        return ([[cond, extras]],)


class ConditioningCombine:
    """Both conditionings are used (each entry is denoised and the predictions are averaged)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = "conditioning"

    def combine(self, conditioning_1: Conditioning, conditioning_2: Conditioning) -> tuple[Conditioning]:
        return (_with_values(conditioning_1, {}) + _with_values(conditioning_2, {}),)


class ConditioningAverage:
    """cond = to * s + from * (1 - s) per token (the `from` side cut or zero-padded to the `to` length);
    pooled outputs are mixed the same way."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "conditioning_to": ("CONDITIONING",),
            "conditioning_from": ("CONDITIONING",),
            "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "addWeighted"
    CATEGORY = "conditioning"

    def addWeighted(self, conditioning_to: Conditioning, conditioning_from: Conditioning,
                    conditioning_to_strength: float) -> tuple[Conditioning]:
        if not conditioning_from:
            return (_with_values(conditioning_to, {}),)
        if len(conditioning_from) > 1:
            current().warn("ConditioningAverage: conditioning_from has more than one entry; only the first is used",
                           {"kind": "conditioning"})
        s = float(conditioning_to_strength)
        src, src_extras = conditioning_from[0]
        src_pooled = src_extras.get("pooled_output")
        out: Conditioning = []
        for cond, extras in conditioning_to:
            if src.shape[-1] != cond.shape[-1]:
                raise ValueError(f"ConditioningAverage: conditioning_from has width {src.shape[-1]}, conditioning_to "
                                 f"{cond.shape[-1]}; they must come from the same kind of text encoder")
            frm = src[:, :cond.shape[1]].to(cond)                          # [1, <=T, D]
            if frm.shape[1] < cond.shape[1]:
                pad = torch.zeros(frm.shape[0], cond.shape[1] - frm.shape[1], frm.shape[2], dtype=frm.dtype)
                frm = torch.cat([frm, pad], dim=1)
            mixed = cond * s + frm * (1.0 - s)
            new = dict(extras)
            pooled = extras.get("pooled_output")
            if pooled is not None and src_pooled is not None:
                new["pooled_output"] = pooled * s + src_pooled.to(pooled) * (1.0 - s)
            elif src_pooled is not None:
                new["pooled_output"] = src_pooled
            out.append([mixed, new])
        return (out,)


class ConditioningConcat:
    """Append conditioning_from's tokens after every entry of conditioning_to (longer context)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "concat"
    CATEGORY = "conditioning"

    def concat(self, conditioning_to: Conditioning, conditioning_from: Conditioning) -> tuple[Conditioning]:
        if not conditioning_from:
            return (_with_values(conditioning_to, {}),)
        if len(conditioning_from) > 1:
            current().warn("ConditioningConcat: conditioning_from has more than one entry; only the first is used",
                           {"kind": "conditioning"})
        src = conditioning_from[0][0]
        return ([[torch.cat([cond, src.to(cond)], dim=1), dict(extras)] for cond, extras in conditioning_to],)


class ConditioningSetArea:
    """Restrict the conditioning to a rectangle of the image (pixels, multiples of 8) with a strength."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "width": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning: Conditioning, width: int, height: int, x: int, y: int,
               strength: float) -> tuple[Conditioning]:
        area = (height // 8, width // 8, y // 8, x // 8)          # latent cells: (h, w, y, x)
        return (_with_values(conditioning, {"area": area, "strength": float(strength),
                                            "set_area_to_bounds": False}),)


class ConditioningZeroOut:
    """All-zero conditioning (and pooled output) of the same shapes, e.g. an SDXL empty negative."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"

    def zero_out(self, conditioning: Conditioning) -> tuple[Conditioning]:
        out: Conditioning = []
        for cond, extras in conditioning:
            new = dict(extras)
            if new.get("pooled_output") is not None:
                new["pooled_output"] = torch.zeros_like(new["pooled_output"])
            out.append([torch.zeros_like(cond), new])
        return (out,)


class ConditioningSetTimestepRange:
    """Use the conditioning only between two fractions of the sampling (0 = first step, 1 = last)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_range"
    CATEGORY = "advanced/conditioning"

    def set_range(self, conditioning: Conditioning, start: float, end: float) -> tuple[Conditioning]:
        return (_with_values(conditioning, {"start_percent": float(start), "end_percent": float(end)}),)


NODE_CLASS_MAPPINGS = {
    "CLIPTextEncode": CLIPTextEncode,
    "CLIPSetLastLayer": CLIPSetLastLayer,
    "CLIPTextEncodeSDXL": CLIPTextEncodeSDXL,
    "ConditioningCombine": ConditioningCombine,
    "ConditioningAverage": ConditioningAverage,
    "ConditioningConcat": ConditioningConcat,
    "ConditioningSetArea": ConditioningSetArea,
    "ConditioningZeroOut": ConditioningZeroOut,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
    "CLIPTextEncodeSDXL": "CLIP Text Encode SDXL",
    "ConditioningCombine": "Conditioning (Combine)",
    "ConditioningAverage": "Conditioning (Average)",
    "ConditioningConcat": "Conditioning (Concat)",
    "ConditioningSetArea": "Conditioning (Set Area)",
    "ConditioningZeroOut": "ConditioningZeroOut",
    "ConditioningSetTimestepRange": "ConditioningSetTimestepRange",
}
