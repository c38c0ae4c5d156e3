"""nodes/builtin/vae_nodes.py on a tiny real VAE (diffusion.models.vae.VAE around a seeded AutoencoderKL)."""
from __future__ import annotations

import pytest
import torch

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.vae import VAE
from nodes.builtin import vae_nodes


@pytest.fixture(scope="module")
def vae() -> VAE:
    comps = tiny_components("sd1", seed=3, vae_levels=4)    # 8x downscale like real models
    return VAE(comps.vae, comps.family, "cpu")


def _latent(b: int = 2, h: int = 6, w: int = 8) -> dict[str, torch.Tensor]:
    return {"samples": torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(0))}


def test_node_api_matches_comfyui():
    assert list(vae_nodes.VAEDecode.INPUT_TYPES()["required"]) == ["samples", "vae"]
    assert list(vae_nodes.VAEEncode.INPUT_TYPES()["required"]) == ["pixels", "vae"]
    assert list(vae_nodes.VAEDecodeTiled.INPUT_TYPES()["required"]) == [
        "samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert list(vae_nodes.VAEEncodeTiled.INPUT_TYPES()["required"]) == [
        "pixels", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]


def test_decode_and_encode_shapes(vae):
    (images,) = vae_nodes.VAEDecode().decode(vae, _latent())
    assert images.shape == (2, 48, 64, 3) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    (latent,) = vae_nodes.VAEEncode().encode(vae, images)
    assert set(latent) == {"samples"} and latent["samples"].shape == (2, 4, 6, 8)
    rgba = torch.cat([images, torch.rand(2, 48, 64, 1)], dim=-1)   # alpha is ignored
    (from_rgba,) = vae_nodes.VAEEncode().encode(vae, rgba)
    assert torch.equal(from_rgba["samples"], latent["samples"])


def test_tiled_decode_matches_full_when_one_tile_and_is_close_otherwise(vae):
    samples = {"samples": _latent(1, 12, 12)["samples"] / 0.18215}     # VAE latents of the usual magnitude
    (full,) = vae_nodes.VAEDecode().decode(vae, samples)
    (one_tile,) = vae_nodes.VAEDecodeTiled().decode(vae, samples, tile_size=128, overlap=32)
    assert torch.allclose(one_tile, full, atol=1e-5)
    (tiles,) = vae_nodes.VAEDecodeTiled().decode(vae, samples, tile_size=64, overlap=32)
    assert tiles.shape == full.shape
    assert (tiles - full).abs().mean() < 0.1          # seams blended; the random VAE has a small receptive field


def test_tiled_encode_shapes(vae):
    pixels = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(1))
    (full,) = vae_nodes.VAEEncode().encode(vae, pixels)
    (one_tile,) = vae_nodes.VAEEncodeTiled().encode(vae, pixels, tile_size=128, overlap=0)
    assert torch.allclose(one_tile["samples"], full["samples"], atol=1e-5)
    (tiles,) = vae_nodes.VAEEncodeTiled().encode(vae, pixels, tile_size=64, overlap=32)
    assert tiles["samples"].shape == (1, 4, 12, 12)


def test_bad_inputs_name_node_and_input(vae):
    with pytest.raises(TypeError, match="VAEDecode: input 'samples'"):
        vae_nodes.VAEDecode().decode(vae, torch.zeros(1, 4, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="VAEEncode: input 'pixels'"):
        vae_nodes.VAEEncode().encode(vae, torch.zeros(1, 8, 8))
