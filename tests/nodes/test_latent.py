"""nodes/builtin/latent.py: EmptyLatentImage, LatentUpscale, LatentUpscaleBy."""
from __future__ import annotations

import torch

from nodes.builtin import latent


def test_node_api_matches_comfyui():
    assert list(latent.EmptyLatentImage.INPUT_TYPES()["required"]) == ["width", "height", "batch_size"]
    assert list(latent.LatentUpscale.INPUT_TYPES()["required"]) == ["samples", "upscale_method", "width", "height", "crop"]
    assert list(latent.LatentUpscaleBy.INPUT_TYPES()["required"]) == ["samples", "upscale_method", "scale_by"]
    assert latent.LatentUpscale.INPUT_TYPES()["required"]["upscale_method"][0] == [
        "nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
    assert latent.LatentUpscale.INPUT_TYPES()["required"]["crop"][0] == ["disabled", "center"]
    w = latent.EmptyLatentImage.INPUT_TYPES()["required"]["width"][1]
    assert (w["default"], w["min"], w["step"]) == (512, 16, 8)


def test_empty_latent_shape():
    (out,) = latent.EmptyLatentImage().generate(768, 512, 3)
    assert set(out) == {"samples"}
    assert out["samples"].shape == (3, 4, 64, 96) and out["samples"].abs().sum() == 0
    assert out["samples"].dtype == torch.float32


def test_latent_upscale_keeps_extra_keys():
    mask = torch.ones(1, 1, 64, 64)
    samples = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
               "noise_mask": mask, "batch_index": [4, 5]}
    (out,) = latent.LatentUpscale().upscale(samples, "bislerp", 128, 96, "disabled")
    assert out["samples"].shape == (2, 4, 12, 16)
    assert out["noise_mask"] is mask and out["batch_index"] == [4, 5]
    assert samples["samples"].shape == (2, 4, 8, 8)      # input dict not modified
    (same,) = latent.LatentUpscale().upscale(samples, "bilinear", 0, 0, "center")
    assert same["samples"] is samples["samples"]


def test_latent_upscale_by():
    samples = {"samples": torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))}
    (out,) = latent.LatentUpscaleBy().upscale(samples, "nearest-exact", 2.0)
    assert out["samples"].shape == (1, 4, 16, 24)
    assert torch.equal(out["samples"][..., ::2, ::2], samples["samples"])
