"""The AUTOMATIC1111 prompt in a graph: A1111Prompt, and ComfyUI's HypernetworkLoader.

A1111Prompt(model, clip, positive, negative, steps, weight_interpretation) does what the A1111 web
UI does with its two prompt boxes (prompts.md §1):
- `<lora:name:te[:unet]>` / `<lyco:…>` and `<hypernet:name:m>` tags are removed from the positive
  prompt and applied in order to MODEL and CLIP (LoRA through diffusion.patches.lora.load like LoraLoader, with
  strength_model = unet, strength_clip = te; hypernetworks like HypernetworkLoader). Names are
  A1111's: the file stem (or the relative path, with or without extension) in models/loras and
  models/hypernetworks (LoRAs also by their `ss_output_name`). Unknown tag types and missing files
  are warning events; a non-numeric multiplier applies no LoRA of the prompt (A1111) and is a
  warning. Tags in the negative prompt stay text, as in A1111. Differences: `dyn` (DyLoRA rank) is
  parsed but not used; the same LoRA named twice is applied twice with each tag's own multipliers
  (A1111 applies it twice with the last tag's).
- the positive prompt is split on AND, each part scheduled (`[a:b:when]`, `[a|b]`) for `steps`,
  chunked A1111's way (BREAK, comma backtracking, bare-name embeddings from the CLIP's embedding
  folders) and encoded; schedule entries carry `a1111_calls` ranges that the samplers honour
  (switches happen at A1111's denoiser calls: set `steps` to the sampler's steps).
- AND parts become simultaneous conditioning entries marked `a1111_and` = their weight; the
  sampler combines them as A1111 does, D_uncond + cfg * sum_k w_k (D_k - D_uncond) (they also carry
  `strength` = weight, for ComfyUI's averaging if they are mixed with other entries or areas).
- weight_interpretation "a1111": multiply and restore each chunk's mean (A1111 "Original");
  "comfy": ComfyUI's interpolation from the empty prompt. The parse is A1111's in both.
Outputs are plain values, cached by the graph like any other; LoRA and hypernetwork files are read
once per file version (their loaders cache), so changing only the negative prompt re-encodes text
and does not re-read or re-patch anything.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from safetensors import safe_open

from diffusion.patches.embeddings import list_embeddings
from diffusion.patches.hypernetwork import apply_hypernetwork, load_hypernetwork
from diffusion.patches.lora.load import load_lora
from diffusion.prompts.a1111.chunks import EmbeddingIndex
from diffusion.prompts.a1111.schedule import a1111_conditioning
from diffusion.prompts.a1111.syntax import (
    hypernet_from_tag,
    lora_from_tag,
    strip_extra_networks,
)
from graph.runtime import current
from nodes.folders import current_folders

_ALIASES: dict[tuple[str, int, int], str | None] = {}


def _output_name(path: Path) -> str | None:
    """The `ss_output_name` metadata of a .safetensors LoRA (A1111's alias), cached per file version."""
    if path.suffix.lower() != ".safetensors":
        return None
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _ALIASES:
        try:
            with safe_open(str(path), "pt") as f:
                _ALIASES[key] = (f.metadata() or {}).get("ss_output_name")
        except Exception:  # noqa: BLE001 - not readable: LoraLoader says why if the file is used
            _ALIASES[key] = None
    return _ALIASES[key]


def _find(kind: str, name: str) -> str | None:
    """A1111 name -> file name in the `kind` folders: exact relative name, the same without its
    extension, the file stem anywhere in the tree (case-sensitive, first in sorted order), and for
    LoRAs the `ss_output_name` alias."""
    folders = current_folders()
    files = folders.list_files(kind)
    for f in files:
        if f == name or f.rsplit(".", 1)[0] == name:
            return f
    for f in files:
        if Path(f).stem == name:
            return f
    if kind == "loras":
        for f in files:
            if _output_name(folders.resolve(kind, f)) == name:
                return f
    return None


def apply_extra_networks(model: Any, clip: Any, prompt: str) -> tuple[Any, Any, str]:
    """Strip `<...>` tags from `prompt` and apply the LoRA and hypernetwork ones in order."""
    rt = current()
    text, tags = strip_extra_networks(prompt)
    loras = []
    lora_error = None
    for tag in tags:
        if tag.kind in ("lora", "lyco"):
            try:
                loras.append(lora_from_tag(tag))
            except ValueError as exc:
                lora_error = str(exc)
        elif tag.kind != "hypernet":
            rt.warn(f"A1111Prompt: unknown extra-network type in {tag.source!r} (known: lora, lyco, hypernet); "
                    f"the tag was removed and ignored", {"type": "extra_network_unknown", "tag": tag.source})
    if lora_error is not None:
        rt.warn(f"A1111Prompt: {lora_error}; no LoRA of this prompt was applied (as A1111)",
                {"type": "extra_network_error", "tags": [t.source for t in tags]})
        loras = []
    coverages = []
    for lora in loras:
        found = _find("loras", lora.name)
        if found is None:
            rt.warn(f"A1111Prompt: LoRA {lora.name!r} not found in the loras folders; skipped",
                    {"type": "lora_missing", "lora": lora.name})
            continue
        path = current_folders().resolve("loras", found)
        new_model, new_clip, coverage = load_lora(model, clip, path, lora.unet, lora.te, display_name=found)
        model, clip = new_model if new_model is not None else model, new_clip if new_clip is not None else clip
        coverages.append(coverage.as_dict())
        if coverage.unmatched:
            rt.warn(f"A1111Prompt: LoRA {found}: {len(coverage.unmatched)} of {coverage.total_keys} keys were "
                    f"not applied (e.g. {coverage.unmatched[0][0]}: {coverage.unmatched[0][1]})",
                    {"type": "lora_keys_unmatched", "lora": found, **coverage.as_dict()})
    if coverages:
        rt.record("lora_coverage", coverages)        # per file, kept with the prompt's history (node_records)
    for tag in tags:
        if tag.kind != "hypernet":
            continue
        try:
            hn_tag = hypernet_from_tag(tag)
        except ValueError as exc:
            rt.warn(f"A1111Prompt: {exc}; hypernetwork skipped", {"type": "extra_network_error", "tag": tag.source})
            continue
        found = _find("hypernetworks", hn_tag.name)
        if found is None:
            rt.warn(f"A1111Prompt: hypernetwork {hn_tag.name!r} not found in the hypernetworks folders; skipped",
                    {"type": "hypernetwork_missing", "hypernetwork": hn_tag.name})
            continue
        hn = load_hypernetwork(current_folders().resolve("hypernetworks", found))
        model = apply_hypernetwork(model, hn, hn_tag.multiplier)
    return model, clip, text


class A1111Prompt:
    """Positive and negative prompts in the AUTOMATIC1111 language, with LoRA/hypernetwork tags."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "positive": ("STRING", {"multiline": True, "dynamicPrompts": False,
                                    "tooltip": "A1111 syntax: (x:1.2), [x], [a:b:0.5], [a|b], BREAK, AND, "
                                               "<lora:name:w>, <hypernet:name:w>, embedding file names."}),
            "negative": ("STRING", {"multiline": True, "dynamicPrompts": False}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The sampler's steps: prompt editing switches are counted in them."}),
            "weight_interpretation": (["a1111", "comfy"], {"default": "a1111"}),
        }}

    @classmethod
    def IS_CHANGED(cls, positive: str = "", negative: str = "", **_: Any) -> str:
        """Versions of the files the prompts can use (every embedding file, the tagged LoRAs and
        hypernetworks), so adding or replacing one re-runs the node instead of reusing a stale output."""
        folders = current_folders()
        seen: list[str] = []
        for name, path in sorted(list_embeddings(folders.dirs("embeddings")).items()):
            st = path.stat()
            seen.append(f"e:{name}:{st.st_mtime_ns}:{st.st_size}")
        for tag in strip_extra_networks(positive)[1]:
            kind = {"lora": "loras", "lyco": "loras", "hypernet": "hypernetworks"}.get(tag.kind)
            name = tag.positional[0] if kind and tag.positional else None
            found = _find(kind, name) if kind and name else None
            if found is not None:
                st = folders.resolve(kind, found).stat()
                seen.append(f"{kind}:{found}:{st.st_mtime_ns}:{st.st_size}")
        return hashlib.sha256("|".join(seen).encode()).hexdigest()

    RETURN_TYPES = ("MODEL", "CLIP", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("MODEL", "CLIP", "positive", "negative")
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = "AUTOMATIC1111 prompts: emphasis, prompt editing, alternation, BREAK, AND, LoRA and hypernetwork tags."

    def encode(self, model: Any, clip: Any, positive: str, negative: str, steps: int,
               weight_interpretation: str = "a1111") -> tuple[Any, Any, Any, Any]:
        if clip is None:
            raise RuntimeError("A1111Prompt: the clip input is None; load a checkpoint with a text encoder")
        if weight_interpretation not in ("a1111", "comfy"):
            raise ValueError(f"A1111Prompt: weight_interpretation must be 'a1111' or 'comfy', got "
                             f"{weight_interpretation!r}")
        model, clip, text = apply_extra_networks(model, clip, positive)
        dirs = list(getattr(clip, "embedding_dirs", []) or []) or current_folders().dirs("embeddings")
        index = EmbeddingIndex.from_dirs(dirs, clip.tokenizers[clip.keys[0]])
        pos = a1111_conditioning(clip, text, steps, embeddings=index, weighting=weight_interpretation)
        neg = a1111_conditioning(clip, negative, steps, embeddings=index, weighting=weight_interpretation,
                                 negative=True)
        return model, clip, pos, neg


class HypernetworkLoader:
    """Apply an A1111 hypernetwork file to the attention key/value context (ComfyUI's node)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "hypernetwork_name": (current_folders().list_files("hypernetworks"),),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_hypernetwork"
    CATEGORY = "loaders"
    DESCRIPTION = "A1111 hypernetwork (every layer structure, activation, layer norm and dropout option)."

    def load_hypernetwork(self, model: Any, hypernetwork_name: str, strength: float) -> tuple[Any]:
        path = current_folders().resolve("hypernetworks", hypernetwork_name)
        return (apply_hypernetwork(model, load_hypernetwork(path), strength),)


NODE_CLASS_MAPPINGS = {"A1111Prompt": A1111Prompt, "HypernetworkLoader": HypernetworkLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"A1111Prompt": "A1111 Prompt (LoRA, hypernetwork, schedules)",
                              "HypernetworkLoader": "Load Hypernetwork"}
