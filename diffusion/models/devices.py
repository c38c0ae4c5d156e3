"""Where models run and in which dtype: CUDA > MPS > CPU, chosen once per run and overridable.

dtype defaults (design.md "Devices", issue 9):
- CUDA: UNet fp16 (bf16 if asked); VAE bf16 where supported, else fp32 (the SD VAE overflows in fp16);
  text encoders fp16.
- MPS: fp16 UNet and text encoders, fp32 VAE.
- CPU: the UNet in bf16 when the CPU computes bf16 natively (AVX512-BF16 or AMX: about 2.7x faster
  than fp32 for a full SD1.5 step; fp16 is far slower there), else fp32; VAE and text encoders fp32.
`DeviceConfig` carries the user's switches (`--cpu`, `--lowvram`, dtype overrides); the CLI installs
one with `set_default_config`, tests with the `use_config` context manager.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

DTypeName = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DeviceConfig:
    cpu: bool = False                      # never use an accelerator
    lowvram: bool = False                  # offload every model right after use
    unet_dtype: DTypeName | None = None    # None: the device's default
    vae_dtype: DTypeName | None = None
    text_dtype: DTypeName | None = None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 on this CPU (cpuinfo flags, or torch's AMX capability level)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        if " avx512_bf16" in flags or " amx_bf16" in flags:
            return True
    except OSError:
        pass
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False


def torch_device(config: DeviceConfig) -> torch.device:
    """The compute device: CUDA > MPS > CPU (CPU when `config.cpu`)."""
    if not config.cpu:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


def offload_device(config: DeviceConfig) -> torch.device:
    return torch.device("cpu")


def _cuda_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def unet_dtype(config: DeviceConfig, device: torch.device | None = None) -> torch.dtype:
    if config.unet_dtype:
        return DTYPES[config.unet_dtype]
    device = device or torch_device(config)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def vae_dtype(config: DeviceConfig, device: torch.device | None = None) -> torch.dtype:
    if config.vae_dtype:
        return DTYPES[config.vae_dtype]
    device = device or torch_device(config)
    return torch.bfloat16 if _cuda_bf16(device) else torch.float32


def text_dtype(config: DeviceConfig, device: torch.device | None = None) -> torch.dtype:
    if config.text_dtype:
        return DTYPES[config.text_dtype]
    device = device or torch_device(config)
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


_default = DeviceConfig()
_current: contextvars.ContextVar[DeviceConfig | None] = contextvars.ContextVar("easel_device_config", default=None)


def set_default_config(config: DeviceConfig) -> None:
    """The process-wide config (CLI switches)."""
    global _default
    _default = config


def current_config() -> DeviceConfig:
    return _current.get() or _default


@contextlib.contextmanager
def use_config(config: DeviceConfig) -> Iterator[DeviceConfig]:
    token = _current.set(config)
    try:
        yield config
    finally:
        _current.reset(token)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (None on the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# --- who holds accelerator memory, and making room ------------------------------------------------

_loaded: dict[int, tuple[torch.device, int, object]] = {}     # id(owner) -> (device, bytes, offload fn)
_order: list[int] = []                                        # least recently used first
RESERVE_BYTES = 1 << 30                                       # kept free for activations


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def mark_loaded(owner: object, device: torch.device, nbytes: int, offload: Callable[[], None]) -> None:
    """Record that `owner` holds `nbytes` on `device`; `offload()` moves it off when room is needed."""
    key = id(owner)
    _loaded[key] = (device, nbytes, offload)
    if key in _order:
        _order.remove(key)
    _order.append(key)


def mark_offloaded(owner: object) -> None:
    _loaded.pop(id(owner), None)
    if id(owner) in _order:
        _order.remove(id(owner))


def make_room(device: torch.device, needed: int, keep: object | None = None,
              free: Callable[[torch.device], int | None] = free_memory) -> list[int]:
    """Offload the least recently used models on `device` until `needed` bytes (+ a reserve) are free;
    returns the keys (ids of owners) it offloaded. Does nothing on the CPU (no accelerator memory to
    share). `free` measures the device's free bytes (torch's view of it by default)."""
    available = free(device)
    done: list[int] = []
    if available is None:
        return done
    for key in list(_order):
        if available >= needed + RESERVE_BYTES:
            break
        dev, _nbytes, offload = _loaded[key]
        if dev != device or (keep is not None and key == id(keep)):
            continue
        offload()                                             # type: ignore[operator]
        mark_offloaded_key(key)
        done.append(key)
        empty_cache(device)
        available = free(device) or 0
    return done


def mark_offloaded_key(key: int) -> None:
    _loaded.pop(key, None)
    if key in _order:
        _order.remove(key)
