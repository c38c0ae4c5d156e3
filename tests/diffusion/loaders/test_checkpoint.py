"""diffusion/loaders/checkpoint.py through the CheckpointLoaderSimple / VAELoader nodes: tiny random modules
written in the ldm layout by diffusion.demo.checkpoint's writer, loaded back, outputs compared in fp32."""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.demo.checkpoint import (
    TinyComponents,
    ensure_demo_checkpoint,
    ldm_state_dict,
    tiny_components,
    write_ldm_checkpoint,
)
from diffusion.loaders.checkpoint import load_checkpoint
from diffusion.models.devices import DeviceConfig, use_config
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.models.errors import ModelFileError
from diffusion.models.vae import VAE
from nodes.builtin.loaders import CheckpointLoaderSimple, VAELoader
from nodes.folders import ModelFolders, use_folders

TOL = 1e-5
IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])   # "a photo of a cat"


@pytest.fixture
def folders(tmp_path: Path) -> Iterator[ModelFolders]:
    f = ModelFolders(tmp_path)
    for kind in ("checkpoints", "vae"):
        (tmp_path / "models" / kind).mkdir(parents=True)
    with use_folders(f), use_config(DeviceConfig(cpu=True, unet_dtype="fp32")):
        yield f


def _unet_inputs(model: DiffusionModel, comps: TinyComponents) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, model.context_dim, generator=g)
    t = torch.tensor([12.0, 871.5])
    ours: dict = dict(x=x, timestep=t, context=ctx)
    theirs: dict = dict(sample=torch.cat([x, model.default_concat(x)], 1) if comps.family.inpaint else x,
                        timestep=t, encoder_hidden_states=ctx)
    if comps.family.is_sdxl:
        te, ti = torch.randn(2, model.pooled_dim, generator=g), torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2)
        ours.update(text_embeds=te, time_ids=ti)
        theirs["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ti}
    return ours, theirs


@pytest.mark.parametrize("name,inpaint,prediction,ext", [
    ("sd1", False, "eps", ".safetensors"), ("sd2", False, "v", ".safetensors"),
    ("sdxl", False, "eps", ".safetensors"), ("sd1", True, "eps", ".safetensors"),
    ("sd1", False, "eps", ".ckpt"),
])
@torch.no_grad()
def test_round_trip(folders: ModelFolders, name: str, inpaint: bool, prediction: str, ext: str) -> None:
    comps = tiny_components(name, seed=7, inpaint=inpaint, prediction=prediction)
    write_ldm_checkpoint(comps, folders.dirs("checkpoints")[0] / f"tiny{ext}")
    assert CheckpointLoaderSimple.INPUT_TYPES()["required"]["ckpt_name"][0] == [f"tiny{ext}"]
    patcher, clip, vae = CheckpointLoaderSimple().load_checkpoint(f"tiny{ext}")

    model = patcher.model
    assert isinstance(model, DiffusionModel)
    assert (model.family.name, model.family.inpaint, model.prediction) == (name, inpaint, prediction)
    assert model.dtype == torch.float32
    ours, theirs = _unet_inputs(model, comps)
    assert (model.apply_model(**ours) - comps.unet(**theirs).sample).abs().max() <= TOL

    img = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(2))
    # LATENT values are VAE latents (unscaled, as ComfyUI); the model's scale factor is the family's
    ref_latent = comps.vae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    assert (vae.encode(img) - ref_latent).abs().max() <= TOL
    assert model.latent_scale_factor == comps.family.latent_scale_factor
    ref_img = ((comps.vae.decode(ref_latent).sample + 1) / 2).clamp(0, 1)
    assert (vae.decode(ref_latent) - ref_img.permute(0, 2, 3, 1)).abs().max() <= TOL

    assert clip is not None and set(clip.encoders) == set(comps.text_encoders)
    for key, original in comps.text_encoders.items():
        a, b = clip.encoders[key](IDS, output_hidden_states=True), original(IDS, output_hidden_states=True)
        assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= TOL
        assert (a.hidden_states[-2] - b.hidden_states[-2]).abs().max() <= TOL
        if key == "g":
            assert (a.text_embeds - b.text_embeds).abs().max() <= TOL


@torch.no_grad()
def test_sdxl_y_vector_equals_text_embeds_and_time_ids() -> None:
    comps = tiny_components("sdxl", seed=3)
    model = DiffusionModel(comps.unet, comps.family, "eps")
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, model.context_dim)
    te, ti = torch.randn(1, model.pooled_dim), torch.tensor([[1024.0, 768, 0, 32, 1024, 1024]])
    y = torch.cat([te, comps.unet.add_time_proj(ti.flatten()).reshape(1, -1)], dim=1)   # ComfyUI's adm vector
    assert y.shape[1] == model.adm_channels
    a = model.apply_model(x, torch.tensor([500.0]), ctx, text_embeds=te, time_ids=ti)
    assert torch.equal(a, model.apply_model(x, torch.tensor([500.0]), ctx, y=y))
    with pytest.raises(ValueError, match="pooled text embedding"):
        model.apply_model(x, torch.tensor([500.0]), ctx)


@torch.no_grad()
def test_bf16_unet_on_request(tmp_path: Path) -> None:
    comps = tiny_components("sd1", seed=4)
    path = write_ldm_checkpoint(comps, tmp_path / "t.safetensors")
    patcher, _, vae = load_checkpoint(path, DeviceConfig(cpu=True, unet_dtype="bf16"))
    model = patcher.model
    assert model.dtype == torch.bfloat16 and vae.dtype == torch.float32
    ours, theirs = _unet_inputs(model, comps)
    out = model.apply_model(**ours)
    assert out.dtype == torch.float32 and (out - comps.unet(**theirs).sample).abs().max() < 0.1


@torch.no_grad()
def test_vae_loader_ldm_and_diffusers_names(folders: ModelFolders) -> None:
    comps = tiny_components("sd1", seed=9, vae_levels=4)
    vae_dir = folders.dirs("vae")[0]
    bare = {k.removeprefix("first_stage_model."): v.contiguous()
            for k, v in ldm_state_dict(comps).items() if k.startswith("first_stage_model.")}
    save_file(bare, str(vae_dir / "ldm_vae.safetensors"))
    save_file({k: v.contiguous() for k, v in comps.vae.state_dict().items()}, str(vae_dir / "sdxl_vae.safetensors"))
    assert VAELoader.INPUT_TYPES()["required"]["vae_name"][0] == ["ldm_vae.safetensors", "sdxl_vae.safetensors"]
    (a,) = VAELoader().load_vae("ldm_vae.safetensors")
    (b,) = VAELoader().load_vae("sdxl_vae.safetensors")
    assert isinstance(a, VAE) and a.downscale_ratio == 8
    # the config records the usual factor (from the name here); decoding never uses it
    assert (a.module.config.scaling_factor, b.module.config.scaling_factor) == (0.18215, 0.13025)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = ((comps.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert (a.decode(z) - ref).abs().max() <= TOL
    assert (b.decode(z) - ref).abs().max() <= TOL


@torch.no_grad()
def test_diffusers_folder(tmp_path: Path) -> None:
    comps = tiny_components("sdxl", seed=2)
    root = tmp_path / "pipe"
    comps.unet.save_pretrained(root / "unet")
    comps.vae.save_pretrained(root / "vae")
    comps.text_encoders["l"].save_pretrained(root / "text_encoder")
    comps.text_encoders["g"].save_pretrained(root / "text_encoder_2")
    (root / "model_index.json").write_text("{}")
    patcher, clip, _vae = load_checkpoint(root, DeviceConfig(cpu=True, unet_dtype="fp32"))
    assert patcher.model.family.name == "sdxl" and set(clip.encoders) == {"l", "g"}
    ours, theirs = _unet_inputs(patcher.model, comps)
    assert (patcher.model.apply_model(**ours) - comps.unet(**theirs).sample).abs().max() <= TOL


def test_demo_checkpoint_is_written_once_and_detected(tmp_path: Path) -> None:
    path = ensure_demo_checkpoint(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert ensure_demo_checkpoint(tmp_path) == path and path.stat().st_mtime_ns == stamp
    patcher, clip, vae = load_checkpoint(path, DeviceConfig(cpu=True))
    assert patcher.model.family.name == "sd1" and vae.downscale_ratio == 8 and clip is not None


# --- errors: each names the file and what was found -------------------------------------------------

def _write(folders: ModelFolders, name: str, data: bytes) -> None:
    (folders.dirs("checkpoints")[0] / name).write_bytes(data)


def test_error_truncated_safetensors(folders: ModelFolders) -> None:
    path = write_ldm_checkpoint(tiny_components("sd1"), folders.dirs("checkpoints")[0] / "cut.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ModelFileError, match=r"cut\.safetensors.*truncated"):
        CheckpointLoaderSimple().load_checkpoint("cut.safetensors")


def test_error_random_bytes(folders: ModelFolders) -> None:
    _write(folders, "noise.safetensors", random.Random(0).randbytes(10_000))     # seeded: never flaky
    with pytest.raises(ModelFileError, match=r"noise\.safetensors.*not a valid safetensors file.*10000 bytes"):
        CheckpointLoaderSimple().load_checkpoint("noise.safetensors")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_error_malicious_pickle_refused(folders: ModelFolders, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    sd = ldm_state_dict(tiny_components("sd1"))
    torch.save({"state_dict": sd, "hook": _Payload(marker)}, folders.dirs("checkpoints")[0] / "evil.ckpt")
    with pytest.raises(ModelFileError, match=r"evil\.ckpt.*refused.*system"):
        CheckpointLoaderSimple().load_checkpoint("evil.ckpt")
    assert not marker.exists()


def test_error_unknown_architecture(folders: ModelFolders) -> None:
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4)},
              str(folders.dirs("checkpoints")[0] / "bert.safetensors"))
    with pytest.raises(ModelFileError, match=r"bert\.safetensors.*no Stable Diffusion UNet.*head\.bias"):
        CheckpointLoaderSimple().load_checkpoint("bert.safetensors")


def test_error_tensor_missing_or_misshapen(folders: ModelFolders) -> None:
    sd = {k: v.contiguous() for k, v in ldm_state_dict(tiny_components("sd1")).items()}
    broken = dict(sd)
    del broken["model.diffusion_model.out.2.bias"]
    save_file(broken, str(folders.dirs("checkpoints")[0] / "hole.safetensors"))
    with pytest.raises(ModelFileError, match=r"hole\.safetensors.*UNet tensors missing: model\.diffusion_model\.out\.2\.bias"):
        CheckpointLoaderSimple().load_checkpoint("hole.safetensors")
    extra = dict(sd)
    extra["model.diffusion_model.mystery.weight"] = torch.zeros(3)
    save_file(extra, str(folders.dirs("checkpoints")[0] / "extra.safetensors"))
    with pytest.raises(ModelFileError, match=r"not understood: model\.diffusion_model\.mystery\.weight"):
        CheckpointLoaderSimple().load_checkpoint("extra.safetensors")


def test_error_missing_file(folders: ModelFolders) -> None:
    with pytest.raises(ModelFileError, match=r"nothere\.safetensors.*not found"):
        CheckpointLoaderSimple().load_checkpoint("nothere.safetensors")
