"""CLIP BPE tokenizer on the shipped vocabulary, and ComfyUI chunking (prompts.md 4.2, 9, 10.4)."""
from __future__ import annotations

import gzip

import pytest
import torch

from diffusion.models.tokenizer import (BOS, CHUNK_LENGTH, EOS, MERGE_COUNT, VOCAB_SIZE, CLIPTokenizer, chunk_groups,
                                 load_bpe, vocab_path)


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_vocabulary_ships_with_the_package() -> None:
    path = vocab_path()
    assert path.is_file()
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    assert lines[0].startswith('"bpe_simple_vocab_16e6.txt#version')
    vocab, ranks = load_bpe()
    assert len(vocab) == VOCAB_SIZE
    assert len(ranks) == MERGE_COUNT == 48894
    assert vocab["<|startoftext|>"] == BOS == 49406
    assert vocab["<|endoftext|>"] == EOS == 49407
    assert vocab["!"] == 0 and vocab[",</w>"] == 267


def test_reference_vector(tok: CLIPTokenizer) -> None:
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("A   Photo\nof a CAT ") == [320, 1125, 539, 320, 2368]   # lower-case, whitespace


def test_known_ids(tok: CLIPTokenizer) -> None:
    assert tok.encode("[cat]") == [314, 2368, 316]            # prompts.md 10.5 #64
    assert tok.encode("(cat") == [263, 2368]                   # #65
    ids = tok.encode("mychar2")                                # digits are single tokens
    assert [tok.id_to_symbol[i] for i in ids] == ["my", "char</w>", "2</w>"]
    assert tok.encode("") == []


def test_decode_round_trip(tok: CLIPTokenizer) -> None:
    assert tok.decode([BOS, *tok.encode("hello, world! café"), EOS]) == "hello , world ! café"


PROMPTS = [
    "a photo of a cat",
    "Hello,   World!! it's 2024 — naïve café 東京 emoji 😀",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k uhd, dslr, soft lighting &amp; film grain",
    "don't you'll I'M we've they're she'd",
    "tab\tnew\nline  x²½ ÀÉÎ ß ﬁ",
    "<|endoftext|> a <|startoftext|>",
    "a_b-c.d/e\\f:g;h'i\"j",
]


def test_matches_transformers_clip_tokenizer(tok: CLIPTokenizer) -> None:
    """transformers' CLIPTokenizer (what ComfyUI runs) built from the same vocabulary and merges."""
    from transformers import CLIPTokenizer as HFTokenizer

    vocab, ranks = load_bpe()
    merges = sorted(ranks, key=ranks.__getitem__)
    hf = HFTokenizer(vocab=dict(vocab), merges=list(merges))
    for text in PROMPTS:
        expected = hf(text)["input_ids"]
        assert expected[0] == BOS and expected[-1] == EOS
        assert tok.encode(text) == expected[1:-1], text


def test_empty_prompt_chunk() -> None:
    chunks = chunk_groups([], pad=EOS)
    assert len(chunks) == 1
    assert [t for t, _ in chunks[0]] == [BOS] + [EOS] * 76           # prompts.md 10.4 #61
    assert all(w == 1.0 for _, w in chunks[0])
    assert [t for t, _ in chunk_groups([], pad=0)[0]] == [BOS, EOS] + [0] * 75


def test_single_chunk_layout(tok: CLIPTokenizer) -> None:
    group = [(t, 1.0) for t in tok.encode("a photo of a cat")]
    (chunk,) = chunk_groups([group], pad=EOS)
    assert [t for t, _ in chunk] == [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71     # #52
    (chunk0,) = chunk_groups([group], pad=0)                           # SD2 / SDXL bigG padding
    assert [t for t, _ in chunk0][:8] == [BOS, 320, 1125, 539, 320, 2368, EOS, 0]
    assert all(t == 0 for t, _ in chunk0[7:])


def test_large_group_is_split_at_the_boundary(tok: CLIPTokenizer) -> None:
    """#55: one 80-token segment is cut 75 + 5."""
    ids = tok.encode("word " * 70 + ", long tail of nine words here to push over")
    assert len(ids) == 80
    chunks = chunk_groups([[(t, 1.0) for t in ids]], pad=EOS)
    assert len(chunks) == 2 and all(len(c) == CHUNK_LENGTH for c in chunks)
    assert [t for t, _ in chunks[0]] == [BOS] + ids[:75] + [EOS]
    assert [t for t, _ in chunks[1]][:7] == [BOS] + ids[75:] + [EOS]


def test_small_group_moves_whole_to_next_chunk(tok: CLIPTokenizer) -> None:
    """#56: 70 weighted tokens, then a 7-token group that does not fit in the 5 places left."""
    first = [(t, 1.1) for t in tok.encode("word " * 70)]
    tail = [(t, 1.0) for t in tok.encode(" tail" * 7)]
    assert len(first) == 70 and len(tail) == 7
    chunks = chunk_groups([first, tail], pad=EOS)
    assert len(chunks) == 2
    assert chunks[0][71] == (EOS, 1.0) and [w for _, w in chunks[0][1:71]] == [1.1] * 70
    assert all(item == (EOS, 1.0) for item in chunks[0][72:])
    assert chunks[1][1:8] == tail and chunks[1][8] == (EOS, 1.0)


def test_embedding_vectors_are_items() -> None:
    """An embedding of 10 vectors (>= 8) after 70 tokens is split 5 + 5."""
    words = [(320, 1.0)] * 70
    vectors = [(torch.full((4,), float(i)), 1.2) for i in range(10)]
    chunks = chunk_groups([words, vectors], pad=EOS)
    assert len(chunks) == 2
    assert [float(v[0]) for v, _ in chunks[0][71:76]] == [0, 1, 2, 3, 4]
    assert [float(v[0]) for v, _ in chunks[1][1:6]] == [5, 6, 7, 8, 9]
    assert chunks[1][1][1] == 1.2


def test_exactly_75_tokens_fill_one_chunk() -> None:
    chunks = chunk_groups([[(5, 1.0)] * 75], pad=EOS)
    assert len(chunks) == 1 and chunks[0][-1] == (EOS, 1.0) and chunks[0][75] == (5, 1.0)
    assert len(chunk_groups([[(5, 1.0)] * 76], pad=EOS)) == 2
