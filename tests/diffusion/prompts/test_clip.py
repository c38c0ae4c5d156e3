"""The CLIP value on tiny seeded text encoders: hidden-state choice, weights, chunks, SDXL, embeddings."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.tokenizer import BOS, EOS, CLIPTokenizer
from diffusion.prompts.clip import CLIP, apply_weights

torch.set_num_threads(2)


@dataclass(frozen=True)
class Emb:
    """Stands in for diffusion.patches.embeddings.Embedding (contracts: name, vectors by encoder key)."""

    name: str
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def _components(family: str):
    return tiny_components(family, seed=1)


def make_clip(family: str, **kw: object) -> CLIP:
    """A CLIP on the shared seeded encoders of `family` (tests that patch weights use clones)."""
    c = _components(family)
    return CLIP(c.text_encoders, c.family, "cpu", "cpu", **kw)


@pytest.fixture(scope="module")
def sd1() -> CLIP:
    return make_clip("sd1")


@pytest.fixture(scope="module")
def sdxl() -> CLIP:
    return make_clip("sdxl")


def ids_of(text: str, pad: int = EOS) -> torch.Tensor:
    ids = CLIPTokenizer().encode(text)
    row = [BOS, *ids, EOS] + [pad] * (75 - len(ids))
    return torch.tensor([row])


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor):
    return model(input_ids=ids, output_hidden_states=True)


def test_tokenize_reference_prompt(sd1: CLIP) -> None:
    tokens = sd1.tokenize("a photo of a cat")
    assert list(tokens) == ["l"]
    assert [t for t, _ in tokens["l"][0]] == [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70


def test_sd1_default_is_last_layer_with_layer_norm(sd1: CLIP) -> None:
    cond = sd1.encode("a photo of a cat")
    z, extras = cond[0]
    out = run(sd1.encoders["l"], ids_of("a photo of a cat"))
    assert z.shape == (1, 77, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z, out.last_hidden_state, rtol=0, atol=1e-6)
    # pooled: final-LayerNorm state at the first EOS (position 6)
    torch.testing.assert_close(extras["pooled_output"], out.last_hidden_state[:, 6], rtol=0, atol=1e-6)


def test_clip_skip_picks_hidden_state_and_clone_is_independent(sd1: CLIP) -> None:
    model = sd1.encoders["l"]
    out = run(model, ids_of("a cat"))
    skipped = sd1.clone()
    skipped.clip_layer(-2)
    assert sd1.layer_idx is None
    z2 = skipped.encode("a cat")[0][0]
    expected = model.final_layer_norm(out.hidden_states[-2])         # SD1: LayerNorm on the chosen layer
    torch.testing.assert_close(z2, expected, rtol=0, atol=1e-6)
    z1 = sd1.encode("a cat")[0][0]
    assert (z1 - z2).abs().max() > 1e-3
    last = sd1.clone()
    last.clip_layer(-1)
    torch.testing.assert_close(last.encode("a cat")[0][0], z1, rtol=0, atol=1e-6)
    deep = sd1.clone()
    deep.clip_layer(-24)                                             # beyond 2 layers -> last layer
    torch.testing.assert_close(deep.encode("a cat")[0][0], z1, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        deep.clip_layer(0)


def test_sd2_defaults_to_penultimate_with_layer_norm() -> None:
    clip = make_clip("sd2")
    assert clip.tokenize("a cat")["h"][0][4][0] == 0                  # OpenCLIP pads with 0
    z = clip.encode("a cat")[0][0]
    model = clip.encoders["h"]
    out = run(model, ids_of("a cat", pad=0))
    torch.testing.assert_close(z, model.final_layer_norm(out.hidden_states[-2]), rtol=0, atol=1e-6)


def test_comfy_weights_interpolate_from_the_empty_prompt(sd1: CLIP) -> None:
    z = sd1.encode("a (cat:1.5) photo")[0][0]
    model = sd1.encoders["l"]
    plain = run(model, ids_of("a cat photo")).last_hidden_state
    empty = run(model, ids_of("")).last_hidden_state
    expected = plain.clone()
    expected[:, 2] = (plain[:, 2] - empty[:, 2]) * 1.5 + empty[:, 2]   # "cat" is token 2 (after BOS, a)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-5)
    # the unweighted positions are exactly the plain encoding
    assert torch.equal(z[:, [0, 1, 3, 4, 20]], plain[:, [0, 1, 3, 4, 20]])
    # pooled is not affected by weights
    pooled_w = sd1.encode("a (cat:1.5) photo")[0][1]["pooled_output"]
    pooled = sd1.encode("a cat photo")[0][1]["pooled_output"]
    torch.testing.assert_close(pooled_w, pooled, rtol=0, atol=1e-6)


def test_apply_weights_a1111_keeps_each_chunk_mean() -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 77, 8) + 0.5
    w = torch.ones(2, 77)
    w[0, 3] = 1.4
    w[1, 5:9] = 0.7
    out = apply_weights(z, w, "a1111")
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))
    ratio = out[0, 3] / out[0, 4] / (z[0, 3] / z[0, 4])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.4), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="empty prompt"):
        apply_weights(z, w, "comfy")


def test_a1111_weighting_through_encode_token_chunks(sd1: CLIP) -> None:
    tokens = sd1.tokenize("a (cat:1.5) photo")
    z, _ = sd1.encode_token_chunks(tokens, weighting="a1111")
    plain = run(sd1.encoders["l"], ids_of("a cat photo")).last_hidden_state
    w = torch.ones(1, 77, 1)
    w[0, 2] = 1.5
    expected = plain * w * (plain.mean() / (plain * w).mean())
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_long_prompt_is_encoded_in_77_token_chunks(sd1: CLIP) -> None:
    text = "word " * 70 + ", long tail of nine words here to push over"
    tokens = sd1.tokenize(text)
    assert len(tokens["l"]) == 2
    z = sd1.encode(text)[0][0]
    assert z.shape == (1, 154, 32)
    model = sd1.encoders["l"]
    for k, chunk in enumerate(tokens["l"]):
        ids = torch.tensor([[t for t, _ in chunk]])
        torch.testing.assert_close(z[:, 77 * k:77 * (k + 1)], run(model, ids).last_hidden_state, rtol=0, atol=1e-6)
    # pooled from the first chunk
    first = run(model, torch.tensor([[t for t, _ in tokens["l"][0]]])).last_hidden_state[:, 76]
    torch.testing.assert_close(sd1.encode(text)[0][1]["pooled_output"], first, rtol=0, atol=1e-6)


def test_sdxl_concatenates_both_encoders_and_pools_bigg(sdxl: CLIP) -> None:
    tokens = sdxl.tokenize("a photo of a cat")
    assert sorted(tokens) == ["g", "l"]
    assert tokens["l"][0][7][0] == EOS and tokens["g"][0][7][0] == 0
    cond, pooled = sdxl.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, 32 + 64) and pooled.shape == (1, 64)
    l_out = run(sdxl.encoders["l"], ids_of("a photo of a cat"))
    g_out = run(sdxl.encoders["g"], ids_of("a photo of a cat", pad=0))
    # penultimate layer, no final LayerNorm, l then g on channels
    torch.testing.assert_close(cond[..., :32], l_out.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[..., 32:], g_out.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, g_out.text_embeds, rtol=0, atol=1e-5)   # projected EOS state
    skip = sdxl.clone()
    skip.clip_layer(-1)
    z = skip.encode("a photo of a cat")[0][0]
    torch.testing.assert_close(z[..., 32:], g_out.hidden_states[-1], rtol=0, atol=1e-6)   # still no LayerNorm


def test_sdxl_pair_pads_the_shorter_text(sdxl: CLIP) -> None:
    tokens = sdxl.tokenize_pair("a cat", "word " * 80)
    assert len(tokens["l"]) == len(tokens["g"]) == 2
    assert [t for t, _ in tokens["g"][1]][:3] == [BOS, EOS, 0]
    cond, _ = sdxl.encode_token_chunks(tokens)
    assert cond.shape == (1, 154, 96)
    with pytest.raises(ValueError, match="SDXL"):
        make_clip("sd1").tokenize_pair("a", "b")


def _with_rows(model: torch.nn.Module, ids: list[int], rows: torch.Tensor) -> torch.nn.Module:
    """Reference: put the vectors into spare vocabulary rows and encode those ids."""
    import copy
    ref = copy.deepcopy(model)
    table = getattr(ref, "text_model", ref).embeddings.token_embedding.weight
    with torch.no_grad():
        for i, r in zip(ids, rows):
            table[i] = r
    return ref


def test_embedding_vectors_replace_token_embeddings() -> None:
    gen = torch.Generator().manual_seed(3)
    vec = torch.randn(2, 32, generator=gen)
    clip = make_clip("sd1", embedding_lookup=lambda name: Emb(name, {"l": vec}) if name == "mychar" else None)
    tokens = clip.tokenize("a embedding:mychar, dog")
    items = [t for t, _ in tokens["l"][0]]
    assert items[1] == 320 and torch.equal(items[2], vec[0]) and torch.equal(items[3], vec[1])
    assert items[4:7] == [267, 1929, EOS]                 # ", dog" stays text
    z = clip.encode("a embedding:mychar, dog")[0][0]
    spare = [49400, 49401]
    ref = _with_rows(clip.encoders["l"], spare, vec)
    ids = torch.tensor([[BOS, 320, *spare, 267, 1929] + [EOS] * 71])
    torch.testing.assert_close(z, run(ref, ids).last_hidden_state, rtol=0, atol=1e-5)
    # weighted embedding: all of its vectors carry the weight
    weighted = clip.tokenize("(embedding:mychar:1.2)")["l"][0]
    assert [w for _, w in weighted[1:3]] == [1.2, 1.2] and weighted[3] == (EOS, 1.0)


def test_missing_embedding_warns_and_is_left_out(sd1: CLIP) -> None:
    warnings: list[str] = []
    tokens = sd1.tokenize("embedding:nosuch cat", on_warning=warnings.append)
    assert len(warnings) == 1 and "nosuch" in warnings[0]
    assert tokens == sd1.tokenize("cat")


def test_embedding_width_mismatch_is_an_error_naming_both_sizes() -> None:
    from diffusion.models.errors import ModelFileError
    clip = make_clip("sd1", embedding_lookup=lambda name: Emb(name, {"l": torch.zeros(1, 768)}))
    with pytest.raises(ModelFileError, match=r"'big' has vectors of width 768.*expects width 32"):
        clip.tokenize("embedding:big cat")


def test_sdxl_embedding_rows_per_encoder() -> None:
    vl, vg = torch.randn(2, 32), torch.randn(2, 64)
    clip = make_clip("sdxl", embedding_lookup=lambda name: Emb(name, {"l": vl, "g": vg}))
    tokens = clip.tokenize("embedding:style")
    assert torch.equal(tokens["l"][0][1][0], vl[0]) and torch.equal(tokens["g"][0][2][0], vg[1])
    cond, pooled = clip.encode_token_chunks(tokens)
    assert cond.shape == (1, 77, 96) and torch.isfinite(cond).all() and pooled.shape == (1, 64)


def test_lora_style_patch_on_a_clone(sd1: CLIP) -> None:
    key = sd1.patch_key("l", "text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert key == "l.encoder.layers.0.self_attn.q_proj.weight"
    assert sd1.patch_key("l", "encoder.layers.0.self_attn.q_proj.weight") == key
    assert sd1.patch_key("g", "encoder.layers.0.self_attn.q_proj.weight") is None
    before = sd1.encode("a cat")[0][0]
    patched = sd1.clone()
    assert patched.patcher.add_patches({key: torch.full((32, 32), 0.05)}, 1.0, "test") == [key]
    after = patched.encode("a cat")[0][0]
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(sd1.encode("a cat")[0][0], before, rtol=0, atol=0)   # original restored


def test_sdxl_patch_keys(sdxl: CLIP) -> None:
    assert sdxl.patch_key("g", "text_model.encoder.layers.1.mlp.fc1.weight") == "g.text_model.encoder.layers.1.mlp.fc1.weight"
    assert sdxl.patch_key("g", "encoder.layers.1.mlp.fc1.weight") == "g.text_model.encoder.layers.1.mlp.fc1.weight"
    assert sdxl.patch_key("g", "text_projection.weight") == "g.text_projection.weight"


def test_bad_inputs(sd1: CLIP) -> None:
    with pytest.raises(ValueError, match="keyed by"):
        CLIP({"x": torch.nn.Linear(1, 1)}, sd1.family)
    with pytest.raises(ValueError, match="77"):
        sd1.encode_token_chunks({"l": [[(BOS, 1.0), (EOS, 1.0)]]})
    with pytest.raises(ValueError, match="missing"):
        sd1.encode_token_chunks({"g": []})


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_clip_from_a_loaded_checkpoint_encodes_like_the_original(family: str, tmp_path) -> None:
    from diffusion.demo.checkpoint import write_ldm_checkpoint
    from diffusion.loaders.checkpoint import load_checkpoint

    comps = tiny_components(family, seed=4)
    write_ldm_checkpoint(comps, tmp_path / "m.safetensors")
    _, loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    ref = CLIP(comps.text_encoders, comps.family)
    text = "a (fox:1.3) in the snow, " + "tree " * 80
    (a, ea), (b, eb) = loaded.encode(text)[0], ref.encode(text)[0]
    assert a.shape == b.shape == (1, 154, sum(m.config.hidden_size for m in comps.text_encoders.values()))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ea["pooled_output"], eb["pooled_output"], rtol=0, atol=1e-5)


def test_embedding_files_through_diffusion_embeddings(tmp_path) -> None:
    """embedding:NAME resolved by find_embedding/load_embedding in the CLIP's embedding folders."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    vec = torch.randn(2, 32, generator=gen)
    vl, vg = torch.randn(3, 32, generator=gen), torch.randn(3, 64, generator=gen)
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": vec}, str(tmp_path / "mychar.safetensors"))            # kohya SD1 layout
    save_file({"clip_l": vl, "clip_g": vg}, str(tmp_path / "sub" / "xlstyle.safetensors"))
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")

    sd1 = make_clip("sd1", embedding_dirs=[tmp_path])
    items = sd1.tokenize("a embedding:mychar dog")["l"][0]
    assert torch.equal(items[2][0], vec[0]) and torch.equal(items[3][0], vec[1]) and items[4][0] == 1929
    warnings: list[str] = []
    tokens = sd1.tokenize("embedding:broken cat", on_warning=warnings.append)
    assert len(warnings) == 1 and "broken" in warnings[0]
    assert tokens == sd1.tokenize("cat")

    xl = make_clip("sdxl", embedding_dirs=[tmp_path])
    tokens = xl.tokenize("embedding:sub/xlstyle")
    assert torch.equal(tokens["l"][0][3][0], vl[2]) and torch.equal(tokens["g"][0][1][0], vg[0])
    assert tokens["l"][0][4] == (EOS, 1.0) and tokens["g"][0][4] == (EOS, 1.0)


def test_sd2_text_encoder_stored_without_its_last_layer_gives_the_same_hidden_state() -> None:
    from transformers import CLIPTextModel

    from diffusion.demo.checkpoint import clip_config

    torch.manual_seed(0)
    full = CLIPTextModel(clip_config("h", 32, layers=24)).eval()
    cut = CLIPTextModel(clip_config("h", 32, layers=23)).eval()
    state = {k: v for k, v in full.state_dict().items() if ".layers.23." not in k}
    cut.load_state_dict(state)
    fam = _components("sd2").family
    a = CLIP({"h": full}, fam, "cpu", "cpu")
    b = CLIP({"h": cut}, fam, "cpu", "cpu")
    torch.testing.assert_close(b.encode("a cat")[0][0], a.encode("a cat")[0][0], rtol=0, atol=1e-6)
    for k in (-3, -5):
        a.clip_layer(k)
        b.clip_layer(k)
        torch.testing.assert_close(b.encode("a cat")[0][0], a.encode("a cat")[0][0], rtol=0, atol=1e-6)
    a.clip_layer(-1)
    b.clip_layer(-1)                                   # not stored: the nearest layer (the full -2)
    a2 = CLIP({"h": full}, fam, "cpu", "cpu")
    torch.testing.assert_close(b.encode("a cat")[0][0], a2.encode("a cat")[0][0], rtol=0, atol=1e-6)
    assert not torch.allclose(a.encode("a cat")[0][0], a2.encode("a cat")[0][0])
