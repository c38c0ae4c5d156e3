"""A1111's tokenization into 75-token chunks (prompts.md §4.1), for `CLIP.encode_token_chunks`.

    pieces = parse_prompt_attention("(masterpiece:1.2), easyneg BREAK a cat")
    layout = a1111_layout(pieces, tokenizer, EmbeddingIndex.from_dirs(dirs, tokenizer))
    chunks = {key: materialise(layout, key, width, pad)}       # 77 (item, weight) per chunk
    cond, pooled = clip.encode_token_chunks(chunks, weighting="a1111")

Rules (A1111 `tokenize_line`):
- each emphasis piece is tokenized on its own (no BOS/EOS); its tokens carry its weight;
- a `BREAK` marker closes the current chunk (two in a row give an empty chunk);
- when a chunk holds 75 tokens and the next token is not a comma, the tokens after the last comma
  of the chunk (if it is at most `comma_backtrack` = 20 tokens back) move to the next chunk;
- textual inversion by bare name: at each position the longest embedding name (its file stem,
  tokenized) matching the upcoming ids is replaced by its n vectors; if they do not fit in the
  chunk, the chunk is closed first. Matching is on token ids, so it is case-insensitive and
  `mychar` matches inside `mychar2` (formats.md §3.3);
- a chunk is closed as `[BOS] + items + [EOS] + pad`, pad = EOS for CLIP-L, 0 for OpenCLIP (A1111
  pads with EOS and then zeroes every position after the first EOS, which is the same thing); the
  last chunk only if it has items or there is no chunk yet.
Weighting ("Original" emphasis): `z' = z * w` then `z' *= mean(z) / mean(z')` per chunk; that is
`weighting="a1111"` of `CLIP.encode_token_chunks` (the formula is `a1111_weighting` below). A1111
normalises over the batch of texts encoded together; Easel encodes each text on its own, so results
do not depend on what else is in the batch.

Difference from A1111: when comma backtracking moves an embedding to the next chunk, its vectors
move with it (A1111 leaves the vector fix behind at a stale offset).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from diffusion.models.errors import ModelFileError
from diffusion.patches.embeddings import Embedding, list_embeddings, load_embedding
from diffusion.prompts.a1111.syntax import BREAK_MARKER, parse_prompt_attention

BOS = 49406
EOS = 49407
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class EmbeddingSlot:
    """Row `row` of an embedding, at one token position of the layout."""
    embedding: Embedding = field(compare=False)
    row: int
    name: str = ""


LayoutItem = int | EmbeddingSlot
Layout = list[list[tuple[LayoutItem, float]]]       # chunks of <= 75 weighted items, no BOS/EOS


class EmbeddingIndex:
    """A1111's bare-name embedding matching: names tokenized, grouped by first id, longest first.
    Files are read when a prompt first uses them (`loader`), and remembered in `used`."""

    def __init__(self, names: Mapping[str, Path], tokenizer: Tokenizer,
                 loader: Callable[[Path], Embedding] = load_embedding) -> None:
        self.paths = dict(names)
        self.loader = loader
        self.used: dict[str, Embedding] = {}
        by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in self.paths:
            ids = tuple(tokenizer.encode(name))
            if ids:
                by_first.setdefault(ids[0], []).append((ids, name))
        for cands in by_first.values():
            cands.sort(key=lambda c: -len(c[0]))
        self._by_first = by_first

    @classmethod
    def from_dirs(cls, dirs: Sequence[str | os.PathLike[str]], tokenizer: Tokenizer) -> EmbeddingIndex:
        return cls(list_embeddings(dirs), tokenizer)

    def match(self, ids: Sequence[int], pos: int) -> tuple[Embedding, int, str] | None:
        """(embedding, ids consumed, name) of the longest name starting at `pos`, or None."""
        for cand, name in self._by_first.get(ids[pos], ()):
            if tuple(ids[pos:pos + len(cand)]) == cand:
                emb = self.used.get(name)
                if emb is None:
                    emb = self.loader(self.paths[name])
                    self.used[name] = emb
                return emb, len(cand), name
        return None


def a1111_layout(pieces: Sequence[tuple[str, float]], tokenizer: Tokenizer,
                 embeddings: EmbeddingIndex | None = None, *, comma_backtrack: int = COMMA_BACKTRACK,
                 comma_id: int | None = None) -> Layout:
    """Weighted emphasis pieces -> chunks of at most 75 (token id | EmbeddingSlot, weight)."""
    comma = comma_id if comma_id is not None else tokenizer.encode(",")[0]
    chunks: Layout = []
    current: list[tuple[LayoutItem, float]] = []
    last_comma = -1                                   # index in `current` of its last comma

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current = []
        last_comma = -1

    for text, weight in pieces:
        if (text, weight) == BREAK_MARKER:
            close()
            continue
        ids = tokenizer.encode(text)
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(current)
            elif (comma_backtrack and len(current) == CHUNK_TOKENS and last_comma != -1
                  and len(current) - last_comma <= comma_backtrack):
                moved = current[last_comma + 1:]          # the tail after the comma opens the next chunk
                current = current[:last_comma + 1]
                close()
                current = moved
            if len(current) == CHUNK_TOKENS:
                close()
            found = embeddings.match(ids, pos) if embeddings is not None else None
            if found is None:
                current.append((token, weight))
                pos += 1
                continue
            emb, consumed, name = found
            n = emb.count
            if n > CHUNK_TOKENS:
                raise ModelFileError(emb.path or name, f"embedding {name!r} has {n} vectors; at most "
                                                       f"{CHUNK_TOKENS} fit in a chunk")
            if len(current) + n > CHUNK_TOKENS:
                close()
            current.extend((EmbeddingSlot(emb, r, name), weight) for r in range(n))
            pos += consumed
    if current or not chunks:
        close()
    return chunks


def materialise(layout: Layout, key: str, width: int, pad: int) -> list[list[tuple[Any, float]]]:
    """Chunks of 77 `(token id | Tensor[width], weight)` for encoder `key`:
    `[BOS] + items + [EOS] + [pad] * (75 - len(items))`; BOS/EOS/pad weigh 1.0."""
    vectors: dict[int, torch.Tensor] = {}
    out = []
    for items in layout:
        chunk: list[tuple[Any, float]] = [(BOS, 1.0)]
        for item, w in items:
            if isinstance(item, EmbeddingSlot):
                emb = item.embedding
                rows = vectors.get(id(emb))
                if rows is None:
                    rows = vectors[id(emb)] = emb.vectors_for(key, width)
                chunk.append((rows[item.row], w))
            else:
                chunk.append((item, w))
        chunk.append((EOS, 1.0))
        chunk.extend([(pad, 1.0)] * (CHUNK_TOKENS + 2 - len(chunk)))
        out.append(chunk)
    return out


def encoder_width(clip: Any, key: str) -> int:
    """Hidden width of text encoder `key` of a diffusion.prompts.clip.CLIP."""
    model = clip.encoders[key]
    return int(getattr(model, "text_model", model).embeddings.token_embedding.weight.shape[1])


def a1111_token_chunks(clip: Any, text: str, embeddings: EmbeddingIndex | None = None
                       ) -> dict[str, list[list[tuple[Any, float]]]]:
    """The chunks of one (already scheduled, tag-free) prompt text for every encoder of `clip`."""
    keys = list(clip.keys)
    layout = a1111_layout(parse_prompt_attention(text), clip.tokenizers[keys[0]], embeddings)
    return {k: materialise(layout, k, encoder_width(clip, k), clip.tokenizers[k].pad) for k in keys}


def encode_a1111(clip: Any, text: str, embeddings: EmbeddingIndex | None = None,
                 weighting: str = "a1111") -> tuple[torch.Tensor, dict[str, Any]]:
    """(cond Tensor[1, 77k, D], {"pooled_output": Tensor[1, P]}) of one prompt text, A1111 chunks
    encoded with `weighting` ("a1111": mean-restoring multiply; "comfy": ComfyUI's interpolation)."""
    cond, pooled = clip.encode_token_chunks(a1111_token_chunks(clip, text, embeddings), weighting)
    return cond, {"pooled_output": pooled}


def a1111_weighting(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis on one encoded chunk. z: [77, D], weights: [77] ->
    `z * w` rescaled so that its mean over all elements equals mean(z)."""
    weighted = z * weights.to(z.dtype).unsqueeze(-1)
    return weighted * (z.mean() / weighted.mean())


__all__ = [
    "CHUNK_TOKENS",
    "COMMA_BACKTRACK",
    "EmbeddingIndex",
    "EmbeddingSlot",
    "a1111_layout",
    "a1111_token_chunks",
    "a1111_weighting",
    "encode_a1111",
    "encoder_width",
    "materialise",
]
