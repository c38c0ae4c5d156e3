"""Easel's node layer. Plugins written for ComfyUI `import nodes` (ComfyUI's own nodes.py is a
top-level module of that name) and find this package instead, so it also answers the names they use
most, loaded on first access (PEP 562) and only for those names:

- `MAX_RESOLUTION` (16384);
- `NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS`: Easel's built-in nodes;
- a built-in node class by its ComfyUI name (`nodes.SaveImage`, `from nodes import KSampler`), for
  plugins that call or subclass them;
- `common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
  denoise=1.0, disable_noise=False, start_step=None, last_step=None, force_full_denoise=False)`.

Lower-case names are Easel's submodules (`nodes.registry`, `nodes.folders`, ...) and are never
looked up here.
"""
from __future__ import annotations

import importlib
from typing import Any

MAX_RESOLUTION = 16384


def _builtin_mappings() -> tuple[dict[str, type], dict[str, str]]:
    from nodes.registry import builtin_modules

    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    for module_name in builtin_modules():
        module = importlib.import_module(module_name)
        classes.update(getattr(module, "NODE_CLASS_MAPPINGS", {}))
        names.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    return classes, names


def common_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: list, negative: list, latent: dict, denoise: float = 1.0,
                    disable_noise: bool = False, start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[dict]:
    """ComfyUI's `nodes.common_ksampler`: one sampling run with progress and previews, returned as a
    1-tuple of a LATENT (force_full_denoise only matters when last_step cuts the schedule)."""
    from diffusion.sampling.sample import sample
    from nodes.builtin.sampling import step_callback

    return (sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                   denoise=denoise, start_step=start_step, end_step=last_step, add_noise=not disable_noise,
                   return_with_leftover_noise=not force_full_denoise, callback=step_callback(model)),)


def __getattr__(name: str) -> Any:
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        classes, names = _builtin_mappings()
        return dict(classes) if name == "NODE_CLASS_MAPPINGS" else dict(names)
    if name[:1].isupper():
        cls = _builtin_mappings()[0].get(name)
        if cls is not None:
            return cls
    raise AttributeError(f"module 'nodes' has no attribute {name!r} (Easel offers MAX_RESOLUTION, "
                         "NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, common_ksampler and its "
                         "built-in node classes to ComfyUI plugins)")
