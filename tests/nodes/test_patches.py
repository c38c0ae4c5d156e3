"""LoraLoader / LoraLoaderModelOnly nodes: files from models/loras (subfolders), warning events for
unmatched keys, strict mode, strength 0, and outputs that equal a by-hand merge."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.clip import CLIP
from diffusion.demo import tiny_components
from diffusion.errors import ModelFileError
from diffusion.model import DiffusionModel
from diffusion.patcher import ModelPatcher
from graph.runtime import NodeRuntime, running
from nodes.builtin.patches import NODE_CLASS_MAPPINGS, LoraLoader, LoraLoaderModelOnly
from nodes.folders import ModelFolders, use_folders

torch.set_num_threads(2)
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
QD = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"   # the demo checkpoint's first attention (64 wide)
TE = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture()
def setup(tmp_path: Path):
    c = tiny_components("sd1", seed=7)
    model = ModelPatcher(DiffusionModel(c.unet, c.family, "eps"), "cpu", "cpu")
    clip = CLIP(c.text_encoders, c.family, "cpu", "cpu")
    g = torch.Generator().manual_seed(8)
    tensors = {
        f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.randn(2, 32, generator=g),
        f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.randn(32, 2, generator=g),
        f"lora_unet_{Q.replace('.', '_')}.alpha": torch.tensor(1.0),
        f"lora_te_{TE.replace('.', '_')}.lora_down.weight": torch.randn(2, 32, generator=g),
        f"lora_te_{TE.replace('.', '_')}.lora_up.weight": torch.randn(32, 2, generator=g),
    }
    sub = tmp_path / "models" / "loras" / "styles"
    sub.mkdir(parents=True)
    save_file(tensors, str(sub / "good.safetensors"))
    extra = dict(tensors)
    extra["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 4)
    save_file(extra, str(tmp_path / "models" / "loras" / "extra.safetensors"))
    folders = ModelFolders(tmp_path)
    with use_folders(folders):
        yield model, clip, tensors


def events() -> tuple[NodeRuntime, list[tuple[str, dict]]]:
    seen: list[tuple[str, dict]] = []
    # warnings only: coverage records (node_record events) are checked separately
    return NodeRuntime(node_id="7", emit=lambda e, d: seen.append((e, d)) if e == "warning" else None), seen


def test_registered_and_lists_subfolder_files(setup):
    assert set(NODE_CLASS_MAPPINGS) == {"LoraLoader", "LoraLoaderModelOnly", "ModelSamplingDiscrete"}
    names = LoraLoader.INPUT_TYPES()["required"]["lora_name"][0]
    assert names == ["extra.safetensors", "styles/good.safetensors"]
    req = list(LoraLoader.INPUT_TYPES()["required"])
    assert req == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert list(LoraLoaderModelOnly.INPUT_TYPES()["required"]) == ["model", "lora_name", "strength_model"]


def test_lora_loader_merges_like_by_hand(setup):
    model, clip, t = setup
    rt, seen = events()
    with running(rt):
        m2, c2 = LoraLoader().load_lora(model, clip, "styles/good.safetensors", 0.75, -1.25)
    assert seen == []
    params = dict(model.model.named_parameters())
    w0 = params[f"unet.{Q}.weight"].detach().clone()
    m2.patch_model()
    k = f"lora_unet_{Q.replace('.', '_')}"
    want = w0 + 0.75 * 0.5 * (t[f"{k}.lora_up.weight"] @ t[f"{k}.lora_down.weight"])
    assert (params[f"unet.{Q}.weight"] - want).abs().max() <= 1e-6
    m2.unpatch_model()
    assert torch.equal(params[f"unet.{Q}.weight"], w0)
    cparams = dict(clip.patcher.model.named_parameters())
    te_key = "l." + TE[len("text_model."):] + ".weight"
    te0 = cparams[te_key].detach().clone()
    c2.patcher.patch_model()
    kt = f"lora_te_{TE.replace('.', '_')}"
    assert (cparams[te_key] - (te0 - 1.25 * t[f"{kt}.lora_up.weight"] @ t[f"{kt}.lora_down.weight"])).abs().max() <= 1e-6
    c2.patcher.unpatch_model()


def test_unmatched_keys_warn_and_strict_fails(setup):
    model, clip, _ = setup
    rt, seen = events()
    with running(rt):
        LoraLoader().load_lora(model, clip, "extra.safetensors", 1.0, 1.0)
    assert len(seen) == 1
    event, data = seen[0]
    assert event == "warning" and data["node"] == "7"
    assert "extra.safetensors" in data["message"] and data["unmatched_count"] == 1
    assert data["unmatched_keys"] == ["lora_unet_not_a_module.lora_down.weight"]
    with running(rt), pytest.raises(ModelFileError, match="strict"):
        LoraLoader().load_lora(model, clip, "extra.safetensors", 1.0, 1.0, strict=True)


def test_strength_zero_returns_inputs_and_model_only(setup):
    model, clip, _ = setup
    m, c = LoraLoader().load_lora(model, clip, "does-not-matter.safetensors", 0.0, 0.0)
    assert m is model and c is clip
    (m2,) = LoraLoaderModelOnly().load_lora_model_only(model, "styles/good.safetensors", 1.0)
    assert m2 is not model and len(m2.patches) == 1
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        LoraLoaderModelOnly().load_lora_model_only(model, "missing.safetensors", 1.0)


# ------------------------------------------------------------------ through the executor and its cache


def test_strength_changes_rerun_only_the_side_they_touch(tmp_path):
    from diffusion.clip import CLIP as ClipValue
    from diffusion.demo import DEMO_NAMES, ensure_demo_checkpoint
    from graph.cache import OutputCache
    from graph.events import EventLog
    from graph.executor import Executor
    from nodes.registry import build_registry

    if not hasattr(ClipValue, "patch_fingerprint"):
        pytest.skip("diffusion.clip.CLIP.patch_fingerprint() not there yet (text work)")
    folders = ModelFolders(tmp_path)
    ensure_demo_checkpoint(folders.dirs("checkpoints")[0], "sd1")
    loras = folders.dirs("loras")[0]
    loras.mkdir(parents=True)
    g = torch.Generator().manual_seed(9)
    save_file({f"lora_unet_{QD.replace('.', '_')}.lora_down.weight": torch.randn(2, 64, generator=g),
               f"lora_unet_{QD.replace('.', '_')}.lora_up.weight": torch.randn(64, 2, generator=g),
               f"lora_te_{TE.replace('.', '_')}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"lora_te_{TE.replace('.', '_')}.lora_up.weight": torch.randn(32, 2, generator=g)},
              str(loras / "l.safetensors"))

    def prompt(sm: float, sc: float) -> dict:
        return {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_NAMES["sd1"]}},
            "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "l.safetensors",
                                                          "strength_model": sm, "strength_clip": sc}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["10", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler",
                                                        "scheduler": "normal", "denoise": 1.0, "model": ["10", 0],
                                                        "positive": ["6", 0], "negative": ["7", 0],
                                                        "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        }

    log = EventLog()
    ex = Executor(build_registry(), OutputCache(), log, folders=folders)
    with use_folders(folders):
        assert ex.run(prompt(1.0, 1.0)).ok
        log.clear()
        assert ex.run(prompt(0.5, 1.0)).ok                  # only strength_model
        ran = set(log.executed_nodes())
        assert "10" in ran and "3" in ran and not ran & {"6", "7"}
        log.clear()
        assert ex.run(prompt(0.5, 0.25)).ok                 # only strength_clip
        ran = set(log.executed_nodes())
        assert {"10", "6", "7"} <= ran


def test_model_sampling_discrete_overrides_prediction_and_zsnr(setup):
    from diffusion.sample import model_sampling, sample

    model = setup[0]
    node = NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]()
    (v_model,) = node.patch(model, "v_prediction", True)
    base, over = model_sampling(model), model_sampling(v_model)
    assert base.prediction == "eps" and over.prediction == "v"
    assert float(base.sigmas[-1]) == pytest.approx(14.6146, abs=1e-3)
    assert float(over.sigmas[-1]) == pytest.approx(4518.76, abs=0.01)
    assert v_model.patch_fingerprint() != model.patch_fingerprint()
    assert "model_sampling" not in model.model_options             # the input is untouched
    (eps_plain,) = node.patch(model, "eps", False)
    assert torch.equal(model_sampling(eps_plain).sigmas, base.sigmas)
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 32, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    a = sample(model, 1, 2, 5.0, "euler", "normal", cond, cond, latent)["samples"]
    b = sample(eps_plain, 1, 2, 5.0, "euler", "normal", cond, cond, latent)["samples"]
    c = sample(v_model, 1, 2, 5.0, "euler", "normal", cond, cond, latent)["samples"]
    assert torch.equal(a, b) and not torch.allclose(a, c)
