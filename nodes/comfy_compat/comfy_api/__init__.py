"""Easel's stand-in for ComfyUI's `comfy_api` package: the V3 node API for plugins.

Offered: `comfy_api.latest` (`ComfyExtension`, `io`, `ui`, `IO`, `UI`, `ComfyAPI`, `ComfyAPISync`)
and `comfy_api.v0_0_2`, the same objects under the versioned name. Easel's plugin loader
(`nodes/plugins.py`) calls a plugin's `comfy_entrypoint()` and turns the V3 node classes into
classic ones (`nodes/v3_adapter.py`). What is and is not offered: `nodes/comfy_compat/README.md`.
"""
