"""Textual-inversion embeddings: every file layout, name lookup, and the vectors reaching the text
encoder's input at the right positions through both prompt paths (ComfyUI `embedding:NAME` in
CLIP.tokenize, A1111 bare names in a1111_chunks), SD1 and SDXL (both encoders)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.errors import ModelFileError
from diffusion.models.tokenizer import BOS, EOS, CLIPTokenizer
from diffusion.patches.embeddings import (
    Embedding,
    find_embedding,
    list_embeddings,
    load_embedding,
)
from diffusion.prompts.a1111.chunks import (
    EmbeddingIndex,
    a1111_layout,
    a1111_token_chunks,
    a1111_weighting,
)
from diffusion.prompts.a1111.syntax import parse_prompt_attention
from diffusion.prompts.clip import CLIP

torch.set_num_threads(2)
TOK = CLIPTokenizer()


def rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- file layouts ----------------------------------------------------------------------------

def write_a1111_pt(path: Path, vec: torch.Tensor) -> None:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "inner-name",
                "step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)


LAYOUTS = {
    "a1111_pt": ("x.pt", lambda p, v: write_a1111_pt(p, v)),
    "kohya_safetensors": ("x.safetensors", lambda p, v: save_file({"emb_params": v}, str(p))),
    "single_tensor_safetensors": ("x.safetensors", lambda p, v: save_file({"whatever": v}, str(p))),
    "diffusers_bin": ("x.bin", lambda p, v: torch.save({"<my-token>": v}, p)),
    "diffusers_safetensors": ("learned_embeds.safetensors", lambda p, v: save_file({"<tok>": v}, str(p))),
    "bare_tensor_pt": ("x.pt", lambda p, v: torch.save(v, p)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 3])
def test_layouts_read_all_vectors(tmp_path: Path, layout: str, n: int) -> None:
    name, write = LAYOUTS[layout]
    vec = rows(n, 768, seed=n)
    write(tmp_path / name, vec)
    emb = load_embedding(tmp_path / name)
    assert emb.name == Path(name).stem
    assert list(emb.vectors) == ["l"] and emb.count == n
    torch.testing.assert_close(emb.vectors["l"], vec, rtol=0, atol=0)


def test_diffusers_single_vector_1d(tmp_path: Path) -> None:
    v = rows(1, 1024, 3)[0]
    torch.save({"<cat-toy>": v}, tmp_path / "toy.bin")
    emb = load_embedding(tmp_path / "toy.bin")
    assert list(emb.vectors) == ["h"]                          # SD2 width
    torch.testing.assert_close(emb.vectors["h"], v[None], rtol=0, atol=0)


def test_sdxl_layout(tmp_path: Path) -> None:
    l, g = rows(2, 768, 1), rows(2, 1280, 2)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "xl.safetensors"))
    emb = load_embedding(tmp_path / "xl.safetensors")
    assert sorted(emb.vectors) == ["g", "l"] and emb.count == 2
    torch.testing.assert_close(emb.vectors["g"], g, rtol=0, atol=0)


@pytest.mark.parametrize("data, message", [
    ({"string_to_param": {"*": torch.zeros(1, 8), "+": torch.zeros(1, 8)}}, "exactly one tensor"),
    ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "not a textual-inversion embedding"),
    ({"emb_params": torch.zeros(2, 2, 8)}, r"expected a float tensor \[n, d\]"),
    ({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(2, 16)}, "different counts"),
])
def test_bad_files_name_the_file(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(ModelFileError, match=message) as err:
        load_embedding(path)
    assert str(path) in str(err.value)


def test_empty_text_and_misnamed_files(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.pt.*is empty"):
        load_embedding(tmp_path / "empty.pt")
    (tmp_path / "page.pt").write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ModelFileError, match=r"page\.pt.*a text file"):
        load_embedding(tmp_path / "page.pt")
    save_file({"emb_params": rows(2, 8, 0)}, str(tmp_path / "named.pt"))      # safetensors under a .pt name
    torch.testing.assert_close(load_embedding(tmp_path / "named.pt").vectors["l"], rows(2, 8, 0), rtol=0, atol=0)


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, path)
    with pytest.raises(ModelFileError):
        load_embedding(path)


def test_load_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_file({"emb_params": rows(1, 8, 0)}, str(path))
    first = load_embedding(path)
    assert load_embedding(path) is first
    save_file({"emb_params": rows(2, 8, 1)}, str(path))
    assert load_embedding(path).count == 2


# --- lookup ----------------------------------------------------------------------------------

def test_find_embedding_comfy_rules(tmp_path: Path) -> None:
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    save_file({"emb_params": rows(1, 8, 0)}, str(root / "mychar.safetensors"))
    torch.save({"emb_params": rows(1, 8, 0)}, root / "sub" / "neg.pt")
    (tmp_path / "outside.pt").write_bytes(b"x")
    assert find_embedding("mychar", [root]) == root / "mychar.safetensors"
    assert find_embedding("mychar.safetensors", [root]) == root / "mychar.safetensors"
    assert find_embedding("neg", [root]) == root / "sub" / "neg.pt"          # subfolders searched
    assert find_embedding("sub/neg", [root]) == root / "sub" / "neg.pt"
    assert find_embedding("../outside", [root]) is None                      # never outside
    assert find_embedding("nosuch", [root, tmp_path / "missing"]) is None


def test_list_embeddings_skips_previews_and_empty(tmp_path: Path) -> None:
    save_file({"emb_params": rows(1, 8, 0)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.pt").write_bytes(b"")
    (tmp_path / "a.preview.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("x")
    assert list(list_embeddings([tmp_path])) == ["a"]


# --- vectors reaching the encoder ------------------------------------------------------------

@functools.cache
def _components(family: str):
    return tiny_components(family, seed=3)


def make_clip(family: str, dirs: list[Path]) -> CLIP:
    c = _components(family)
    return CLIP(c.text_encoders, c.family, "cpu", "cpu", embedding_dirs=dirs)


def captured_token_embeddings(clip: CLIP, key: str, chunks: dict, weighting: str = "comfy") -> torch.Tensor:
    """Encode and return the token-embedding rows fed into encoder `key`'s transformer:
    the encoder input minus the position embeddings. [rows, 77, D]."""
    model = clip.encoders[key]
    inner = getattr(model, "text_model", model)
    seen: list[torch.Tensor] = []

    def grab(_mod, args, kwargs):
        hidden = kwargs.get("inputs_embeds", args[0] if args else None)
        seen.append(hidden.detach().clone())

    handle = inner.encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        clip.encode_token_chunks(chunks, weighting)
    finally:
        handle.remove()
    pos = inner.embeddings.position_embedding.weight[:77]
    return seen[0] - pos


def test_comfy_embedding_word_reaches_encoder(tmp_path: Path) -> None:
    vec = rows(2, 32, 7)
    save_file({"emb_params": vec}, str(tmp_path / "mychar.safetensors"))
    clip = make_clip("sd1", [tmp_path])
    tokens = clip.tokenize("a embedding:mychar, dog")
    ids = [t for t, _ in tokens["l"][0] if not isinstance(t, torch.Tensor)]
    assert ids[:2] == [BOS, TOK.encode("a")[0]]
    got = captured_token_embeddings(clip, "l", tokens)[0]
    torch.testing.assert_close(got[2:4], vec, rtol=0, atol=1e-5)      # positions 2, 3 after BOS, "a"
    table = clip.encoders["l"].embeddings.token_embedding.weight
    torch.testing.assert_close(got[4], table[TOK.encode(",")[0]], rtol=0, atol=1e-5)


def test_comfy_weighted_embedding(tmp_path: Path) -> None:
    save_file({"emb_params": rows(2, 32, 7)}, str(tmp_path / "mychar.safetensors"))
    clip = make_clip("sd1", [tmp_path])
    chunk = clip.tokenize("(embedding:mychar:1.2)")["l"][0]
    assert [w for _, w in chunk[1:3]] == [1.2, 1.2] and chunk[3] == (EOS, 1.0)


def test_a1111_bare_name_reaches_encoder_at_the_right_positions(tmp_path: Path) -> None:
    vec = rows(2, 32, 11)
    write_a1111_pt(tmp_path / "mychar.pt", vec)
    clip = make_clip("sd1", [tmp_path])
    index = EmbeddingIndex.from_dirs([tmp_path], clip.tokenizers["l"])
    # prompts.md §10.4 #60: "mychar2" matches the file "mychar" (digits are separate tokens)
    chunks = a1111_token_chunks(clip, "a MyChar2", index)
    items = chunks["l"][0]
    assert items[1][0] == TOK.encode("a")[0]
    assert isinstance(items[2][0], torch.Tensor) and isinstance(items[3][0], torch.Tensor)
    assert items[4][0] == TOK.encode("2")[0] and items[5][0] == EOS
    got = captured_token_embeddings(clip, "l", chunks, "a1111")[0]
    torch.testing.assert_close(got[2:4], vec, rtol=0, atol=1e-5)
    assert list(index.used) == ["mychar"]


def test_a1111_embedding_weights_follow_the_interpretation(tmp_path: Path) -> None:
    save_file({"emb_params": rows(2, 32, 5)}, str(tmp_path / "style.safetensors"))
    clip = make_clip("sd1", [tmp_path])
    index = EmbeddingIndex.from_dirs([tmp_path], clip.tokenizers["l"])
    weighted = a1111_token_chunks(clip, "a (style:1.5) cat", index)
    assert [w for _, w in weighted["l"][0][:6]] == [1.0, 1.0, 1.5, 1.5, 1.0, 1.0]
    plain = {k: [[(t, 1.0) for t, _ in c] for c in v] for k, v in weighted.items()}
    z, _ = clip.encode_token_chunks(plain, "a1111")
    w = torch.tensor([x for _, x in weighted["l"][0]])
    expected_a1111 = a1111_weighting(z[0], w)
    got_a1111, _ = clip.encode_token_chunks(weighted, "a1111")
    torch.testing.assert_close(got_a1111[0], expected_a1111, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got_a1111, z)
    # comfy: rows with weight w move from the empty prompt's rows: z_e + w (z - z_e)
    empty = {"l": [[(t, 1.0) for t in clip.tokenizers["l"].empty_chunk()]]}
    z_empty, _ = clip.encode_token_chunks(empty, "comfy")
    got_comfy, _ = clip.encode_token_chunks(weighted, "comfy")
    expected = z_empty[0] + w[:, None] * (z[0] - z_empty[0])
    torch.testing.assert_close(got_comfy[0], expected, rtol=1e-5, atol=1e-5)


def test_embedding_that_does_not_fit_opens_a_new_chunk(tmp_path: Path) -> None:
    # prompts.md §10.4 #57: 74 tokens then a 10-vector embedding -> 74 + 10
    save_file({"emb_params": rows(10, 32, 1)}, str(tmp_path / "bigemb.safetensors"))
    index = EmbeddingIndex.from_dirs([tmp_path], TOK)
    layout = a1111_layout(parse_prompt_attention("x " * 74 + "bigemb"), TOK, index)
    assert [len(c) for c in layout] == [74, 10]


def test_comma_backtracking_moves_embedding_vectors_with_the_tail(tmp_path: Path) -> None:
    save_file({"emb_params": rows(2, 32, 1)}, str(tmp_path / "emb.safetensors"))
    index = EmbeddingIndex.from_dirs([tmp_path], TOK)
    layout = a1111_layout(parse_prompt_attention("w " * 70 + ", emb x y z q r"), TOK, index)
    assert [len(c) for c in layout] == [71, 7]
    assert [type(i).__name__ for i, _ in layout[1][:2]] == ["EmbeddingSlot", "EmbeddingSlot"]


def test_sdxl_embedding_reaches_both_encoders(tmp_path: Path) -> None:
    l, g = rows(2, 32, 21), rows(2, 64, 22)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "xlemb.safetensors"))
    clip = make_clip("sdxl", [tmp_path])
    assert clip.keys == ("l", "g")
    index = EmbeddingIndex.from_dirs([tmp_path], clip.tokenizers["l"])
    chunks = a1111_token_chunks(clip, "xlemb cat", index)
    assert chunks["g"][0][5][0] == 0 and chunks["l"][0][5][0] == EOS     # pad differs per encoder
    torch.testing.assert_close(captured_token_embeddings(clip, "l", chunks, "a1111")[0, 1:3], l,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(captured_token_embeddings(clip, "g", chunks, "a1111")[0, 1:3], g,
                               rtol=0, atol=1e-5)
    # and through ComfyUI's embedding: word
    tokens = clip.tokenize("embedding:xlemb cat")
    torch.testing.assert_close(captured_token_embeddings(clip, "g", tokens)[0, 1:3], g, rtol=0, atol=1e-5)


def test_dimension_mismatch_names_file_and_both_sizes(tmp_path: Path) -> None:
    save_file({"emb_params": rows(1, 48, 0)}, str(tmp_path / "wide.safetensors"))
    clip = make_clip("sd1", [tmp_path])
    index = EmbeddingIndex.from_dirs([tmp_path], clip.tokenizers["l"])
    with pytest.raises(ModelFileError, match=r"wide\.safetensors.*width 48.*expects width 32"):
        a1111_token_chunks(clip, "a wide cat", index)


def test_embedding_record_is_frozen() -> None:
    emb = Embedding("x", {"l": torch.zeros(1, 4)})
    with pytest.raises(AttributeError):
        emb.name = "y"                                    # type: ignore[misc]


def test_parameterdict_file_read_from_raw_storage(tmp_path: Path) -> None:
    # torch 1.11-era A1111 files keep a ParameterDict, which the safe unpickler refuses
    vec = rows(2, 768, 31)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old"}, tmp_path / "old.pt")
    emb = load_embedding(tmp_path / "old.pt")
    assert emb.name == "old"
    torch.testing.assert_close(emb.vectors["l"], vec, rtol=0, atol=0)
