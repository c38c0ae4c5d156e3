"""LoraLoader / LoraLoaderModelOnly nodes: files from models/loras (subfolders), warning events for
unmatched keys, strict mode, strength 0, and outputs that equal a by-hand merge."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.models.errors import ModelFileError
from diffusion.patches.patcher import ModelPatcher
from diffusion.prompts.clip import CLIP
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
    # warnings only: coverage records reach the history (test_strength_changes_rerun_only_the_side_they_touch)
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


def test_text_encoder_only_lora_on_a_model_only_load_says_so(setup, tmp_path):
    model, clip, tensors = setup
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te_")},
              str(tmp_path / "models" / "loras" / "te_only.safetensors"))
    with pytest.raises(ModelFileError, match="all 2 of its keys are for the text encoder.*LoraLoader"):
        LoraLoaderModelOnly().load_lora_model_only(model, "te_only.safetensors", 1.0)
    m, c = LoraLoader().load_lora(model, clip, "te_only.safetensors", 1.0, 1.0)
    keys = list(c.patcher.patches)
    assert m is model and len(keys) == 1 and keys[0].endswith("layers.0.self_attn.q_proj.weight")


# ------------------------------------------------------------------ through the executor and its cache


def _executor_folders(tmp_path: Path, lora_name: str, seed: int) -> ModelFolders:
    """The demo SD1 checkpoint and a rank-2 LoRA touching one UNet and one text-encoder linear."""
    from diffusion.demo.checkpoint import ensure_demo_checkpoint

    folders = ModelFolders(tmp_path)
    ensure_demo_checkpoint(folders.dirs("checkpoints")[0], "sd1")
    loras = folders.dirs("loras")[0]
    loras.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    ku, kt = f"lora_unet_{QD.replace('.', '_')}", f"lora_te_{TE.replace('.', '_')}"
    save_file({f"{ku}.lora_down.weight": torch.randn(2, 64, generator=g),
               f"{ku}.lora_up.weight": torch.randn(64, 2, generator=g),
               f"{kt}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{kt}.lora_up.weight": torch.randn(32, 2, generator=g)},
              str(loras / lora_name))
    return folders


def _lora_graph(lora_name: str, sm: float, sc: float) -> dict:
    """checkpoint -> LoraLoader (node 10) -> two CLIPTextEncode (6, 7) + KSampler (3) -> decode -> preview."""
    from diffusion.demo.checkpoint import DEMO_NAMES

    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_NAMES["sd1"]}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora_name,
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


def test_strength_changes_rerun_only_the_side_they_touch(tmp_path):
    from graph.cache import OutputCache
    from graph.events import EventLog
    from graph.executor import Executor
    from nodes.registry import build_registry

    folders = _executor_folders(tmp_path, "l.safetensors", seed=9)
    prompt = functools.partial(_lora_graph, "l.safetensors")

    log = EventLog()
    ex = Executor(build_registry(), OutputCache(), log, folders=folders)
    with use_folders(folders):
        first = ex.run(prompt(1.0, 1.0))
        assert first.ok
        # the file's key coverage goes with the prompt's history entry (RunResult.node_records)
        (cov,) = first.node_records["10"]["lora_coverage"]
        assert cov["file"] == "l.safetensors" and cov["total_keys"] == 4 and cov["matched_keys"] == 4
        assert cov["unmatched_count"] == 0 and cov["model_weights"] == 1 and cov["clip_weights"] == 1
        log.clear()
        again = ex.run(prompt(1.0, 1.0))                    # all cached: the coverage is still there
        assert again.ok and log.executed_nodes() == [] and again.node_records["10"]["lora_coverage"] == [cov]
        assert ex.run(prompt(0.5, 1.0)).ok                  # only strength_model
        ran = set(log.executed_nodes())
        assert "10" in ran and "3" in ran and not ran & {"6", "7"}
        log.clear()
        assert ex.run(prompt(0.5, 0.25)).ok                 # only strength_clip
        ran = set(log.executed_nodes())
        assert {"10", "6", "7"} <= ran


def test_model_sampling_discrete_overrides_prediction_and_zsnr(setup):
    from diffusion.sampling.sample import model_sampling, sample

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


# ------------------------------------------------------------------ end to end through the node


UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _kohya_file(unet_params: dict[str, torch.Tensor], te_params: dict[str, torch.Tensor], seed: int = 11
                ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """A kohya LoRA on every UNet attention linear (rank 2, alpha 1.5) and every text-encoder
    self-attention linear (rank 4, alpha 1.0); also returns, written out here rather than taken from
    diffusion.patches.lora.keys, which parameter each kohya module name must reach (UNet, text encoder)."""
    g = torch.Generator().manual_seed(seed)
    file: dict[str, torch.Tensor] = {}
    unet_map: dict[str, str] = {}
    te_map: dict[str, str] = {}

    def add(name: str, shape: torch.Size, rank: int, alpha: float) -> None:
        file[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=g) * 0.3
        file[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * 0.3
        file[f"{name}.alpha"] = torch.tensor(alpha)

    for key, w in unet_params.items():           # "unet.down_blocks.0.attentions.0....attn2.to_q.weight"
        path = key[len("unet."):-len(".weight")]
        if key.startswith("unet.") and "attentions" in path and path.endswith(UNET_ATTN):
            name = "lora_unet_" + path.replace(".", "_")
            add(name, w.shape, 2, 1.5)
            unet_map[name] = key
    for key, w in te_params.items():             # "l.encoder.layers.0.self_attn.q_proj.weight"
        path = key[len("l."):-len(".weight")]
        if key.startswith("l.encoder.") and path.endswith(TE_ATTN):
            name = "lora_te_text_model_" + path.replace(".", "_")
            add(name, w.shape, 4, 1.0)
            te_map[name] = key
    return file, unet_map, te_map


def _merge_by_hand(module: torch.nn.Module, file: dict[str, torch.Tensor], names: dict[str, str],
                   strength: float) -> None:
    """W <- W + strength * (alpha / rank) * up @ down for each module named in `names`."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, key in names.items():
            down, up = file[f"{name}.lora_down.weight"], file[f"{name}.lora_up.weight"]
            alpha = float(file[f"{name}.alpha"])
            params[key] += strength * (alpha / down.shape[0]) * (up @ down)


def _unet_out(dm: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, dm.context_dim, generator=g)
    with torch.no_grad():
        return dm.apply_model(x, torch.tensor([400.0]), ctx)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((got - want).abs().max()) <= rel * max(1.0, float(want.abs().max()))


def test_lora_loader_outputs_equal_by_hand_merged_copies(setup, tmp_path):
    import copy

    from nodes.builtin.conditioning import CLIPTextEncode

    model, clip, _ = setup
    sm, sc = 0.7, -0.4
    file, unet_map, te_map = _kohya_file(dict(model.model.named_parameters()),
                                         dict(clip.patcher.model.named_parameters()))
    assert len(unet_map) == 32 and len(te_map) == 8            # all attention linears of the tiny sd1 model
    save_file(file, str(tmp_path / "models" / "loras" / "e2e.safetensors"))
    text = "a photo of a cat"
    encode = CLIPTextEncode()
    ref_unet = _unet_out(model.model)
    ref_cond = encode.encode(clip, text)[0][0][0]
    hand_unet = copy.deepcopy(model.model)
    _merge_by_hand(hand_unet, file, unet_map, sm)
    hand_te = copy.deepcopy(clip.patcher.model)
    _merge_by_hand(hand_te, file, te_map, sc)
    hand_clip = CLIP({k: getattr(hand_te, k) for k in clip.keys}, clip.family, "cpu", "cpu")

    rt, seen = events()
    with running(rt):
        m2, c2 = LoraLoader().load_lora(model, clip, "e2e.safetensors", sm, sc)
    assert seen == []
    assert m2 is not model and c2 is not clip
    assert {r.key for r in m2.records()} == set(unet_map.values())
    assert {r.key for r in c2.patcher.records()} == set(te_map.values())
    try:
        # (a) the UNet of the returned MODEL, patched the way a sampler patches it
        m2.patch_model()
        got = _unet_out(m2.model)
        want = _unet_out(hand_unet)
        assert _close(got, want), float((got - want).abs().max())
        assert float((got - ref_unet).abs().max()) > 1e-3          # the LoRA did change the output
        m2.unpatch_model()
        assert torch.equal(_unet_out(model.model), ref_unet)      # originals back, bit-exact
        # (b) the text encoder of the returned CLIP, through CLIPTextEncode (it patches the encoder)
        got_cond = encode.encode(c2, text)[0][0][0]
        want_cond = encode.encode(hand_clip, text)[0][0][0]
        assert _close(got_cond, want_cond), float((got_cond - want_cond).abs().max())
        assert float((got_cond - ref_cond).abs().max()) > 1e-3
    finally:
        m2.unpatch_model()
        c2.patcher.unpatch_model()
    assert torch.equal(encode.encode(clip, text)[0][0][0], ref_cond)


def test_strength_change_on_one_side_leaves_the_other_side_value_and_weights_alone(tmp_path, monkeypatch):
    """Changing only strength_clip must not re-patch the UNet: the sampler gets a MODEL with the same
    fingerprint and the UNet weights it patched in the first run are not rewritten. Changing only
    strength_model leaves the CLIP value's fingerprint unchanged (and its encodings cached)."""
    from graph.cache import OutputCache
    from graph.executor import Executor
    from nodes.builtin.sampling import KSampler
    from nodes.registry import build_registry

    folders = _executor_folders(tmp_path, "two_sides.safetensors", seed=12)
    prompt = functools.partial(_lora_graph, "two_sides.safetensors")

    sampled: list[ModelPatcher] = []             # the MODEL each KSampler call received
    lora_out: list[tuple[ModelPatcher, CLIP]] = []   # what each LoraLoader call returned
    orig_sample, orig_load = KSampler.sample, LoraLoader.load_lora

    def sample_spy(self, model, *args, **kwargs):
        sampled.append(model)
        return orig_sample(self, model, *args, **kwargs)

    def load_spy(self, *args, **kwargs):
        out = orig_load(self, *args, **kwargs)
        lora_out.append(out)
        return out

    monkeypatch.setattr(KSampler, "sample", sample_spy)
    monkeypatch.setattr(LoraLoader, "load_lora", load_spy)

    ex = Executor(build_registry(), OutputCache(), folders=folders)
    with use_folders(folders):
        r1 = ex.run(prompt(0.7, -0.4))
        assert r1.ok, r1.error
        assert len(sampled) == 1
        m1 = sampled[0]
        key = next(k for k in m1.patches if k.startswith("unet."))
        weight = dict(m1.model.named_parameters())[key]
        try:
            # the sampler left the UNet patched; mark the patched weight in place: any re-patch of this
            # parameter (a new tensor or a rewrite into the same storage) recomputes it and drops the mark
            assert m1.is_patched()
            with torch.no_grad():
                weight.data[0, 0] += 1000.0
            marked = weight.detach().clone()
            ptr = weight.data_ptr()

            r2 = ex.run(prompt(0.7, 0.25))           # only strength_clip changed
            assert r2.ok, r2.error
            assert {"10", "6", "7", "3"} <= set(r2.executed) and "4" in r2.cached
            assert len(sampled) == 2
            m2 = sampled[1]
            assert m2.patch_fingerprint() == m1.patch_fingerprint()
            assert weight.data_ptr() == ptr
            assert torch.equal(weight.detach(), marked), "the UNet was re-patched though only strength_clip changed"
            clip2 = lora_out[-1][1]
            assert clip2.patch_fingerprint() != lora_out[0][1].patch_fingerprint()

            r3 = ex.run(prompt(0.3, 0.25))           # only strength_model changed
            assert r3.ok, r3.error
            assert "10" in r3.executed and "3" in r3.executed and not {"6", "7"} & set(r3.executed)
            assert lora_out[-1][1].patch_fingerprint() == clip2.patch_fingerprint()
            assert len(sampled) == 3
            assert sampled[2].patch_fingerprint() != m2.patch_fingerprint()
            # the check above can fail: a new strength re-patches the weight, and the mark is gone
            assert not torch.equal(weight.detach(), marked)
        finally:
            m1.unpatch_model()
