"""Setting up the model layer for a run: device switches and the demo model files.

The CLI and the server reach diffusion/ only through nodes/, so the switches they parse
(`--cpu`, `--lowvram`, dtypes) and the demo files a workflow names are applied here.
"""
from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nodes.folders import ModelFolders

log = logging.getLogger("easel.nodes")


def configure_devices(cpu: bool = False, lowvram: bool = False, unet_dtype: str | None = None,
                      vae_dtype: str | None = None, text_dtype: str | None = None) -> None:
    from diffusion.models.devices import DeviceConfig, set_default_config
    set_default_config(DeviceConfig(cpu=cpu, lowvram=lowvram, unet_dtype=unet_dtype,  # type: ignore[arg-type]
                                    vae_dtype=vae_dtype, text_dtype=text_dtype))  # type: ignore[arg-type]


def demo_builders() -> dict[str, dict[str, Callable[[Path], Path]]]:
    """{kind: {file name: builder(folder) -> path}} for every demo file Easel can make."""
    from diffusion.demo import checkpoint as demo
    builders: dict[str, dict[str, Callable[[Path], Path]]] = {
        "checkpoints": {name: (lambda folder, fam=fam: demo.ensure_demo_checkpoint(folder, fam))
                        for fam, name in demo.DEMO_NAMES.items()}}
    try:
        extras = importlib.import_module("diffusion.demo.extras")
    except ModuleNotFoundError:
        return builders
    for kind, files in getattr(extras, "DEMO_FILES", {}).items():
        builders.setdefault(kind, {}).update(files)
    return builders


def _words(prompt: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Every string input and every word in it: file names of combos, and names inside prompt text
    (`embedding:name`, A1111 bare embedding names, `<lora:name:w>`, `<hypernet:name:w>`)."""
    found: set[str] = set()
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, str):
                found.add(value)
                found.update(re.findall(r"[\w.\-/]+", value))
    return found


def ensure_demo_files(prompt: Mapping[str, Mapping[str, Any]], folders: ModelFolders) -> list[Path]:
    """Create the demo model files a workflow names when they are missing; the paths created."""
    wanted = _words(prompt)
    made = []
    for kind, files in demo_builders().items():
        for name, build in files.items():
            stem = name.rsplit(".", 1)[0]
            if name not in wanted and stem not in wanted:
                continue
            target = folders.dirs(kind)[0]
            if (target / name).exists():
                continue
            target.mkdir(parents=True, exist_ok=True)
            log.info("creating demo %s file %s", kind, target / name)
            made.append(build(target))
    return made
