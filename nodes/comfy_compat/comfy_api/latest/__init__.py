"""`comfy_api.latest` for V3 plugins: `from comfy_api.latest import ComfyExtension, io, ui`.

A plugin module defines `async def comfy_entrypoint() -> ComfyExtension`; Easel's loader awaits
it, then `on_load()`, then `get_node_list()`, and registers each class under `schema.node_id`.
`ComfyAPI().execution.set_progress(...)` (and `ComfyAPISync`) report progress of the running node.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

from . import _io as io
from . import _ui as ui

IO = io
UI = ui

__all__ = ["IO", "UI", "ComfyAPI", "ComfyAPISync", "ComfyExtension", "io", "ui"]


class ComfyExtension(ABC):
    """What `comfy_entrypoint()` returns: the node classes of a plugin."""

    async def on_load(self) -> None:
        """Called once before get_node_list(); set up what the nodes share."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The V3 node classes (io.ComfyNode subclasses) this plugin offers."""


def _report_progress(value: float, max_value: float, node_id: str | None, preview_image: Any) -> None:
    from graph.runtime import current
    rt = current()
    if node_id is None and rt.node_id is None:
        raise ValueError("set_progress: node_id must be given outside a running node")
    if node_id is not None and node_id != rt.node_id:
        rt = dataclasses.replace(rt, node_id=str(node_id))
    if preview_image is not None and hasattr(preview_image, "cpu"):        # an IMAGE tensor
        from diffusion.images.image_io import image_to_pil
        preview_image = image_to_pil(preview_image[0] if preview_image.ndim == 4 else preview_image)
    rt.progress(int(value), int(max_value), preview_image)


class _Execution:
    async def set_progress(self, value: float, max_value: float, node_id: str | None = None,
                           preview_image: Any = None, ignore_size_limit: bool = False) -> None:
        _report_progress(value, max_value, node_id, preview_image)


class _ExecutionSync:
    def set_progress(self, value: float, max_value: float, node_id: str | None = None,
                     preview_image: Any = None, ignore_size_limit: bool = False) -> None:
        _report_progress(value, max_value, node_id, preview_image)


class ComfyAPI:
    """`ComfyAPI().execution.set_progress(value, max_value, node_id=None, preview_image=None)` (async)."""

    VERSION = "latest"

    def __init__(self) -> None:
        self.execution = _Execution()


class ComfyAPISync:
    """The same as ComfyAPI with a synchronous set_progress."""

    VERSION = "latest"

    def __init__(self) -> None:
        self.execution = _ExecutionSync()
