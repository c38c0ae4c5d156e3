"""`comfy.model_management` basics for plugins: devices, memory, interrupt checks.

Devices come from `diffusion.models.devices` (the CLI/server switches); interrupt checks go to the runtime
of the running node (`graph.runtime.current()`). Easel moves and frees models itself, so
`load_models_gpu` and `unload_all_models` do nothing. `interrupt_current_processing(True)` sets a
flag that this module's checks honour (and clear when they raise).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from diffusion.models import devices
from graph.runtime import Interrupted, current

InterruptProcessingException = Interrupted
OOM_EXCEPTION = torch.cuda.OutOfMemoryError
_interrupt_flag = False


def get_torch_device() -> torch.device:
    return devices.torch_device(devices.current_config())


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return devices.offload_device(devices.current_config())


def text_encoder_device() -> torch.device:
    return get_torch_device()


def vae_dtype(device: torch.device | None = None, allowed_dtypes: Any = ()) -> torch.dtype:
    return devices.vae_dtype(devices.current_config(), device)


def unet_dtype(device: torch.device | None = None, *args: Any, **kwargs: Any) -> torch.dtype:
    return devices.unet_dtype(devices.current_config(), device)


def soft_empty_cache(force: bool = False) -> None:
    devices.empty_cache(get_torch_device())


def unload_all_models() -> None:
    """Easel's output cache owns the models; nothing to do here."""


def load_models_gpu(models: Any, *args: Any, **kwargs: Any) -> None:
    """Easel moves models to the device when a sampler needs them; nothing to do here."""


def _ram() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def get_free_memory(dev: torch.device | None = None, torch_free_too: bool = False) -> Any:
    dev = dev or get_torch_device()
    free = devices.free_memory(dev)
    if free is None:
        free = _ram()[0]
    return (free, free) if torch_free_too else free


def get_total_memory(dev: torch.device | None = None, torch_total_too: bool = False) -> Any:
    dev = dev or get_torch_device()
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else _ram()[1]
    return (total, total) if torch_total_too else total


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt_flag
    _interrupt_flag = bool(value)


def processing_interrupted() -> bool:
    return _interrupt_flag or current().interrupt_requested()


def throw_exception_if_processing_interrupted() -> None:
    """Raise InterruptProcessingException (Easel's graph.runtime.Interrupted) when asked to stop."""
    global _interrupt_flag
    if _interrupt_flag:
        _interrupt_flag = False
        raise Interrupted(f"interrupted in node {current().node_id}")
    current().check_interrupt()
