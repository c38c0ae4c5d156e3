"""Images in and out: IMAGE tensors <-> PNG files, the metadata chunks inside them, output file names.

What goes into a saved PNG (workflows.md section 4, as ComfyUI writes it):
  tEXt `prompt`          json.dumps(API prompt)
  tEXt `<key>`           json.dumps(value) for every key of `extra_pnginfo` (normally `workflow`)
  tEXt `parameters`      an A1111-style text built from the graph when a sampler and its prompts are
                         found (best effort; Easel's own addition so A1111-minded tools see settings)
Pixels: uint8 = clip(255 * x, 0, 255) truncated (as ComfyUI does, so equal tensors give equal files).

Loading (ComfyUI's LoadImage semantics): every frame of the same size as the first, EXIF-rotated,
16-bit "I" images scaled by 1/255 before the RGB conversion, IMAGE = RGB / 255 as [B, H, W, 3];
MASK = 1 - alpha / 255 as [B, H, W] when the file has alpha (or a palette transparency), else a
[1, 64, 64] zero mask per frame like ComfyUI.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin

PNG_COMPRESS_SAVE = 4      # SaveImage
PNG_COMPRESS_PREVIEW = 1   # PreviewImage


# ---------------------------------------------------------------------------------------------
# tensors <-> PIL

def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE item [H, W, C] (C = 1, 3 or 4, floats in 0..1) -> a PIL image (L, RGB or RGBA)."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image_to_pil: expected an image [H, W, C] with C in 1/3/4, found shape {tuple(image.shape)}")
    array = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0], mode="L")
    return Image.fromarray(array, mode="RGB" if array.shape[-1] == 3 else "RGBA")


def pil_to_image(img: Image.Image) -> torch.Tensor:
    """A PIL image -> IMAGE [1, H, W, 3] float32 in 0..1."""
    rgb = np.array(img.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(rgb)[None]


# ---------------------------------------------------------------------------------------------
# loading

def load_image(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B, H, W, 3] and MASK [B, h, w] (1 - alpha) from an image file; B = frames kept."""
    try:
        img = Image.open(path)
    except (OSError, ValueError) as e:   # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"load_image: {os.fspath(path)!r} is not a readable image ({e})") from e
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    size: tuple[int, int] | None = None
    # MPO files (phone cameras) carry a second, preview-like frame: keep only the first
    frames = [img] if img.format == "MPO" else ImageSequence.Iterator(img)
    with img:
        for frame in frames:
            frame = ImageOps.exif_transpose(frame)
            if frame.mode.startswith("I;16"):
                frame = frame.convert("I")   # newer Pillow opens 16-bit greyscale as "I;16"
            if frame.mode == "I":
                # 16-bit greyscale: ComfyUI scales by 1/255 (0..65535 -> 0..257) before the 8-bit RGB clip
                frame = frame.point(lambda v: v * (1 / 255))
            if size is None:
                size = frame.size
            elif frame.size != size:
                continue                     # frames of another size would not stack into a batch
            images.append(pil_to_image(frame))
            masks.append(_alpha_mask(frame))
    if not images:
        raise ValueError(f"load_image: {os.fspath(path)!r} holds no frames")
    if any(m.shape != masks[0].shape for m in masks):
        # some frames with alpha, some without: give the alpha-less ones a full-size empty mask
        h, w = images[0].shape[1:3]
        masks = [m if m.shape[1:] == (h, w) else torch.zeros((1, h, w)) for m in masks]
    return torch.cat(images, dim=0), torch.cat(masks, dim=0)


def _alpha_mask(frame: Image.Image) -> torch.Tensor:
    """[1, H, W] = 1 - alpha (ComfyUI: opaque = 0, transparent = 1), or [1, 64, 64] zeros."""
    if frame.mode == "P" and "transparency" in frame.info:
        frame = frame.convert("RGBA")
    if "A" in frame.getbands():
        alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
        return (1.0 - torch.from_numpy(alpha))[None]
    return torch.zeros((1, 64, 64), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# saving

def png_info(prompt: Mapping[str, Any] | None = None, extra_pnginfo: Mapping[str, Any] | None = None,
             parameters: str | None = None) -> PngImagePlugin.PngInfo:
    """The text chunks: `prompt`, one per extra_pnginfo key (json.dumps, ASCII so always tEXt), `parameters`."""
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(str(key), json.dumps(value))
    if parameters:
        info.add_text("parameters", parameters)
    return info


def save_png(image: torch.Tensor, path: str | os.PathLike[str], prompt: Mapping[str, Any] | None = None,
             extra_pnginfo: Mapping[str, Any] | None = None, parameters: str | None = None,
             compress_level: int = PNG_COMPRESS_SAVE) -> Path:
    """Write one IMAGE item [H, W, C] as a PNG with the metadata chunks; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_to_pil(image).save(path, format="PNG", pnginfo=png_info(prompt, extra_pnginfo, parameters),
                             compress_level=compress_level)
    return path


@dataclass(frozen=True)
class SaveTarget:
    """Where a batch goes: `folder / f"{filename}_{counter:05}_.png"`, counter increasing per image."""

    folder: Path
    filename: str           # base name, may still hold %batch_num%
    counter: int            # first free counter for this base name
    subfolder: str          # folder relative to the output root, "" for the root ("/" separators)

    def file_name(self, batch_number: int, offset: int) -> str:
        base = self.filename.replace("%batch_num%", str(batch_number))
        return f"{base}_{self.counter + offset:05}_.png"


def expand_prefix(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """%width% %height% %year% %month% %day% %hour% %minute% %second% (zero-padded like ComfyUI)."""
    if "%" not in prefix:
        return prefix
    t = now or time.localtime()
    values = {"width": str(width), "height": str(height), "year": str(t.tm_year),
              "month": f"{t.tm_mon:02}", "day": f"{t.tm_mday:02}", "hour": f"{t.tm_hour:02}",
              "minute": f"{t.tm_min:02}", "second": f"{t.tm_sec:02}"}
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


def save_target(root: str | os.PathLike[str], filename_prefix: str, width: int, height: int,
                now: time.struct_time | None = None) -> SaveTarget:
    """Resolve a filename_prefix (may contain `/` sub-folders and %vars%) under an output root.

    The counter is one past the highest `<filename>_<digits>_...` already in the folder, so files are
    never overwritten. A prefix that would leave the root (`../x`, absolute) is refused.
    """
    root_path = Path(root).resolve()
    expanded = expand_prefix(filename_prefix, width, height, now)
    normalized = os.path.normpath(expanded)
    subfolder, filename = os.path.split(normalized)
    folder = (root_path / subfolder).resolve()
    if os.path.isabs(normalized) or os.path.commonpath([root_path, folder]) != str(root_path):
        raise ValueError(f"filename_prefix {filename_prefix!r}: saving outside the output folder "
                         f"{root_path} is not allowed")
    if not filename or filename in (".", ".."):
        raise ValueError(f"filename_prefix {filename_prefix!r}: no file name after the folder part")
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(filename) + r"_(\d+)_", re.IGNORECASE if os.name == "nt" else 0)
    highest = 0
    for entry in os.listdir(folder):
        m = pattern.match(entry)
        if m:
            highest = max(highest, int(m.group(1)))
    rel = folder.relative_to(root_path).as_posix()
    return SaveTarget(folder=folder, filename=filename, counter=highest + 1, subfolder="" if rel == "." else rel)


# ---------------------------------------------------------------------------------------------
# reading metadata back

@dataclass(frozen=True)
class ImageMetadata:
    prompt: dict[str, Any] | None          # API prompt from the `prompt` chunk
    workflow: dict[str, Any] | None        # UI workflow from the `workflow` chunk
    parameters: str | None                 # A1111 text
    text: dict[str, str]                   # every text chunk as stored


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """All tEXt / zTXt / iTXt chunks of a PNG (empty for other formats)."""
    with Image.open(path) as img:
        img.load()   # text chunks after the image data are only read by load()
        text = getattr(img, "text", None) or {}
        return {str(k): str(v) for k, v in text.items()}


def read_metadata(path: str | os.PathLike[str]) -> ImageMetadata:
    """The `prompt`, `workflow` and `parameters` chunks, JSON decoded (None when absent or not JSON)."""
    text = read_png_text(path)
    return ImageMetadata(prompt=_json_object(text.get("prompt")), workflow=_json_object(text.get("workflow")),
                         parameters=text.get("parameters"), text=text)


def _json_object(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------
# A1111 `parameters` from an API prompt (best effort)

SAMPLER_NAMES = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "heunpp2": "Heun++2", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "ddpm": "DDPM",
    "uni_pc": "UniPC", "uni_pc_bh2": "UniPC", "lcm": "LCM", "restart": "Restart", "ipndm": "iPNDM",
    "deis": "DEIS",
}
SCHEDULE_NAMES = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
}
SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced")
_TEXT_INPUTS = ("text", "text_g", "text_l", "string", "value", "prompt")


def a1111_parameters(prompt: Mapping[str, Any], width: int, height: int, save_node: str | None = None) -> str | None:
    """A1111-style settings text for the image saved by `save_node`, or None when no sampler is found.

    The sampler is the first KSampler(Advanced) upstream of `save_node` (any sampler when not given);
    prompts come from the text inputs of the nodes feeding positive/negative; LoRA loaders between
    the sampler and the checkpoint become `<lora:name:w>` tags, as A1111 writes them in the prompt.
    """
    graph = {str(k): v for k, v in prompt.items() if isinstance(v, Mapping)}
    sampler_id = _upstream_of_class(graph, save_node, SAMPLER_CLASSES) if save_node in graph else None
    if sampler_id is None:
        sampler_id = next((k for k, v in graph.items() if v.get("class_type") in SAMPLER_CLASSES), None)
    if sampler_id is None:
        return None
    inputs = graph[sampler_id].get("inputs", {})
    positive = _text_of(graph, inputs.get("positive"), role="positive")
    negative = _text_of(graph, inputs.get("negative"), role="negative")
    if positive is None:
        return None
    model_name, loras = _model_chain(graph, inputs.get("model"))
    tags = "".join(f" <lora:{_stem(name)}:{_num(w)}>" for name, w in loras)
    settings: list[tuple[str, Any]] = [("Steps", inputs.get("steps"))]
    sampler = inputs.get("sampler_name")
    if isinstance(sampler, str):
        settings.append(("Sampler", SAMPLER_NAMES.get(sampler, sampler)))
    scheduler = inputs.get("scheduler")
    if isinstance(scheduler, str):
        settings.append(("Schedule type", SCHEDULE_NAMES.get(scheduler, scheduler)))
    settings += [("CFG scale", inputs.get("cfg")),
                 ("Seed", inputs.get("seed", inputs.get("noise_seed"))),
                 ("Size", f"{width}x{height}")]
    if model_name:
        settings.append(("Model", _stem(model_name)))
    clip_skip = _clip_skip(graph, inputs.get("positive"))
    if clip_skip and clip_skip > 1:
        settings.append(("Clip skip", clip_skip))
    denoise = inputs.get("denoise")
    if isinstance(denoise, (int, float)) and denoise < 1.0:
        settings.append(("Denoising strength", denoise))
    settings.append(("Version", "Easel"))
    line = ", ".join(f"{k}: {_quote(_num(v))}" for k, v in settings if v is not None and not _is_link(v))
    text = positive + tags
    if negative:
        text += f"\nNegative prompt: {negative}"
    return f"{text}\n{line}"


def _is_link(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)))


def _num(value: Any) -> Any:
    """7.0 -> 7 like A1111 prints whole floats."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text)


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _upstream_of_class(graph: Mapping[str, Any], start: str, classes: tuple[str, ...]) -> str | None:
    """Breadth-first over the links feeding `start`; the first node of one of `classes`."""
    seen, queue = {start}, [start]
    while queue:
        node_id = queue.pop(0)
        for value in graph[node_id].get("inputs", {}).values():
            if _is_link(value) and value[0] in graph and value[0] not in seen:
                if graph[value[0]].get("class_type") in classes:
                    return value[0]
                seen.add(value[0])
                queue.append(value[0])
    return None


def _text_of(graph: Mapping[str, Any], link: Any, role: str, depth: int = 0) -> str | None:
    """The prompt text behind a CONDITIONING link: a literal input named like the sampler's input
    (`positive` / `negative`: prompt nodes with both texts, e.g. A1111Prompt), else text inputs,
    else followed links (depth-limited)."""
    if not _is_link(link) or link[0] not in graph or depth > 16:
        return None
    inputs = graph[link[0]].get("inputs", {})
    if isinstance(inputs.get(role), str):
        return inputs[role]
    for key in _TEXT_INPUTS:
        value = inputs.get(key)
        if isinstance(value, str):
            return value
        if _is_link(value):
            found = _text_of(graph, value, role, depth + 1)
            if found is not None:
                return found
    for key in ("conditioning", "conditioning_1", "conditioning_to", "conditioning_from"):
        found = _text_of(graph, inputs.get(key), role, depth + 1)
        if found is not None:
            return found
    return None


def _model_chain(graph: Mapping[str, Any], link: Any) -> tuple[str | None, list[tuple[str, Any]]]:
    """Checkpoint name and LoRAs (name, model strength) walking the `model` links up from the sampler."""
    loras: list[tuple[str, Any]] = []
    for _ in range(64):
        if not _is_link(link) or link[0] not in graph:
            break
        inputs = graph[link[0]].get("inputs", {})
        if isinstance(inputs.get("ckpt_name"), str):
            return inputs["ckpt_name"], loras[::-1]
        if isinstance(inputs.get("unet_name"), str):
            return inputs["unet_name"], loras[::-1]
        if isinstance(inputs.get("lora_name"), str):
            loras.append((inputs["lora_name"], inputs.get("strength_model", 1.0)))
        link = inputs.get("model")
    return None, loras[::-1]


def _clip_skip(graph: Mapping[str, Any], cond_link: Any) -> int | None:
    """N of `Clip skip: N` from a CLIPSetLastLayer (stop_at_clip_layer = -N) upstream of the prompt."""
    if not _is_link(cond_link) or cond_link[0] not in graph:
        return None
    node = _upstream_of_class(graph, cond_link[0], ("CLIPSetLastLayer",))
    if node is None:
        return None
    layer = graph[node].get("inputs", {}).get("stop_at_clip_layer")
    return -int(layer) if isinstance(layer, (int, float)) else None
