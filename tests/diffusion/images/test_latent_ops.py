"""diffusion/images/latent_ops.py: resize methods, center crop, bislerp, LatentUpscale size rules."""
from __future__ import annotations

import pytest
import torch

from diffusion.images import latent_ops


def _x(b: int = 2, c: int = 4, h: int = 6, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", list(latent_ops.LATENT_METHODS))
def test_every_latent_method_gives_the_target_shape(method):
    x = _x()
    out = latent_ops.upscale(x, 12, 9, method)
    assert out.shape == (2, 4, 9, 12) and out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "bicubic", "bislerp"])
def test_same_size_is_identity(method):
    x = _x()
    assert torch.allclose(latent_ops.upscale(x, 8, 6, method), x, atol=1e-5)


def test_nearest_exact_doubles_pixels():
    x = _x(1, 1, 2, 2)
    out = latent_ops.upscale(x, 4, 4, "nearest-exact")
    assert torch.equal(out, x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))


def test_area_downscale_is_block_mean():
    x = _x(1, 2, 4, 4)
    out = latent_ops.upscale(x, 2, 2, "area")
    assert torch.allclose(out, x.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2)), atol=1e-6)


def test_center_crop_cuts_both_sides_equally():
    x = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8)
    cropped = latent_ops.center_crop_to_aspect(x, 1, 1)          # 4x8 -> 4x4, 2 columns off each side
    assert torch.equal(cropped, x[..., 2:6])
    tall = latent_ops.center_crop_to_aspect(x.transpose(-1, -2), 1, 1)
    assert torch.equal(tall, x.transpose(-1, -2)[..., 2:6, :])
    out = latent_ops.upscale(x, 4, 4, "nearest-exact", "center")
    assert torch.equal(out, x[..., 2:6])
    stretched = latent_ops.upscale(x, 4, 4, "nearest-exact", "disabled")
    assert not torch.equal(stretched, out)


def test_bislerp_keeps_length_where_bilinear_shrinks_it():
    # two orthogonal unit vectors side by side: the halfway point has length 1 by slerp, 0.707 by lerp
    x = torch.zeros(1, 2, 1, 2)
    x[0, 0, 0, 0] = 1.0
    x[0, 1, 0, 1] = 1.0
    slerped = latent_ops.upscale(x, 4, 1, "bislerp")
    lerped = latent_ops.upscale(x, 4, 1, "bilinear")
    mid_s = slerped[0, :, 0, 1:3].norm(dim=0)
    mid_l = lerped[0, :, 0, 1:3].norm(dim=0)
    assert torch.allclose(mid_s, torch.ones(2), atol=1e-5)
    assert (mid_l < 0.95).all()
    # directions agree with bilinear (same interpolation weights, only the length differs)
    cos = torch.nn.functional.cosine_similarity(slerped[0, :, 0], lerped[0, :, 0], dim=0)
    assert (cos > 0.99).all()


def test_bislerp_parallel_and_zero_vectors_fall_back_to_lerp():
    x = torch.zeros(1, 3, 2, 2)
    x[:, 0, 0, 0] = 2.0
    x[:, 0, 0, 1] = 4.0        # parallel to its neighbour; the rest is zeros
    out = latent_ops.upscale(x, 4, 4, "bislerp")
    ref = latent_ops.upscale(x, 4, 4, "bilinear")
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5)


def test_lanczos_for_images():
    img = torch.full((1, 3, 5, 7), 0.4)
    out = latent_ops.upscale(img, 14, 10, "lanczos")
    assert out.shape == (1, 3, 10, 14)
    assert torch.allclose(out, torch.full_like(out, round(0.4 * 255 - 0.5) / 255), atol=1 / 255)
    grey = latent_ops.upscale(torch.rand(1, 2, 4, 4), 8, 8, "lanczos")   # channel by channel
    assert grey.shape == (1, 2, 8, 8)


def test_upscale_latent_to_pixels_size_rules():
    x = _x(1, 4, 8, 16)                                         # 128 x 64 pixels
    assert latent_ops.upscale_latent_to_pixels(x, 0, 0, "bilinear") is x
    assert latent_ops.upscale_latent_to_pixels(x, 256, 128, "bilinear").shape[-2:] == (16, 32)
    assert latent_ops.upscale_latent_to_pixels(x, 0, 128, "bilinear").shape[-2:] == (16, 32)   # aspect kept
    assert latent_ops.upscale_latent_to_pixels(x, 256, 0, "bilinear").shape[-2:] == (16, 32)
    assert latent_ops.upscale_latent_to_pixels(x, 0, 16, "bilinear").shape[-2:] == (8, 16)     # min 64 px


def test_upscale_by_rounds():
    assert latent_ops.upscale_by(_x(1, 4, 6, 8), 1.5, "nearest-exact").shape[-2:] == (9, 12)
    assert latent_ops.upscale_by(_x(1, 4, 6, 8), 0.01, "area").shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="scale_by"):
        latent_ops.upscale_by(_x(), 0, "area")


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown method 'wavy'"):
        latent_ops.upscale(_x(), 4, 4, "wavy")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        latent_ops.upscale(torch.zeros(4, 4), 4, 4, "area")
    with pytest.raises(ValueError, match="crop"):
        latent_ops.upscale(_x(), 4, 4, "area", "left")  # type: ignore[arg-type]


def test_crop_window_is_clamped():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(latent_ops.crop(x, 1, 2, 2, 5), x[..., 2:4, 1:3])
    assert latent_ops.crop(x, 10, 10, 0, 0).shape[-2:] == (1, 1)
