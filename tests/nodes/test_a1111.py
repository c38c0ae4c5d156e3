"""A1111Prompt and HypernetworkLoader on the tiny SD1 model: prompt editing and alternation seen by
the sampler call by call, the same latents as the hand-built ComfyUI graph (LoraLoader +
HypernetworkLoader + CLIPTextEncode), tags and their warnings, caching, SDXL's empty negative."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from diffusion.demo.checkpoint import tiny_components
from diffusion.demo.extras import (
    write_demo_embedding,
    write_demo_hypernetwork,
    write_demo_lora,
    write_hypernetwork,
)
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.patches.patcher import ModelPatcher
from diffusion.prompts.clip import CLIP
from diffusion.sampling.sample import sample
from graph.runtime import NodeRuntime, running
from nodes.builtin.a1111 import NODE_CLASS_MAPPINGS, A1111Prompt, HypernetworkLoader
from nodes.builtin.conditioning import CLIPTextEncode
from nodes.builtin.patches import LoraLoader
from nodes.folders import ModelFolders, use_folders

torch.set_num_threads(2)
LORA = "easel-demo-lora"
HN = "easel-demo-hypernet"


@functools.cache
def _components(family: str):
    return tiny_components(family, seed=5)


@pytest.fixture()
def env(tmp_path: Path):
    models = tmp_path / "models"
    write_demo_lora(models / "loras" / "styles")
    write_demo_hypernetwork(models / "hypernetworks")
    write_demo_embedding(models / "embeddings")
    c = _components("sd1")
    model = ModelPatcher(DiffusionModel(c.unet, c.family, "eps"), "cpu", "cpu")
    clip = CLIP(c.text_encoders, c.family, "cpu", "cpu", embedding_dirs=[models / "embeddings"])
    with use_folders(ModelFolders(tmp_path)):
        yield model, clip


def events() -> tuple[NodeRuntime, list[tuple[str, dict]]]:
    seen: list[tuple[str, dict]] = []
    return NodeRuntime(node_id="3", emit=lambda e, d: seen.append((e, d))), seen


def latent() -> dict:
    return {"samples": torch.zeros(1, 4, 8, 8)}


def test_registered_with_inputs_in_order(env) -> None:
    assert set(NODE_CLASS_MAPPINGS) == {"A1111Prompt", "HypernetworkLoader"}
    assert list(A1111Prompt.INPUT_TYPES()["required"]) == ["model", "clip", "positive", "negative", "steps",
                                                            "weight_interpretation"]
    assert A1111Prompt.RETURN_TYPES == ("MODEL", "CLIP", "CONDITIONING", "CONDITIONING")
    req = HypernetworkLoader.INPUT_TYPES()["required"]
    assert list(req) == ["model", "hypernetwork_name", "strength"]
    assert req["hypernetwork_name"][0] == ["easel-demo-hypernet.pt"]


def contexts_per_call(model: ModelPatcher, positive: list, negative: list, steps: int,
                      sampler: str = "euler") -> list[torch.Tensor]:
    """The cross-attention context of every UNet call (cfg 1: positive only)."""
    seen: list[torch.Tensor] = []
    unet = model.model.unet
    handle = unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        sample(model, 1, steps, 1.0, sampler, "karras", positive, negative, latent())
    finally:
        handle.remove()
    return seen


def which(ctx: torch.Tensor, named: dict[str, torch.Tensor]) -> str:
    hits = [n for n, c in named.items() if torch.equal(ctx[:1], c)]
    assert len(hits) == 1, hits
    return hits[0]


def test_prompt_editing_switches_at_the_halfway_step(env) -> None:
    model, clip = env
    _, _, pos, neg = A1111Prompt().encode(model, clip, "a [red:blue:0.5] ball", "", 6)
    assert [e[1]["a1111_calls"] for e in pos] == [(0, 3), (4, None)]
    named = {"red": A1111Prompt().encode(model, clip, "a red ball", "", 6)[2][0][0],
             "blue": A1111Prompt().encode(model, clip, "a blue ball", "", 6)[2][0][0]}
    got = [which(c, named) for c in contexts_per_call(model, pos, neg, 6)]
    # A1111: schedule [(3, red), (6, blue)]; call c uses the first entry with c <= end step
    assert got == ["red"] * 4 + ["blue"] * 2


def test_alternation_changes_every_step(env) -> None:
    model, clip = env
    _, _, pos, neg = A1111Prompt().encode(model, clip, "a [red|blue] ball", "", 6)
    named = {"red": A1111Prompt().encode(model, clip, "a red ball", "", 6)[2][0][0],
             "blue": A1111Prompt().encode(model, clip, "a blue ball", "", 6)[2][0][0]}
    got = [which(c, named) for c in contexts_per_call(model, pos, neg, 6)]
    # schedule [1 red, 2 blue, 3 red, ...]: from the second call on, the text alternates every call
    assert got == ["red", "red", "blue", "red", "blue", "red"]


def test_second_order_sampler_counts_calls_like_a1111(env) -> None:
    model, clip = env
    _, _, pos, neg = A1111Prompt().encode(model, clip, "a [red:blue:2] ball", "", 3)
    named = {"red": A1111Prompt().encode(model, clip, "a red ball", "", 3)[2][0][0],
             "blue": A1111Prompt().encode(model, clip, "a blue ball", "", 3)[2][0][0]}
    got = [which(c, named) for c in contexts_per_call(model, pos, neg, 3, sampler="heun")]
    assert got[:3] == ["red"] * 3 and set(got[3:]) == {"blue"} and len(got) == 5   # heun: 2 calls a step


PROMPT = "a photo of a cat <lora:easel-demo-lora:0.8>, (red:1.2) <hypernet:easel-demo-hypernet:0.6>"
COMFY_TEXT = "a photo of a cat , (red:1.2) "


def comfy_graph(model, clip, text: str, negative: str):
    m, c = LoraLoader().load_lora(model, clip, "styles/easel-demo-lora.safetensors", 0.8, 0.8)
    (m,) = HypernetworkLoader().load_hypernetwork(m, "easel-demo-hypernet.pt", 0.6)
    return m, c, CLIPTextEncode().encode(c, text)[0], CLIPTextEncode().encode(c, negative)[0]


def test_same_latents_as_the_comfy_graph(env) -> None:
    model, clip = env
    a_model, a_clip, a_pos, a_neg = A1111Prompt().encode(model, clip, PROMPT, "blurry", 3, "comfy")
    c_model, _, c_pos, c_neg = comfy_graph(model, clip, COMFY_TEXT, "blurry")
    assert a_model.patch_fingerprint() == c_model.patch_fingerprint()
    assert a_model.records() and a_clip.patcher.records() and a_model.model_options["attn2_kv"]
    assert torch.equal(a_pos[0][0], c_pos[0][0]) and torch.equal(a_neg[0][0], c_neg[0][0])
    assert not torch.allclose(a_pos[0][0], CLIPTextEncode().encode(clip, COMFY_TEXT)[0][0][0])  # LoRA on CLIP
    a = sample(a_model, 42, 3, 6.0, "euler", "normal", a_pos, a_neg, latent())["samples"]
    c = sample(c_model, 42, 3, 6.0, "euler", "normal", c_pos, c_neg, latent())["samples"]
    assert torch.equal(a, c)


def test_a1111_weighting_equals_comfy_graph_without_weights(env) -> None:
    model, clip = env
    prompt = "a photo of a cat <lora:easel-demo-lora:0.8> <hypernet:easel-demo-hypernet:0.6>"
    a_model, _, a_pos, a_neg = A1111Prompt().encode(model, clip, prompt, "blurry", 2, "a1111")
    c_model, _, c_pos, c_neg = comfy_graph(model, clip, "a photo of a cat  ", "blurry")
    a = sample(a_model, 7, 2, 5.0, "euler", "normal", a_pos, a_neg, latent())["samples"]
    c = sample(c_model, 7, 2, 5.0, "euler", "normal", c_pos, c_neg, latent())["samples"]
    assert torch.equal(a, c)


def test_weight_interpretations_differ_and_a1111_keeps_the_mean(env) -> None:
    model, clip = env
    _, _, a1111, _ = A1111Prompt().encode(model, clip, "a (red:1.5) ball", "", 4, "a1111")
    _, _, comfy, _ = A1111Prompt().encode(model, clip, "a (red:1.5) ball", "", 4, "comfy")
    _, _, plain, _ = A1111Prompt().encode(model, clip, "a red ball", "", 4, "a1111")
    assert not torch.allclose(a1111[0][0], comfy[0][0])
    torch.testing.assert_close(a1111[0][0].mean(), plain[0][0].mean(), rtol=1e-4, atol=1e-6)


def test_te_and_unet_multipliers_go_to_clip_and_model(env) -> None:
    model, clip = env
    m, c, _, _ = A1111Prompt().encode(model, clip, "<lora:easel-demo-lora:0.3:0.9> x", "", 4)
    assert {r.strength for r in m.records()} == {0.9}
    assert {r.strength for r in c.patcher.records()} == {0.3}
    assert not model.records() and not clip.patcher.records()      # inputs untouched


def test_changing_only_the_negative_reuses_the_patches(env) -> None:
    model, clip = env
    m1, c1, pos1, _ = A1111Prompt().encode(model, clip, PROMPT, "blurry", 4)
    m2, c2, pos2, _ = A1111Prompt().encode(model, clip, PROMPT, "ugly", 4)
    assert m1.patch_fingerprint() == m2.patch_fingerprint()
    assert c1.patcher.patch_fingerprint() == c2.patcher.patch_fingerprint()
    assert torch.equal(pos1[0][0], pos2[0][0])


def test_tag_problems_are_warnings(env) -> None:
    model, clip = env
    rt, seen = events()
    with running(rt):
        m, c, _, _ = A1111Prompt().encode(model, clip, "<LoRA:x:1> <lora:nosuch:1> <hypernet:gone> cat", "", 4)
    kinds = [d.get("type") for e, d in seen if e == "warning"]
    assert kinds == ["extra_network_unknown", "lora_missing", "hypernetwork_missing"]
    assert m is model and c is clip
    rt, seen = events()
    with running(rt):
        m, c, _, _ = A1111Prompt().encode(model, clip, "<lora:easel-demo-lora:x> <lora:easel-demo-lora:1> cat", "", 4)
    assert [d.get("type") for e, d in seen] == ["extra_network_error"] and m is model   # A1111: none applied


def test_lora_coverage_is_recorded_per_file(env, tmp_path: Path) -> None:
    model, clip = env
    loras = tmp_path / "models" / "loras"
    (loras / "other.safetensors").write_bytes((loras / "styles" / f"{LORA}.safetensors").read_bytes())
    rt, seen = events()
    with running(rt):
        A1111Prompt().encode(model, clip, f"<lora:{LORA}:0.5> <lora:other:1> cat", "", 4)
    records = [d for e, d in seen if e == "node_record"]
    assert [r["name"] for r in records] == ["lora_coverage"]
    covs = records[0]["data"]
    assert [c["file"] for c in covs] == [f"styles/{LORA}.safetensors", "other.safetensors"]
    # the demo LoRA also covers blocks this tiny model lacks: both files report the same split
    assert covs[0]["matched_keys"] > 0 and covs[0]["unmatched_count"] > 0
    assert all(c["matched_keys"] + c["unmatched_count"] == c["total_keys"] for c in covs)
    assert [c["matched_keys"] for c in covs] == [covs[0]["matched_keys"]] * 2


def test_negative_keeps_tags_as_text_and_is_not_split_on_and(env) -> None:
    model, clip = env
    m, _, _, neg = A1111Prompt().encode(model, clip, "cat", "<lora:easel-demo-lora:1> AND dog:0.5", 4)
    assert m is model and len(neg) == 1 and "strength" not in neg[0][1]
    _, _, pos, _ = A1111Prompt().encode(model, clip, "a cat AND a dog:0.5", "", 4)
    assert [e[1].get("strength") for e in pos] == [1.0, 0.5]


def test_bare_embedding_name_changes_the_encoding(env) -> None:
    model, clip = env
    _, _, with_emb, _ = A1111Prompt().encode(model, clip, "a demostyle cat", "", 4)
    _, _, without, _ = A1111Prompt().encode(model, clip, "a cat", "", 4)
    assert not torch.allclose(with_emb[0][0], without[0][0])


def test_stacked_hypernetworks_through_the_loader(env, tmp_path: Path) -> None:
    model, _ = env
    write_hypernetwork(tmp_path / "models" / "hypernetworks" / "second.pt", [32], seed=9, activation_func="tanh")
    (m,) = HypernetworkLoader().load_hypernetwork(model, "easel-demo-hypernet.pt", 0.5)
    (m,) = HypernetworkLoader().load_hypernetwork(m, "second.pt", 1.0)
    assert [h.hypernetwork.name for h in m.model_options["attn2_kv"]] == [HN, "second"]
    (same,) = HypernetworkLoader().load_hypernetwork(model, "easel-demo-hypernet.pt", 0.0)
    assert same is model


def test_sdxl_empty_negative_is_zeros(tmp_path: Path) -> None:
    c = _components("sdxl")
    clip = CLIP(c.text_encoders, c.family, "cpu", "cpu")
    with use_folders(ModelFolders(tmp_path)):
        _, _, pos, neg = A1111Prompt().encode(None, clip, "a cat", "", 4)
        _, _, _, neg_space = A1111Prompt().encode(None, clip, "a cat", " ", 4)
    assert pos[0][0].shape[-1] == 96 and neg[0][0].shape == pos[0][0].shape
    assert not neg[0][0].any() and not neg[0][1]["pooled_output"].any()
    assert neg_space[0][0].any()                                   # only the exactly empty prompt


WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.mark.parametrize("name", ["a1111_prompt", "lora_embedding_hypernetwork"])
def test_demo_workflows_run(tmp_path: Path, name: str) -> None:
    from server.cli import main
    out = tmp_path / "out"
    args = ["run", str(WORKFLOWS / f"{name}.json"), "--base-dir", str(tmp_path / "base"), "--output-dir", str(out),
            "--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2", "--cpu"]
    if name == "a1111_prompt":
        args += ["--set", "10.steps=2"]
    assert main(args) == 0
    assert len(list(out.rglob("*.png"))) == 1
    models = tmp_path / "base" / "models"
    assert (models / "loras" / "easel-demo-lora.safetensors").is_file()
    assert (models / "hypernetworks" / "easel-demo-hypernet.pt").is_file()


def test_lora_found_by_its_ss_output_name_alias(env, tmp_path: Path) -> None:
    model, clip = env
    import shutil

    from safetensors.torch import load_file, save_file
    src = tmp_path / "models" / "loras" / "styles" / "easel-demo-lora.safetensors"
    save_file(load_file(str(src)), str(tmp_path / "models" / "loras" / "renamed.safetensors"),
              metadata={"ss_output_name": "fancy-style"})
    shutil.rmtree(src.parent)
    m, _, _, _ = A1111Prompt().encode(model, clip, "<lora:fancy-style:0.5> x", "", 4)
    assert {r.strength for r in m.records()} == {0.5}


def test_is_changed_follows_the_files_the_prompt_can_use(env, tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = A1111Prompt.IS_CHANGED(positive=PROMPT, negative="x")
    assert A1111Prompt.IS_CHANGED(positive=PROMPT, negative="y") == first        # files, not texts
    write_hypernetwork(models / "hypernetworks" / "other.pt", [32])                  # not named: no change
    assert A1111Prompt.IS_CHANGED(positive=PROMPT, negative="x") == first
    write_hypernetwork(models / "hypernetworks" / "easel-demo-hypernet.pt", [32], seed=99)   # replaced
    second = A1111Prompt.IS_CHANGED(positive=PROMPT, negative="x")
    assert second != first
    write_demo_embedding(models / "embeddings" / "sub", name="newemb.safetensors")   # a new embedding
    assert A1111Prompt.IS_CHANGED(positive=PROMPT, negative="x") != second
