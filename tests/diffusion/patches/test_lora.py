"""LoRA files end to end: UNet and text-encoder outputs vs by-hand merged copies, SDXL and diffusers
spellings, coverage, strict mode, wrong-family errors, file and adapter caching."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.models.errors import ModelFileError
from diffusion.patches.lora.load import load_lora
from diffusion.patches.patcher import ModelPatcher
from diffusion.prompts.clip import CLIP

torch.set_num_threads(2)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def build(family: str, seed: int = 3) -> tuple[ModelPatcher, CLIP]:
    c = tiny_components(family, seed=seed)
    model = ModelPatcher(DiffusionModel(c.unet, c.family, "eps"), "cpu", "cpu")
    return model, CLIP(c.text_encoders, c.family, "cpu", "cpu")


def kohya_lora(model: ModelPatcher, clip: CLIP | None, rank: int = 2, alpha: float = 1.0, seed: int = 0,
               unet_style: str = "diffusers") -> dict[str, torch.Tensor]:
    """A kohya-named rank-`rank` LoRA on every UNet attention linear and every TE attention/MLP."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    from diffusion.patches.lora.keys import _block_layout, diffusers_to_ldm, module_paths
    params = dict(model.model.named_parameters())
    paths = [p[len("unet."):] for p in module_paths(params) if p.startswith("unet.")]
    layout = _block_layout(paths)

    def add(name: str, shape: torch.Size) -> None:
        n_in = int(torch.tensor(shape[1:]).prod())
        out[f"{name}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) * 0.2
        out[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * 0.2
        out[f"{name}.alpha"] = torch.tensor(alpha)

    for p in paths:
        if "attentions" in p and p.endswith(UNET_TARGETS):
            name = diffusers_to_ldm(p, layout) if unet_style == "ldm" else p
            add("lora_unet_" + name.replace(".", "_"), params[f"unet.{p}.weight"].shape)
    if clip is not None:
        prefix = {"l": "lora_te1_" if "g" in clip.keys else "lora_te_", "h": "lora_te_", "g": "lora_te2_"}
        for k, enc in clip.encoders.items():
            for n, w in enc.named_parameters():
                if n.endswith(".weight") and n[: -len(".weight")].endswith(TE_TARGETS):
                    t = n if n.startswith("text_model.") else "text_model." + n
                    add(prefix[k] + t[: -len(".weight")].replace(".", "_"), w.shape)
    return out


def merge_by_hand(module: torch.nn.Module, file: dict[str, torch.Tensor], kmap: dict[str, str], strength: float) -> None:
    """W += m * alpha / r * up @ down for each module of a kohya file (written out here)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, down in file.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[: -len(".lora_down.weight")]
            if name not in kmap:
                continue
            up, alpha = file[f"{name}.lora_up.weight"], float(file[f"{name}.alpha"])
            w = params[kmap[name] + ".weight"]
            w += strength * alpha / down.shape[0] * (up @ down).reshape(w.shape)


def unet_out(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.context_dim, generator=g)
    kw = {}
    if model.family.is_sdxl:
        kw = dict(text_embeds=torch.randn(1, model.pooled_dim, generator=g), time_ids=torch.randn(1, 6, generator=g))
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([400.0]), ctx, **kw)


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "l.safetensors",
          metadata: dict[str, str] | None = None) -> Path:
    f = tmp_path / name
    save_file(tensors, str(f), metadata=metadata)
    return f


@pytest.mark.parametrize("family,unet_style", [("sd1", "diffusers"), ("sdxl", "ldm"), ("sd2", "diffusers")])
def test_unet_and_text_encoder_match_by_hand_merged_copies(tmp_path, family, unet_style):
    from diffusion.patches.lora.keys import clip_key_map, unet_key_map
    model, clip = build(family)
    file = kohya_lora(model, clip, alpha=1.5, unet_style=unet_style)
    path = write(tmp_path, file)
    ref_unet = unet_out(model.model)
    ref_cond = clip.encode("a photo of a cat")[0][0]
    m2, c2, cov = load_lora(model, clip, path, 0.8, -0.6)
    assert cov.unmatched == () and cov.matched_keys == len(file)
    assert cov.model_weights > 0 and cov.clip_weights > 0
    # a copy merged by hand
    hand_model = copy.deepcopy(model.model)
    merge_by_hand(hand_model, file, unet_key_map(dict(hand_model.named_parameters())), 0.8)
    hand_clip_mod = copy.deepcopy(clip.patcher.model)
    merge_by_hand(hand_clip_mod, file, clip_key_map(dict(hand_clip_mod.named_parameters())), -0.6)
    hand_clip = CLIP({k: getattr(hand_clip_mod, k) for k in clip.keys}, clip.family, "cpu", "cpu")

    m2.patch_model()
    got = unet_out(m2.model)
    m2.unpatch_model()
    assert (got - unet_out(hand_model)).abs().max() <= 1e-5
    assert (got - ref_unet).abs().max() > 1e-4
    got_cond = c2.encode("a photo of a cat")[0][0]
    assert (got_cond - hand_clip.encode("a photo of a cat")[0][0]).abs().max() <= 1e-5
    assert (got_cond - ref_cond).abs().max() > 1e-4
    c2.patcher.unpatch_model()
    assert torch.equal(clip.encode("a photo of a cat")[0][0], ref_cond)
    assert torch.equal(unet_out(model.model), ref_unet)


def test_diffusers_peft_and_processor_spellings(tmp_path):
    model, clip = build("sd1")
    g = torch.Generator().manual_seed(5)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    o = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    ff = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    te = "text_model.encoder.layers.1.self_attn.v_proj"
    params = dict(model.model.named_parameters())
    t = {
        f"unet.{q}.lora_A.weight": torch.randn(2, 32, generator=g), f"unet.{q}.lora_B.weight": torch.randn(32, 2, generator=g),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": torch.randn(2, 32, generator=g),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": torch.randn(32, 2, generator=g),
        f"unet.{ff}.lora.down.weight": torch.randn(2, params[f"unet.{ff}.weight"].shape[1], generator=g),
        f"unet.{ff}.lora.up.weight": torch.randn(64, 2, generator=g),
        f"text_encoder.{te}.lora_linear_layer.down.weight": torch.randn(2, 32, generator=g),
        f"text_encoder.{te}.lora_linear_layer.up.weight": torch.randn(32, 2, generator=g),
    }
    path = write(tmp_path, t)
    te_params = dict(clip.patcher.model.named_parameters())
    w0 = {p: params[f"unet.{p}.weight"].detach().clone() for p in (q, o, ff)}
    te_w = "l." + te.removeprefix("text_model.") + ".weight"                # the CLIP patcher's name
    w_te = te_params[te_w].detach().clone()
    m2, c2, cov = load_lora(model, clip, path, 1.0, 1.0)
    assert cov.unmatched == () and cov.model_weights == 3 and cov.clip_weights == 1
    m2.patch_model()
    down = t["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight"]
    up = t["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"]
    assert (params[f"unet.{o}.weight"] - (w0[o] + up @ down)).abs().max() <= 1e-6
    # PEFT lora_A = down, lora_B = up; diffusers lora.down / lora.up; no alpha in the file -> s = 1
    want_q = w0[q] + t[f"unet.{q}.lora_B.weight"] @ t[f"unet.{q}.lora_A.weight"]
    assert (params[f"unet.{q}.weight"] - want_q).abs().max() <= 1e-6
    want_ff = w0[ff] + t[f"unet.{ff}.lora.up.weight"] @ t[f"unet.{ff}.lora.down.weight"]
    assert (params[f"unet.{ff}.weight"] - want_ff).abs().max() <= 1e-6
    m2.unpatch_model()
    assert all(torch.equal(params[f"unet.{p}.weight"], w0[p]) for p in (q, o, ff))
    # text encoder: lora_linear_layer.down / .up
    c2.patcher.patch_model()
    want_te = w_te + t[f"text_encoder.{te}.lora_linear_layer.up.weight"] @ t[f"text_encoder.{te}.lora_linear_layer.down.weight"]
    assert (te_params[te_w] - want_te).abs().max() <= 1e-6
    c2.patcher.unpatch_model()
    assert torch.equal(te_params[te_w], w_te)


def test_unmatched_keys_are_reported_and_strict_refuses(tmp_path):
    model, clip = build("sd1")
    file = kohya_lora(model, clip)
    file["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(2, 4)
    file["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(4, 2)
    file["something_odd"] = torch.zeros(1)
    path = write(tmp_path, file)
    _, _, cov = load_lora(model, clip, path, 1.0, 1.0)
    assert sorted(cov.unmatched_keys) == ["lora_unet_no_such_module.lora_down.weight",
                                          "lora_unet_no_such_module.lora_up.weight", "something_odd"]
    assert cov.matched_keys == len(file) - 3
    assert cov.as_dict()["unmatched_count"] == 3
    with pytest.raises(ModelFileError, match="strict: 3 of"):
        load_lora(model, clip, path, 1.0, 1.0, strict=True)


def test_shape_mismatch_is_reported_with_the_reason(tmp_path):
    model, _ = build("sd1")
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = write(tmp_path, {f"{k}.lora_down.weight": torch.zeros(2, 768), f"{k}.lora_up.weight": torch.zeros(32, 2),
                            "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
                            "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)})
    _, _, cov = load_lora(model, None, path, 1.0)
    assert cov.matched_keys == 2
    assert all("shape" in reason for _, reason in cov.unmatched)


def test_factors_that_do_not_multiply_out_are_refused_at_load(tmp_path):
    model, _ = build("sd1")
    blk = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"     # to_q/k/v/out: [32, 32]
    g = torch.Generator().manual_seed(4)
    r = (lambda *shape: torch.randn(*shape, generator=g))
    path = write(tmp_path, {
        f"{blk}to_q.lora_up.weight": r(32, 4), f"{blk}to_q.lora_down.weight": r(2, 32),    # ranks 4 and 2
        f"{blk}to_k.lora_up.weight": r(64, 2), f"{blk}to_k.lora_down.weight": r(2, 16),    # [64, 16]: 1024 numbers too
        f"{blk}to_v.hada_w1_a": r(32, 2), f"{blk}to_v.hada_w1_b": r(3, 32),               # LoHa ranks 2 and 3
        f"{blk}to_v.hada_w2_a": r(32, 2), f"{blk}to_v.hada_w2_b": r(2, 32),
        f"{blk}to_out_0.lora_up.weight": r(32, 2), f"{blk}to_out_0.lora_down.weight": r(2, 32)})
    m, _, cov = load_lora(model, None, path, 1.0)
    reasons = dict(cov.unmatched)
    assert cov.matched_keys == 2 and len(reasons) == 8
    assert "disagree on the rank (4 vs 2)" in reasons[f"{blk}to_q.lora_up.weight"]
    assert "delta has shape [64, 16], the weight [32, 32]" in reasons[f"{blk}to_k.lora_down.weight"]
    assert "LoHa factors" in reasons[f"{blk}to_v.hada_w1_b"] and "[32, 32]" in reasons[f"{blk}to_v.hada_w1_b"]
    m.patch_model()              # what was accepted patches cleanly: the sampler never sees the bad factors
    m.unpatch_model()
    only_bad = write(tmp_path, {f"{blk}to_q.lora_up.weight": r(32, 4), f"{blk}to_q.lora_down.weight": r(2, 32)},
                     "bad.safetensors")
    with pytest.raises(ModelFileError, match=r"bad\.safetensors.*to_q.*rank \(4 vs 2\)"):
        load_lora(model, None, only_bad, 1.0)


def test_model_only_skips_text_encoder_keys_without_reporting_them(tmp_path):
    model, clip = build("sd1")
    file = kohya_lora(model, clip)
    path = write(tmp_path, file)
    m2, c2, cov = load_lora(model, None, path, 1.0)
    assert c2 is None and cov.unmatched == () and cov.skipped_text_encoder > 0


def test_wrong_family_lora_names_the_family(tmp_path):
    sdxl_model, sdxl_clip = build("sdxl")
    sdxl_file = kohya_lora(sdxl_model, sdxl_clip, unet_style="ldm")
    path = write(tmp_path, sdxl_file, "xl.safetensors")
    sd1_model, sd1_clip = build("sd1")
    # the tiny widths coincide in places, so part of it applies; the rest is reported with the family
    _, _, cov = load_lora(sd1_model, sd1_clip, path, 1.0, 1.0)
    assert cov.unmatched and "LoRA for sdxl" in (cov.family_hint or "")
    # nothing of it fits: an error naming the family
    only_xl = {k: v for k, v in sdxl_file.items() if k.startswith(("lora_te2_", "lora_unet_input_blocks"))}
    path2 = write(tmp_path, only_xl, "xl2.safetensors")
    with pytest.raises(ModelFileError, match="sd1 model.*LoRA for sdxl"):
        load_lora(sd1_model, sd1_clip, path2, 1.0, 1.0)
    meta = write(tmp_path, {"lora_unet_x_y.lora_down.weight": torch.zeros(1, 1)}, "m.safetensors",
                 {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ModelFileError, match="sdxl.*ss_base_model_version"):
        load_lora(sd1_model, None, meta, 1.0)
    # kohya's SD1 marker on an SDXL model: partly applied (widths coincide), the warning names sd1
    sd1_file = kohya_lora(sd1_model, sd1_clip)
    marked = write(tmp_path, sd1_file, "sd1.safetensors", {"ss_base_model_version": "sd_v1"})
    _, _, cov = load_lora(sdxl_model, sdxl_clip, marked, 1.0, 1.0)
    assert cov.unmatched and "LoRA for sd1 (metadata ss_base_model_version=sd_v1)" in (cov.family_hint or "")


def test_strength_zero_side_is_returned_unchanged_and_cache_keeps_fingerprints(tmp_path):
    model, clip = build("sd1")
    path = write(tmp_path, kohya_lora(model, clip))
    m0, c0, _ = load_lora(model, clip, path, 0.0, 1.0)
    assert m0 is model and c0 is not clip
    m1, c1, _ = load_lora(model, clip, path, 1.0, 1.0)
    m2, c2, _ = load_lora(model, clip, path, 0.5, 1.0)     # only strength_model changed
    assert c1.patcher.patch_fingerprint() == c2.patcher.patch_fingerprint()
    assert m1.patch_fingerprint() != m2.patch_fingerprint()
    m3, c3, _ = load_lora(model, clip, path, 0.5, 0.7)     # only strength_clip changed
    assert m3.patch_fingerprint() == m2.patch_fingerprint()
    assert c3.patcher.patch_fingerprint() != c2.patcher.patch_fingerprint()
    # a rewritten file (new mtime) is read again and gives new records
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    m4, _, _ = load_lora(model, clip, path, 0.5, 0.7)
    assert m4.patch_fingerprint() != m3.patch_fingerprint()


def test_unreadable_file_is_a_model_file_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    model, _ = build("sd1")
    with pytest.raises(ModelFileError, match=r"bad\.safetensors.*a text file"):
        load_lora(model, None, bad, 1.0)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.safetensors.*empty \(0 bytes\)"):
        load_lora(model, None, empty, 1.0)
    # the reader follows the content: a safetensors LoRA saved as .pt loads
    renamed = tmp_path / "renamed.pt"
    renamed.write_bytes(write(tmp_path, kohya_lora(model, None)).read_bytes())
    _, _, cov = load_lora(model, None, renamed, 1.0)
    assert cov.matched_keys == cov.total_keys > 0


def test_sdxl_diffusers_names_reach_both_text_encoders(tmp_path):
    model, clip = build("sdxl")
    g = torch.Generator().manual_seed(6)
    t = {}
    for prefix, width in (("text_encoder.", 32), ("text_encoder_2.", 64)):
        t[f"{prefix}text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(2, width, generator=g)
        t[f"{prefix}text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(width, 2, generator=g)
    up = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    t[f"{up}.lora_A.weight"] = torch.randn(2, 96, generator=g)
    t[f"{up}.lora_B.weight"] = torch.randn(64, 2, generator=g)
    _, c2, cov = load_lora(model, clip, write(tmp_path, t), 1.0, 1.0)
    assert cov.unmatched == () and cov.model_weights == 1 and cov.clip_weights == 2
    assert set(c2.patcher.patches) == {"l.encoder.layers.0.self_attn.q_proj.weight",
                                       "g.text_model.encoder.layers.0.self_attn.q_proj.weight"}
