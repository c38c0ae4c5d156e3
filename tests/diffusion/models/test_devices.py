"""diffusion/models/devices.py: device choice, dtype defaults and overrides, the run's config."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusion.models import devices
from diffusion.models.devices import DeviceConfig


def test_cpu_flag_and_dtype_defaults_on_cpu() -> None:
    cfg = DeviceConfig(cpu=True)
    cpu = devices.torch_device(cfg)
    assert cpu == torch.device("cpu")
    expected = torch.bfloat16 if devices.cpu_has_native_bf16() else torch.float32
    assert devices.unet_dtype(cfg, cpu) == expected
    assert devices.vae_dtype(cfg, cpu) == torch.float32 and devices.text_dtype(cfg, cpu) == torch.float32


def test_accelerator_defaults() -> None:
    cfg = DeviceConfig()
    assert devices.unet_dtype(cfg, torch.device("cuda")) == torch.float16
    assert devices.text_dtype(cfg, torch.device("mps")) == torch.float16
    assert devices.vae_dtype(cfg, torch.device("mps")) == torch.float32     # the SD VAE overflows in fp16


def test_overrides_and_frozen() -> None:
    cfg = DeviceConfig(cpu=True, unet_dtype="fp32", vae_dtype="bf16", text_dtype="fp16")
    cpu = torch.device("cpu")
    assert (devices.unet_dtype(cfg, cpu), devices.vae_dtype(cfg, cpu), devices.text_dtype(cfg, cpu)) == (
        torch.float32, torch.bfloat16, torch.float16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cpu = False  # type: ignore[misc]


def test_use_config_is_scoped() -> None:
    before = devices.current_config()
    inner = DeviceConfig(cpu=True, lowvram=True)
    with devices.use_config(inner):
        assert devices.current_config() is inner
    assert devices.current_config() is before


def test_make_room_is_a_no_op_on_the_cpu() -> None:
    calls: list[str] = []
    owner = object()
    devices.mark_loaded(owner, torch.device("cpu"), 10, lambda: calls.append("offload"))
    devices.make_room(torch.device("cpu"), 1 << 40)
    devices.mark_offloaded(owner)
    assert calls == []
