"""AUTOMATIC1111 `parameters` text -> an equivalent Easel API graph (workflows.md section 4).

The text is: the positive prompt (any number of lines), an optional part starting with a line
`Negative prompt:`, and a last part starting with `Steps:` holding `key: value` settings separated
by `, ` (a value may be quoted JSON-style or a `{...}` object). The graph built from it:

    CheckpointLoaderSimple -> [CLIPSetLastLayer (Clip skip)] -> A1111Prompt (prompt syntax, LoRA and
    hypernetwork tags, scheduling) -> KSampler <- EmptyLatentImage -> [LatentUpscale -> KSampler
    (hires fix)] -> VAEDecode [<- VAELoader] -> SaveImage

Sampler names are mapped to ComfyUI `sampler_name` + `scheduler` (samplers.md section 9). Fields
that do not change the picture (hashes, version) are ignored; fields Easel cannot reproduce are
reported in `A1111Import.unknown` / `.notes`, never fatal.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from graph.workflow_file import load_workflow_file
from nodes.folders import ModelFolders

log = logging.getLogger("easel.a1111")

# A1111 sampler label -> (ComfyUI sampler_name, scheduler of A1111's "Automatic" schedule).
SAMPLERS: dict[str, tuple[str, str]] = {
    "euler": ("euler", "normal"),
    "euler a": ("euler_ancestral", "normal"),
    "heun": ("heun", "normal"),
    "dpm2": ("dpm_2", "karras"),
    "dpm2 a": ("dpm_2_ancestral", "karras"),
    "lms": ("lms", "normal"),
    "dpm fast": ("dpm_fast", "normal"),
    "dpm adaptive": ("dpm_adaptive", "normal"),
    "dpm++ 2s a": ("dpmpp_2s_ancestral", "karras"),
    "dpm++ sde": ("dpmpp_sde", "karras"),
    "dpm++ 2m": ("dpmpp_2m", "karras"),
    "dpm++ 2m sde": ("dpmpp_2m_sde", "exponential"),
    "dpm++ 2m sde heun": ("dpmpp_2m_sde_heun", "exponential"),
    "dpm++ 3m sde": ("dpmpp_3m_sde", "exponential"),
    "ddim": ("ddim", "ddim_uniform"),
    "ddpm": ("ddpm", "normal"),
    "unipc": ("uni_pc", "normal"),
    "lcm": ("lcm", "normal"),
    "ipndm": ("ipndm", "normal"),
    "ipndm_v": ("ipndm_v", "normal"),
    "deis": ("deis", "normal"),
}
# A1111 "Schedule type" (and old sampler-name suffix) -> ComfyUI scheduler.
SCHEDULES: dict[str, str] = {
    "uniform": "normal", "normal": "normal", "karras": "karras", "exponential": "exponential",
    "sgm uniform": "sgm_uniform", "simple": "simple", "ddim": "ddim_uniform", "beta": "beta",
    "kl optimal": "kl_optimal", "polyexponential": "exponential",
}
# Latent hires upscalers -> LatentUpscale methods.
LATENT_UPSCALERS = {"latent": "bilinear", "latent (antialiased)": "bilinear", "latent (bicubic)": "bicubic",
                    "latent (bicubic antialiased)": "bicubic", "latent (nearest)": "nearest-exact",
                    "latent (nearest-exact)": "nearest-exact"}
# Fields read by the importer, and fields that carry no picture-changing information.
USED = {"steps", "sampler", "schedule type", "cfg scale", "seed", "size", "model", "model hash",
        "clip skip", "denoising strength", "hires upscale", "hires resize-1", "hires resize-2",
        "hires steps", "hires upscaler", "hires sampler", "hires schedule type", "hires cfg scale", "vae"}
IGNORED = {"version", "model hash", "vae hash", "lora hashes", "ti hashes", "hashes", "hypernet hashes", "app"}


class A1111ParseError(ValueError):
    """The text is not an A1111 `parameters` block."""


@dataclass(frozen=True)
class A1111Parameters:
    prompt: str
    negative_prompt: str
    settings: dict[str, str]        # keys as written ("CFG scale"), values unquoted strings


@dataclass(frozen=True)
class A1111Import:
    prompt: dict[str, Any]          # the API graph
    parameters: A1111Parameters
    unknown: tuple[str, ...]        # settings keys Easel does not use
    notes: tuple[str, ...]          # approximations and substitutions made


def split_settings(line: str) -> dict[str, str]:
    """`Steps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2"` -> {key: value} (values unquoted)."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " ,\t\n":
            i += 1
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        i = colon + 1
        while i < n and line[i] == " ":
            i += 1
        if i < n and line[i] == '"':                     # quoted, JSON-style escapes
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            raw = line[i:j + 1]
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw.strip('"')
            i = j + 1
        elif i < n and line[i] == "{":                   # a {...} object, braces balanced
            depth, j = 0, i
            while j < n:
                depth += {"{": 1, "}": -1}.get(line[j], 0)
                j += 1
                if depth == 0:
                    break
            value, i = line[i:j], j
        else:
            j = line.find(",", i)
            j = n if j < 0 else j
            value, i = line[i:j].strip(), j
        if key:
            out[key] = str(value)
    return out


def parse_parameters(text: str) -> A1111Parameters:
    """Split an A1111 `parameters` text into prompt, negative prompt and settings."""
    text = text.replace("\r\n", "\n").strip("\n")
    lines = text.split("\n")
    steps_at = max((k for k, line in enumerate(lines) if line.startswith("Steps:")), default=None)
    if steps_at is None:
        raise A1111ParseError("no settings line starting with 'Steps:' found; this does not look like "
                              "AUTOMATIC1111 parameters")
    settings = split_settings(", ".join(lines[steps_at:]))
    head = lines[:steps_at]
    neg_at = next((k for k, line in enumerate(head) if line.startswith("Negative prompt:")), None)
    if neg_at is None:
        return A1111Parameters("\n".join(head).strip(), "", settings)
    negative = "\n".join([head[neg_at][len("Negative prompt:"):], *head[neg_at + 1:]])
    return A1111Parameters("\n".join(head[:neg_at]).strip(), negative.strip(), settings)


def map_sampler(sampler: str | None, schedule: str | None) -> tuple[str, str, list[str]]:
    """A1111 sampler label (+ Schedule type) -> (sampler_name, scheduler, notes)."""
    notes: list[str] = []
    label = (sampler or "Euler").strip().lower()
    suffix = None
    for sched in sorted(SCHEDULES, key=len, reverse=True):   # old labels: "DPM++ 2M Karras"
        if label.endswith(" " + sched) and label[:-len(sched) - 1] in SAMPLERS:
            label, suffix = label[:-len(sched) - 1], sched
            break
    if label not in SAMPLERS:
        notes.append(f"sampler {sampler!r} has no Easel equivalent; using euler")
        label = "euler"
    name, scheduler = SAMPLERS[label]
    wanted = (schedule or suffix or "automatic").strip().lower()
    if wanted != "automatic":
        if wanted in SCHEDULES:
            scheduler = SCHEDULES[wanted]
        else:
            notes.append(f"schedule type {schedule or suffix!r} has no Easel equivalent; using {scheduler}")
    return name, scheduler, notes


def match_checkpoint(model: str | None, model_hash: str | None,
                     checkpoints: Sequence[str]) -> tuple[str, list[str]]:
    """The checkpoint file for A1111's `Model` name: exact stem, then prefix (case-insensitive)."""
    if not checkpoints:
        name = f"{model}.safetensors" if model else "model.safetensors"
        return name, [f"no checkpoints available to match model {model!r}; using {name!r}"]
    if not model:
        return checkpoints[0], [f"no Model in the parameters; using {checkpoints[0]!r}"]
    want = model.lower()
    stems = [(PurePosixPath(c).stem.lower(), c) for c in checkpoints]
    for stem, c in stems:
        if stem == want:
            return c, []
    for stem, c in stems:
        if stem.startswith(want) or want.startswith(stem):
            return c, []
    if model_hash:
        for stem, c in stems:
            if model_hash.lower() in stem:
                return c, []
    return checkpoints[0], [f"model {model!r} not found among the checkpoints; using {checkpoints[0]!r}"]


def _int(settings: dict[str, str], key: str, default: int) -> int:
    try:
        return int(float(settings[key])) if key in settings else default
    except ValueError:
        return default


def _float(settings: dict[str, str], key: str, default: float) -> float:
    try:
        return float(settings[key]) if key in settings else default
    except ValueError:
        return default


def _size(settings: dict[str, str]) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in settings.get("Size", "512x512").lower().split("x"))
    except ValueError:
        w, h = 512, 512
    return max(8, w // 8 * 8), max(8, h // 8 * 8)


def a1111_to_api(parameters: str | A1111Parameters, folders: ModelFolders | None = None, *,
                 checkpoints: Sequence[str] | None = None, vaes: Sequence[str] | None = None,
                 filename_prefix: str = "a1111") -> dict[str, Any]:
    """The API graph for A1111 parameters, matching model names against `folders`.

    Unknown fields and substitutions are logged as warnings; use `import_a1111` to get them as data.
    """
    if folders is not None:
        checkpoints = folders.list_files("checkpoints") if checkpoints is None else checkpoints
        vaes = folders.list_files("vae") if vaes is None else vaes
    imp = import_a1111(parameters, checkpoints or (), vaes or (), filename_prefix)
    if imp.unknown:
        log.warning("A1111 parameters: fields not reproduced by Easel: %s", ", ".join(imp.unknown))
    for note in imp.notes:
        log.warning("A1111 parameters: %s", note)
    return imp.prompt


def import_a1111(parameters: str | A1111Parameters, checkpoints: Sequence[str] = (),
                 vaes: Sequence[str] = (), filename_prefix: str = "a1111") -> A1111Import:
    """The API graph for A1111 parameters plus what was not used; `checkpoints`/`vaes` are file names."""
    p = parse_parameters(parameters) if isinstance(parameters, str) else parameters
    s = p.settings
    lower = {k.lower(): v for k, v in s.items()}
    notes: list[str] = []
    ckpt, n = match_checkpoint(lower.get("model"), lower.get("model hash"), checkpoints)
    notes += n
    sampler, scheduler, n = map_sampler(lower.get("sampler"), lower.get("schedule type"))
    notes += n
    steps = _int(s, "Steps", 20)
    seed = _int(s, "Seed", 0)
    cfg = _float(s, "CFG scale", 7.0)
    width, height = _size(s)
    g: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
    }
    clip: list[Any] = ["1", 1]
    clip_skip = _int(s, "Clip skip", 1)
    if clip_skip > 1:
        g["2"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -clip_skip}}
        clip = ["2", 0]
    g["3"] = {"class_type": "A1111Prompt",
              "inputs": {"model": ["1", 0], "clip": clip, "positive": p.prompt, "negative": p.negative_prompt,
                         "steps": steps, "weight_interpretation": "a1111"}}
    g["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    g["5"] = {"class_type": "KSampler",
              "inputs": {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
                         "denoise": 1.0, "model": ["3", 0], "positive": ["3", 2], "negative": ["3", 3],
                         "latent_image": ["4", 0]}}
    latent: list[Any] = ["5", 0]
    hires = any(k in lower for k in ("hires upscale", "hires resize-1", "hires upscaler"))
    if hires:
        scale = _float(s, "Hires upscale", 2.0)
        hw, hh = _int(s, "Hires resize-1", 0), _int(s, "Hires resize-2", 0)
        if not (hw and hh):
            hw, hh = math.floor(width * scale), math.floor(height * scale)
        upscaler = lower.get("hires upscaler", "Latent")
        method = LATENT_UPSCALERS.get(upscaler.lower())
        if method is None:
            method = "bicubic"
            notes.append(f"hires upscaler {upscaler!r} is not a latent upscaler; using a bicubic latent upscale")
        g["8"] = {"class_type": "LatentUpscale", "inputs": {"samples": latent, "upscale_method": method,
                                                            "width": hw // 8 * 8, "height": hh // 8 * 8,
                                                            "crop": "disabled"}}
        h_sampler, h_scheduler = sampler, scheduler
        if "hires sampler" in lower or "hires schedule type" in lower:
            h_sampler, h_scheduler, n = map_sampler(lower.get("hires sampler", lower.get("sampler")),
                                                    lower.get("hires schedule type", lower.get("schedule type")))
            notes += n
        g["9"] = {"class_type": "KSampler",
                  "inputs": {"seed": seed, "steps": _int(s, "Hires steps", 0) or steps,
                             "cfg": _float(s, "Hires CFG Scale", cfg),
                             "sampler_name": h_sampler, "scheduler": h_scheduler,
                             "denoise": _float(s, "Denoising strength", 0.7), "model": ["3", 0],
                             "positive": ["3", 2], "negative": ["3", 3], "latent_image": ["8", 0]}}
        latent = ["9", 0]
    elif "denoising strength" in lower:
        notes.append("Denoising strength without hires fix means img2img; the source image is not in the "
                     "parameters, so the graph starts from an empty latent")
    vae: list[Any] = ["1", 2]
    vae_name = lower.get("vae")
    if vae_name:
        found = next((v for v in vaes if v == vae_name or PurePosixPath(v).stem == PurePosixPath(vae_name).stem),
                     None)
        if found:
            g["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": found}}
            vae = ["10", 0]
        else:
            notes.append(f"VAE {vae_name!r} not found among the VAE files; using the checkpoint's VAE")
    g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": vae}}
    g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": filename_prefix}}
    unknown = tuple(k for k in s if k.lower() not in USED and k.lower() not in IGNORED)
    return A1111Import(g, p, unknown, tuple(notes))


def import_a1111_file(path: str | Path, checkpoints: Sequence[str] = (), vaes: Sequence[str] = (),
                      filename_prefix: str = "a1111") -> A1111Import:
    """`easel import-a1111 IMAGE.png`: the graph for the `parameters` chunk of a PNG (or a .txt file)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        text = path.read_text(encoding="utf-8")
    else:
        source = load_workflow_file(path)
        if not source.parameters:
            raise A1111ParseError(f"{path} has no AUTOMATIC1111 'parameters' text chunk")
        text = source.parameters
    try:
        return import_a1111(text, checkpoints, vaes, filename_prefix)
    except A1111ParseError as err:
        raise A1111ParseError(f"{path}: {err}") from err
