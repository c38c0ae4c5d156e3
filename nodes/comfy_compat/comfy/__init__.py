"""Easel's stand-in for ComfyUI's `comfy` package, for plugins (see nodes/comfy_compat/README.md).

Only `comfy.utils` and `comfy.model_management` are offered; `comfy.sd`, `comfy.samplers`,
`comfy.sample` and the rest are not, so a plugin importing them fails with a plain ImportError
that the plugin loader reports.
"""
