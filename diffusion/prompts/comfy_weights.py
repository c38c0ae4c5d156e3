"""ComfyUI's prompt weight syntax and `embedding:NAME` words (prompts.md 2.3, 4.2; formats.md 3.3).

    parse_weights("a (b:1.5) (c)")  -> [("a ", 1.0), ("b", 1.5), ("c", 1.1)]

Rules:
- `\\(` and `\\)` are literal parentheses (protected before parsing); there is no other escape.
- Top-level `( ... )` groups are found by depth counting. An unmatched `(` leaves the text plain; a
  stray `)` at depth 0 drives the depth negative, so what follows stays in the same plain run until
  the depth returns to 0 at a later `(`.
- In a group, the inner text's last `:` (not at position 0) followed by something `float()` accepts
  sets an absolute weight (it replaces the outer one); otherwise the weight is outer x 1.1. The inner
  text is parsed again with that weight, so `((a:1.5))` is 1.5 and `((a))` 1.21.
- `[ ]` means nothing.
Embedding words: a segment is split where a space or newline is followed by `embedding:`; a segment
that starts with `embedding:` also counts (`a,embedding:x` does not). The name runs to the next
whitespace; the rest of the word stays text.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

EMBEDDING_PREFIX = "embedding:"
# Private-use characters stand for escaped parentheses while parsing (never produced by the tokenizer).
_OPEN, _CLOSE = "\ue000", "\ue001"
_EMBED_SPLIT = re.compile(r"[ \n](?=embedding:)")

E = TypeVar("E")


def escape(text: str) -> str:
    return text.replace("\\(", _OPEN).replace("\\)", _CLOSE)


def unescape(text: str) -> str:
    return text.replace(_OPEN, "(").replace(_CLOSE, ")")


def split_groups(text: str) -> list[str]:
    """Top-level pieces of `text`: plain runs and `( ... )` groups (with their parentheses)."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0 and current:
                pieces.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            current += ch
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _group_weight(inner: str, outer: float) -> tuple[str, float]:
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1:])
        except ValueError:
            pass
    return inner, outer * 1.1


def _parse(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for piece in split_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner, w = _group_weight(piece[1:-1], weight)
            out.extend(_parse(inner, w))
        else:
            out.append((piece, weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) segments of a ComfyUI prompt, escapes undone. The empty prompt gives []."""
    return [(unescape(piece), w) for piece, w in _parse(escape(text), 1.0)]


def split_embedding_words(segment: str) -> list[str]:
    """Pieces of a segment: text, and words starting with `embedding:` (the separating space or
    newline is dropped, as ComfyUI does). Empty pieces are dropped."""
    parts = _EMBED_SPLIT.split(segment)
    return [p for p in parts if p]


@dataclass(frozen=True)
class EmbeddingWord(Generic[E]):
    """An `embedding:NAME` word resolved (or not) by a lookup function."""

    name: str                 # the name as written (commas stripped if that is what resolved)
    embedding: E | None       # None: not found
    leftover: str             # text after the name that is tokenized as usual


def resolve_embedding_word(word: str, lookup: Callable[[str], E | None]) -> EmbeddingWord[E]:
    """`word` starts with `embedding:`. The name runs to the first whitespace; if no embedding has
    that name and it ends in commas, the name without them is tried and the commas stay text."""
    if not word.startswith(EMBEDDING_PREFIX):
        raise ValueError(f"not an embedding word: {word!r} (expected it to start with {EMBEDDING_PREFIX!r})")
    words = word[len(EMBEDDING_PREFIX):].split()
    name, rest = (words[0], " ".join(words[1:])) if words else ("", "")
    if not name:
        return EmbeddingWord(name="", embedding=None, leftover=rest)
    found = lookup(name)
    if found is None and name.endswith(","):
        stripped = name.rstrip(",")
        if stripped:
            found = lookup(stripped)
            if found is not None:
                commas = name[len(stripped):]
                return EmbeddingWord(name=stripped, embedding=found, leftover=f"{commas} {rest}".rstrip())
    return EmbeddingWord(name=name, embedding=found, leftover=rest)
