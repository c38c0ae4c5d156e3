"""Shared model folders: a YAML/JSON config in the spirit of ComfyUI's `extra_model_paths.yaml`.

The file holds named sections; each maps model kinds to folders (one path, a list, or several
paths on separate lines of a block string), relative to the section's `base_path`:

    my_a1111:
      base_path: /home/me/stable-diffusion-webui
      preset: a1111                # the whole A1111 layout below, no kinds to list
    comfyui:
      base_path: ~/ComfyUI
      checkpoints: models/checkpoints
      loras: |
        models/loras
        models/lycoris
      custom_nodes: custom_nodes   # plugin folders, not models

ComfyUI's kind names `text_encoders` and `diffusion_models` are read as Easel's `clip` and `unet`.
A relative `base_path` is relative to the config file. Folders that do not exist are reported as
warnings and still added (they may appear later). `is_default` is accepted and ignored:
`<base>/models/<kind>` is always searched first. See docs/extra_model_paths.example.yaml.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nodes.folders import ModelFolders

# AUTOMATIC1111 stable-diffusion-webui layout, relative to its install folder.
A1111_LAYOUT: dict[str, tuple[str, ...]] = {
    "checkpoints": ("models/Stable-diffusion",),
    "loras": ("models/Lora", "models/LyCORIS"),
    "embeddings": ("embeddings",),
    "hypernetworks": ("models/hypernetworks",),
    "vae": ("models/VAE",),
    "vae_approx": ("models/VAE-approx",),
    "upscale_models": ("models/ESRGAN", "models/RealESRGAN", "models/SwinIR"),
    "controlnet": ("models/ControlNet",),
}
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {"a1111": A1111_LAYOUT}
KIND_ALIASES = {"text_encoders": "clip", "diffusion_models": "unet", "t2i_adapter": "controlnet"}
SECTION_KEYS = {"base_path", "is_default", "preset"}


class ExtraPathsError(ValueError):
    """The config file cannot be read or is not shaped like extra_model_paths.yaml."""


@dataclass(frozen=True)
class ExtraPaths:
    """Folders read from a config: kind -> extra folders, plugin folders, and what looked wrong."""

    folders: dict[str, list[Path]] = field(default_factory=dict)
    custom_nodes: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def apply(self, folders: ModelFolders) -> None:
        """Add every folder to `folders` (after its own `<base>/models/<kind>`)."""
        for kind, paths in self.folders.items():
            known = set(folders.dirs(kind))
            for path in paths:
                if path not in known:
                    folders.add(kind, path)
                    known.add(path)


def _entries(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ExtraPathsError(f"{where}: expected a path, a list of paths or lines of paths, found {value!r}")


def _base(section: Mapping[str, Any], config_dir: Path, where: str) -> Path:
    raw = section.get("base_path", "")
    if not isinstance(raw, str):
        raise ExtraPathsError(f"{where}.base_path: expected a path, found {raw!r}")
    base = Path(os.path.expandvars(os.path.expanduser(raw))) if raw else config_dir
    return base if base.is_absolute() else (config_dir / base)


def parse_extra_paths(data: object, config_dir: str | os.PathLike[str] = ".", source: str = "config") -> ExtraPaths:
    """The folders of a parsed config document (sections of kind -> paths)."""
    if data is None:
        return ExtraPaths()
    if not isinstance(data, Mapping):
        raise ExtraPathsError(f"{source}: expected sections of kind: path entries, found {type(data).__name__}")
    out = ExtraPaths()
    config_dir = Path(config_dir)
    for name, section in data.items():
        where = f"{source}: section {name!r}"
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ExtraPathsError(f"{where}: expected kind: path entries, found {section!r}")
        base = _base(section, config_dir, where)
        kinds: dict[str, list[str]] = {}
        preset = section.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ExtraPathsError(f"{where}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
            kinds.update({k: list(v) for k, v in PRESETS[preset].items()})
        for key, value in section.items():
            if key in SECTION_KEYS:
                continue
            kinds[KIND_ALIASES.get(str(key), str(key))] = _entries(value, f"{where}.{key}")
        for kind, entries in kinds.items():
            for entry in entries:
                path = Path(os.path.expandvars(os.path.expanduser(entry)))
                path = path if path.is_absolute() else base / path
                if not path.is_dir():
                    out.warnings.append(f"{where}: {kind} folder {path} does not exist")
                target = out.custom_nodes if kind == "custom_nodes" else out.folders.setdefault(kind, [])
                if path not in target:
                    target.append(path)
    return out


def load_extra_paths(path: str | os.PathLike[str]) -> ExtraPaths:
    """Read a `.yaml`/`.yml` or `.json` config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ExtraPathsError(f"cannot read model paths config {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ExtraPathsError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                              f"{err}") from None
    return parse_extra_paths(data, path.parent, str(path))


def a1111_preset(webui_dir: str | os.PathLike[str]) -> ExtraPaths:
    """The folders of an AUTOMATIC1111 install (models/Stable-diffusion, models/Lora, embeddings ...)."""
    return parse_extra_paths({"a1111": {"base_path": str(Path(webui_dir).resolve()), "preset": "a1111"}},
                             source="a1111 preset")


def apply_extra_paths(folders: ModelFolders, *configs: str | os.PathLike[str]) -> ExtraPaths:
    """Load each config file and add its folders to `folders`; the merged result (for plugin dirs)."""
    merged = ExtraPaths()
    for config in configs:
        extra = load_extra_paths(config)
        extra.apply(folders)
        for kind, paths in extra.folders.items():
            merged.folders.setdefault(kind, []).extend(p for p in paths if p not in merged.folders.get(kind, []))
        merged.custom_nodes.extend(p for p in extra.custom_nodes if p not in merged.custom_nodes)
        merged.warnings.extend(extra.warnings)
    return merged
