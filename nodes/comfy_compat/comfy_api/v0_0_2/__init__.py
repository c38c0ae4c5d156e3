"""`comfy_api.v0_0_2`: the versioned name plugins may import; the same objects as `comfy_api.latest`."""
from __future__ import annotations

from ..latest import IO, UI, ComfyAPI, ComfyAPISync, ComfyExtension, io, ui

__all__ = ["IO", "UI", "ComfyAPI", "ComfyAPISync", "ComfyExtension", "io", "ui"]
