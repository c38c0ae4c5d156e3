"""`import nodes` from a ComfyUI plugin: the names plugins use most, on Easel's `nodes` package."""
from __future__ import annotations

import torch

import nodes
from diffusion.demo.checkpoint import tiny_components
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.patches.patcher import ModelPatcher
from diffusion.sampling.sample import sample
from graph.runtime import NodeRuntime, running
from nodes.builtin import image, sampling


def test_plugin_names_resolve_to_easel_builtins() -> None:
    assert nodes.MAX_RESOLUTION == 16384
    from nodes import MAX_RESOLUTION, SaveImage, KSampler   # noqa: F401  (the usual plugin imports)
    assert SaveImage is image.SaveImage and KSampler is sampling.KSampler
    mappings = nodes.NODE_CLASS_MAPPINGS
    assert mappings["KSampler"] is sampling.KSampler and mappings["VAEDecode"].__name__ == "VAEDecode"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["KSampler"] == "KSampler"
    mappings.pop("KSampler")                                  # a copy: the registry is untouched
    assert "KSampler" in nodes.NODE_CLASS_MAPPINGS
    try:
        nodes.NoSuchNode
    except AttributeError as e:
        assert "MAX_RESOLUTION" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
    from nodes import folders, registry                     # submodules still import normally
    assert hasattr(folders, "ModelFolders") and hasattr(registry, "Registry")


def test_common_ksampler_runs_the_sampler_with_progress() -> None:
    c = tiny_components("sd1", seed=2)
    model = ModelPatcher(DiffusionModel(c.unet, c.family, "eps"))
    g = torch.Generator().manual_seed(0)
    pos, neg = [[torch.randn(1, 77, 32, generator=g), {}]], [[torch.randn(1, 77, 32, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    events: list[tuple[str, dict]] = []
    with running(NodeRuntime(node_id="7", emit=lambda e, d: events.append((e, d)), preview_method="none")):
        (out,) = nodes.common_ksampler(model, 3, 4, 5.0, "euler", "normal", pos, neg, latent,
                                       start_step=0, last_step=2)
    want = sample(model, 3, 4, 5.0, "euler", "normal", pos, neg, latent, start_step=0, end_step=2,
                  return_with_leftover_noise=True)
    assert torch.equal(out["samples"], want["samples"])
    assert [d["value"] for e, d in events if e == "progress"] == [1, 2]
    (full,) = nodes.common_ksampler(model, 3, 4, 5.0, "euler", "normal", pos, neg, latent,
                                    start_step=0, last_step=2, force_full_denoise=True)
    assert not torch.equal(full["samples"], out["samples"])
