"""Sampling nodes: ComfyUI input names/order, progress events with previews, interrupt between
steps, KSamplerAdvanced's string options, and the split SamplerCustom family on a tiny UNet."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.patches.patcher import ModelPatcher
from graph.runtime import Interrupted, NodeRuntime, running
from nodes.builtin import sampling as S


@pytest.fixture(scope="module")
def model() -> ModelPatcher:
    torch.set_num_threads(2)
    c = tiny_components("sd1", seed=1)
    return ModelPatcher(DiffusionModel(c.unet, c.family, "eps"))


def _cond(seed: int) -> list:
    return [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(seed)), {}]]


def _latent() -> dict:
    return {"samples": torch.zeros(1, 4, 8, 8)}


def test_input_names_and_order_match_comfyui() -> None:
    ks = S.KSampler.INPUT_TYPES()["required"]
    assert list(ks) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                        "latent_image", "denoise"]
    assert ks["seed"][1]["max"] == 2 ** 64 - 1 and ks["steps"][1]["default"] == 20 and ks["cfg"][1]["default"] == 8.0
    assert "euler" in ks["sampler_name"][0] and "uni_pc_bh2" in ks["sampler_name"][0]
    assert ks["scheduler"][0][:7] == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]
    adv = S.KSamplerAdvanced.INPUT_TYPES()["required"]
    assert list(adv) == ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                         "negative", "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise"]
    assert adv["return_with_leftover_noise"][0] == ["disable", "enable"]
    assert list(S.SamplerCustom.INPUT_TYPES()["required"]) == [
        "model", "add_noise", "noise_seed", "cfg", "positive", "negative", "sampler", "sigmas", "latent_image"]
    assert set(S.NODE_CLASS_MAPPINGS) == set(S.NODE_DISPLAY_NAME_MAPPINGS)


def test_progress_per_step_with_preview(model: ModelPatcher) -> None:
    events: list[tuple[str, dict]] = []
    rt = NodeRuntime(node_id="3", emit=lambda e, d: events.append((e, d)))
    with running(rt):
        (out,) = S.KSampler().sample(model, 5, 3, 6.0, "dpmpp_2m", "karras", _cond(1), _cond(2), _latent())
    progress = [d for e, d in events if e == "progress"]
    assert [(d["value"], d["max"], d["node"]) for d in progress] == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    assert all(isinstance(d["preview"], Image.Image) and d["preview"].size == (8, 8) for d in progress)
    assert out["samples"].shape == (1, 4, 8, 8)


def test_preview_method_none_and_taesd(model: ModelPatcher, tmp_path) -> None:
    from safetensors.torch import save_file

    from nodes.folders import ModelFolders
    from tests.diffusion.images.test_taesd import original_layout

    folders = ModelFolders(tmp_path)
    (tmp_path / "models" / "vae_approx").mkdir(parents=True)
    save_file(original_layout(), str(tmp_path / "models" / "vae_approx" / "taesd_decoder.safetensors"))
    for method, size in (("none", None), ("auto", (64, 64)), ("latent2rgb", (8, 8))):
        events: list[tuple[str, dict]] = []
        rt = NodeRuntime(node_id="3", emit=lambda e, d: events.append((e, d)), folders=folders, preview_method=method)
        with running(rt):
            S.KSampler().sample(model, 5, 2, 6.0, "euler", "normal", _cond(1), _cond(2), _latent())
        previews = [d["preview"] for e, d in events if e == "progress"]
        assert len(previews) == 2
        assert all((p is None) if size is None else p.size == size for p in previews), method


def test_interrupt_between_steps(model: ModelPatcher) -> None:
    seen: list[int] = []

    def emit(event: str, data: dict) -> None:
        seen.append(data["value"])

    rt = NodeRuntime(node_id="3", emit=emit, interrupt_requested=lambda: len(seen) >= 2)
    with running(rt), pytest.raises(Interrupted):
        S.KSampler().sample(model, 5, 6, 6.0, "euler", "normal", _cond(1), _cond(2), _latent())
    assert seen == [1, 2]
    assert not model.is_patched()


def test_advanced_options_and_split_nodes(model: ModelPatcher) -> None:
    adv = S.KSamplerAdvanced()
    common: dict[str, Any] = dict(model=model, noise_seed=9, steps=4, cfg=5.0, sampler_name="euler",
                                  scheduler="karras", positive=_cond(1), negative=_cond(2))
    (full,) = adv.sample(add_noise="enable", latent_image=_latent(), start_at_step=0, end_at_step=10000,
                         return_with_leftover_noise="disable", **common)
    (half,) = adv.sample(add_noise="enable", latent_image=_latent(), start_at_step=0, end_at_step=2,
                         return_with_leftover_noise="enable", **common)
    (rest,) = adv.sample(add_noise="disable", latent_image=half, start_at_step=2, end_at_step=10000,
                         return_with_leftover_noise="disable", **common)
    assert torch.allclose(rest["samples"], full["samples"], atol=1e-5)
    # the split form gives the same result: KSamplerSelect + BasicScheduler + SamplerCustom
    (sampler,) = S.KSamplerSelect().get_sampler("euler")
    (sigmas,) = S.BasicScheduler().get_sigmas(model, "karras", 4, 1.0)
    out, denoised = S.SamplerCustom().sample(model, True, 9, 5.0, _cond(1), _cond(2), sampler, sigmas, _latent())
    assert torch.allclose(out["samples"], full["samples"], atol=1e-5)
    high, low = S.SplitSigmas().get_sigmas(sigmas, 2)
    assert high.tolist() == sigmas[:3].tolist() and low.tolist() == sigmas[2:].tolist()
    (noise,) = S.RandomNoise().get_noise(9)
    (guider,) = S.CFGGuider().get_guider(model, _cond(1), _cond(2), 5.0)
    out2, _ = S.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, _latent())
    assert torch.equal(out2["samples"], out["samples"])
    (short,) = S.BasicScheduler().get_sigmas(model, "normal", 10, 0.5)
    assert len(short) == 11 and short[0].item() == pytest.approx(1.4806, abs=1e-4)
    with pytest.raises(ValueError, match="unknown sampler 'warp'"):
        S.KSamplerSelect().get_sampler("warp")
