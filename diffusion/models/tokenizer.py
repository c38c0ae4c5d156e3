"""CLIP byte-pair-encoding tokenizer on the vocabulary shipped as package data, plus ComfyUI chunking.

The vocabulary file `diffusion/models/data/bpe_simple_vocab_16e6.txt.gz` (from the `open-clip-torch` wheel)
holds a header line and then merges "a b", one a line. CLIP uses the first 48,894 merges; its
49,408-entry vocabulary is, in this order (prompts.md section 4, formats.md 1.9):
  the 256 byte symbols, the same 256 with `</w>` (end of word), one entry per merge (the two halves
  joined), then `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407.
The same vocabulary serves CLIP-L, OpenCLIP-H and OpenCLIP bigG; they differ only in the pad id
(prompts.md 9: EOS for CLIP-L, 0 for SD2's H and SDXL's bigG).

Text is normalised like transformers' CLIPTokenizer (which ComfyUI uses): Unicode NFC, whitespace
runs collapsed to one space, lower-cased. Words are split by CLIP's pre-tokenisation pattern
(contractions, letter runs, single digits, runs of other non-space characters), mapped byte-wise to
printable symbols, and merged pairwise by merge rank, lowest first.
"""
from __future__ import annotations

import functools
import gzip
import unicodedata
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Union

import regex
import torch

BOS = 49406
EOS = 49407
VOCAB_SIZE = 49408
CHUNK_LENGTH = 77                  # BOS + 75 tokens + EOS
CHUNK_TOKENS = CHUNK_LENGTH - 2    # 75 usable positions
MERGE_COUNT = 49152 - 256 - 2      # 48,894 merges after the header line
LARGE_GROUP = 8                    # ComfyUI splits groups of >= 8 items across chunks; shorter ones move whole
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, one digit, other symbol runs.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")

Item = Union[int, torch.Tensor]            # a token id or an embedding vector Tensor[d]
WeightedItem = tuple[Item, float]
Chunk = list[WeightedItem]                 # CHUNK_LENGTH items


def byte_symbol_table() -> list[tuple[int, str]]:
    """(byte, printable symbol) pairs in vocabulary order: the printable Latin-1 bytes first, standing
    for themselves; then the others (controls, space, ...) mapped to code points 256 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table = [(b, chr(b)) for b in keep]
    others = [b for b in range(256) if b not in kept]
    table += [(b, chr(256 + i)) for i, b in enumerate(others)]
    return table


def byte_symbols() -> list[str]:
    """The printable symbol of each byte 0..255, indexed by byte."""
    by_byte = dict(byte_symbol_table())
    return [by_byte[b] for b in range(256)]


def vocab_path() -> Path:
    return Path(str(resources.files("diffusion.models") / "data" / VOCAB_FILE))


@functools.lru_cache(maxsize=4)
def load_bpe(path: str | None = None) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(vocabulary symbol -> id, merge pair -> rank) from the gzip'd merges file."""
    file = Path(path) if path else vocab_path()
    if not file.is_file():
        raise FileNotFoundError(f"CLIP vocabulary {file} is missing; it ships with the package as "
                                f"diffusion/data/{VOCAB_FILE}")
    lines = gzip.decompress(file.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + MERGE_COUNT]]
    if len(merges) != MERGE_COUNT or any(len(m) != 2 for m in merges):
        raise ValueError(f"CLIP vocabulary {file}: expected {MERGE_COUNT} merge lines of two symbols")
    symbols = [sym for _, sym in byte_symbol_table()]
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(vocab_list)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary {file}: {len(vocab)} distinct entries, expected {VOCAB_SIZE}")
    ranks = {(a, b): i for i, (a, b) in enumerate(merges)}
    return vocab, ranks


def normalize_text(text: str) -> str:
    # no HTML unescaping: transformers' CLIPTokenizer (what ComfyUI runs) keeps "&amp;" as written
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer. `encode(text)` gives ids without BOS/EOS (contracts: `CLIP.tokenizers[key]`)."""

    bos = BOS
    eos = EOS
    max_length = CHUNK_LENGTH

    def __init__(self, pad: int = EOS, path: str | None = None) -> None:
        self.pad = pad
        self.vocab, self.ranks = load_bpe(path)
        self.id_to_symbol = {i: s for s, i in self.vocab.items()}
        self._byte_symbols = byte_symbols()
        self._symbol_bytes = {s: b for b, s in enumerate(self._byte_symbols)}
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"CLIPTokenizer(pad={self.pad})"

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenised word (already in byte symbols); the last symbol carries `</w>`."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            # merge the lowest-ranked adjacent pair everywhere it occurs (left to right)
            best = min(((self.ranks.get(p, MERGE_COUNT), p) for p in zip(parts, parts[1:])))
            if best[0] == MERGE_COUNT:
                break
            a, b = best[1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(normalize_text(text)):
            if word in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.vocab[word])
                continue
            ids.extend(self._bpe("".join(self._byte_symbols[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (BOS/EOS dropped, `</w>` as a space); for messages and debugging."""
        text = "".join(self.id_to_symbol[i] for i in ids if i not in (BOS, EOS))
        words = [bytes(self._symbol_bytes[c] for c in w).decode("utf-8", errors="replace")
                 for w in text.split("</w>")]
        return " ".join(w for w in words if w)

    def empty_chunk(self) -> list[int]:
        """The 77 ids of the empty prompt: BOS, EOS, then padding."""
        return [BOS, EOS] + [self.pad] * (CHUNK_LENGTH - 2)


def chunk_groups(groups: Sequence[Sequence[WeightedItem]], pad: int) -> list[Chunk]:
    """ComfyUI's chunking (prompts.md 4.2): weighted groups (a text segment's tokens, or an
    embedding's vectors) fill chunks `[BOS, up to 75 items, EOS, pad...]` of 77 items.

    A group that does not fit the room left is split when it has >= 8 items (what fits stays, the
    rest opens the next chunk) and otherwise moves whole to the next chunk. BOS/EOS/pad weigh 1.0.
    The empty prompt gives one chunk `[BOS, EOS, pad x 75]`."""
    chunks: list[Chunk] = []
    current: list[WeightedItem] = [(BOS, 1.0)]

    def close(chunk: list[WeightedItem]) -> None:
        chunk.append((EOS, 1.0))
        chunk.extend([(pad, 1.0)] * (CHUNK_LENGTH - len(chunk)))
        chunks.append(chunk)

    for group in groups:
        rest = list(group)
        large = len(rest) >= LARGE_GROUP
        while rest:
            room = CHUNK_LENGTH - 1 - len(current)        # places before the closing EOS
            if len(rest) <= room:
                current.extend(rest)
                rest = []
                continue
            if large:
                current.extend(rest[:room])
                rest = rest[room:]
            close(current)
            current = [(BOS, 1.0)]
    close(current)
    return chunks
