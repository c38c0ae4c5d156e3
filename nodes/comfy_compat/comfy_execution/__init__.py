"""Easel's stand-in for ComfyUI's `comfy_execution` package: only `graph_utils` is offered."""
