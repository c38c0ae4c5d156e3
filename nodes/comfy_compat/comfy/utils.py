"""`comfy.utils` for plugins: ProgressBar, common_upscale, load_torch_file.

`ProgressBar` reports through the runtime of the node that created it
(`graph.runtime.current().progress`), which the executor turns into `progress` events.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from diffusion.images import latent_ops
from diffusion.models.state_dict import load_state_dict
from graph.runtime import NodeRuntime, current

PROGRESS_BAR_ENABLED = True
ProgressHook = Callable[..., None]
_global_hook: ProgressHook | None = None


def set_progress_bar_global_hook(function: ProgressHook | None) -> None:
    """Replace where ProgressBar updates go: `function(value, total, preview, node_id=...)`."""
    global _global_hook
    _global_hook = function


class ProgressBar:
    """`ProgressBar(total)`; `update(n)` adds n steps, `update_absolute(value, total, preview)` sets them."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = int(total)
        self.current = 0
        self._runtime: NodeRuntime = current()     # the node that made the bar, even if updated elsewhere
        self.node_id = node_id if node_id is not None else self._runtime.node_id

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = int(total)
        self.current = min(int(value), self.total)
        if _global_hook is not None:
            _global_hook(self.current, self.total, preview, node_id=self.node_id)
        else:
            self._runtime.progress(self.current, self.total, preview)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + int(value))


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str,
                   crop: str) -> torch.Tensor:
    """Resize [B, C, H, W] to [B, C, height, width]: nearest-exact, bilinear, area, bicubic,
    bislerp, lanczos; crop "center" crops to the target aspect first, "disabled" stretches."""
    return latent_ops.upscale(samples, int(width), int(height), upscale_method, crop)  # type: ignore[arg-type]


def load_torch_file(ckpt: str | os.PathLike[str], safe_load: bool = True, device: torch.device | None = None,
                    return_metadata: bool = False) -> Any:
    """Tensors of a .safetensors / .ckpt / .pt file (pickles only through weights_only loading)."""
    loaded = load_state_dict(ckpt, with_metadata=return_metadata)
    tensors, meta = loaded if return_metadata else (loaded, None)  # type: ignore[misc]
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}  # type: ignore[union-attr]
    return (tensors, meta) if return_metadata else tensors
