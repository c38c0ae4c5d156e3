"""The AUTOMATIC1111 prompt language, parsed in pure Python (no lark).

Four independent stages, in the order A1111 applies them (prompts.md §1):

1. `strip_extra_networks(text)`: `<type:args>` tags are removed and returned (`<lora:…>`,
   `<lyco:…>`, `<hypernet:…>`; unknown types are removed too and reported by the caller).
2. `split_and(text)`: composable-diffusion sub-prompts `a AND b:0.5` with their weights.
3. `parse_schedule_tree(text)`: the prompt-editing grammar (`[from:to:when]`, `[to:when]`,
   `[from::when]`, `[a|b|c]`; `( )` and `[ ]` emphasis nodes are kept verbatim). The step arithmetic
   that turns the tree into a `[(end_step, text)]` schedule lives in `diffusion.prompts.a1111.schedule`.
4. `parse_prompt_attention(text)`: emphasis weights `( )` ×1.1, `[ ]` ÷1.1, `(text:w)`, escapes and
   `BREAK` markers, giving `[(text, weight)]` pieces for the tokenizer.

The grammar of stage 3 (A1111's lark grammar, restated in prompts.md §3.1) is recognised by a
bracket-matching recursive descent that gives the same trees on every prompt we know of: a bracket
opens a construct only if its matching closer exists and the separators at its depth (`:` and `|`)
form a valid emphasis, schedule or alternation; otherwise, at the top level, the bracket is literal
text (A1111 allows stray `[ ] ( ) :` there), and inside a construct it makes the construct fail. A `|`
outside any alternation or a trailing lone backslash makes the whole prompt unparsable, which A1111
treats as "no schedule": `parse_schedule_tree` returns None.

Checked against lark's Earley parser on A1111's grammar with a few thousand random and
bracket-heavy prompts: the schedules agree except in one contrived family, a schedule immediately
followed by an even number of stray bracket/colon characters (`[a:1]]]`, `[a:1]::`), where lark's
ambiguity resolution keeps the whole text literal and Easel still sees the schedule.

Differences from A1111, on purpose:
- `(a:1.3.3)` (a weight that matches A1111's pattern but is not a float) crashes A1111; here the
  closer is kept as literal text and the `(` stays open (×1.1 at the end).
- `BREAK` inside brackets is ignored (A1111 would tokenize it as the word "break" with a negative
  weight, prompts.md §2.1); only a top-level `BREAK` closes a chunk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ("BREAK", -1.0)          # the piece parse_prompt_attention inserts for a chunk break


# ---------------------------------------------------------------------------------------------
# 1. extra-network tags <type:arg1:arg2:name=value>
# ---------------------------------------------------------------------------------------------

_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<kind:args>` tag: positional args in order, named `key=value` args separately."""
    kind: str
    positional: tuple[str, ...]
    named: tuple[tuple[str, str], ...] = ()
    source: str = ""                    # the tag as written, for messages

    def named_dict(self) -> dict[str, str]:
        return dict(self.named)


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float            # text-encoder multiplier
    unet: float          # UNet multiplier (defaults to te)
    dyn: int | None = None


@dataclass(frozen=True)
class HypernetTag:
    name: str
    multiplier: float


def strip_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every `<kind:args>` tag (known type or not) and return the rest plus the tags in order.

    Only the tag is removed; surrounding commas and spaces stay (`"a, <lora:x:1>, b"` -> `"a, , b"`).
    An argument with exactly one `=` is named, any other one is positional.
    """
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        positional: list[str] = []
        named: list[tuple[str, str]] = []
        for arg in match.group(2).split(":"):
            if arg.count("=") == 1:
                key, value = arg.split("=")
                named.append((key, value))
            else:
                positional.append(arg)
        tags.append(ExtraNetworkTag(match.group(1), tuple(positional), tuple(named), match.group(0)))
        return ""

    return _RE_EXTRA_NETWORK.sub(take, text), tags


def _number(tag: ExtraNetworkTag, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"extra-network tag {tag.source!r}: {value!r} is not a number") from None


def lora_from_tag(tag: ExtraNetworkTag) -> LoraTag:
    """`<lora:name[:te[:unet[:dyn]]]>` with `te=`, `unet=`, `dyn=` overriding; unet defaults to te.

    Raises ValueError for a non-numeric multiplier (A1111 then applies no LoRA of that prompt).
    """
    if tag.kind not in ("lora", "lyco"):
        raise ValueError(f"extra-network tag {tag.source!r} is not a lora tag")
    pos, named = tag.positional, tag.named_dict()
    if not pos or not pos[0]:
        raise ValueError(f"extra-network tag {tag.source!r}: no LoRA name")
    te_text = named.get("te", pos[1] if len(pos) > 1 else None)
    te = 1.0 if te_text is None else _number(tag, te_text)
    unet_text = named.get("unet", pos[2] if len(pos) > 2 else None)
    unet = te if unet_text is None else _number(tag, unet_text)
    dyn_text = named.get("dyn", pos[3] if len(pos) > 3 else None)
    dyn = None if dyn_text is None else int(_number(tag, dyn_text))
    return LoraTag(pos[0], te, unet, dyn)


def hypernet_from_tag(tag: ExtraNetworkTag) -> HypernetTag:
    """`<hypernet:name[:multiplier]>`, multiplier default 1.0."""
    if tag.kind != "hypernet":
        raise ValueError(f"extra-network tag {tag.source!r} is not a hypernet tag")
    if not tag.positional or not tag.positional[0]:
        raise ValueError(f"extra-network tag {tag.source!r}: no hypernetwork name")
    mult = _number(tag, tag.positional[1]) if len(tag.positional) > 1 else 1.0
    return HypernetTag(tag.positional[0], mult)


# ---------------------------------------------------------------------------------------------
# 2. AND
# ---------------------------------------------------------------------------------------------

_RE_AND = re.compile(r"\bAND\b")
_RE_SUBPROMPT_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


def split_and(text: str) -> list[tuple[str, float]]:
    """Split on the word `AND` (case-sensitive); a trailing `:number` is the sub-prompt's weight.

    Leading spaces of a sub-prompt are kept, trailing ones dropped: `"a cat AND a dog:0.5"` ->
    `[("a cat", 1.0), (" a dog", 0.5)]`.
    """
    out: list[tuple[str, float]] = []
    for part in _RE_AND.split(text):
        m = _RE_SUBPROMPT_WEIGHT.match(part)
        if m is None:                              # cannot happen: the pattern matches any string
            out.append((part, 1.0))
            continue
        out.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return out


# ---------------------------------------------------------------------------------------------
# 3. prompt editing and alternation: the schedule tree
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheduled:
    """`[before:after:when]`; `before` is None for `[after:when]`. `when` is the number as written."""
    before: tuple[Node, ...] | None
    after: tuple[Node, ...]
    when: str


@dataclass(frozen=True)
class Alternate:
    """`[a|b|c]`; options may be empty."""
    options: tuple[tuple[Node, ...], ...]


Node = str | Scheduled | Alternate      # a str is verbatim text (plain, brackets of emphasis)

# lark's SIGNED_NUMBER, with the optional whitespace the grammar allows around it
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_OPEN_TO_CLOSE = {"(": ")", "[": "]"}


class _Unparsable(Exception):
    """The whole prompt has no parse (a stray `|` or a trailing lone backslash)."""


def _matching_close(text: str, start: int) -> int | None:
    """Index of the bracket closing the one at `start` (escapes skipped, kinds must nest), or None."""
    stack = [_OPEN_TO_CLOSE[text[start]]]
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in _OPEN_TO_CLOSE:
            stack.append(_OPEN_TO_CLOSE[c])
        elif c in ")]":
            if c != stack.pop():
                return None
            if not stack:
                return i
        i += 1
    return None


def _split_depth0(inner: str) -> tuple[list[str], list[str]]:
    """Split the inside of a construct at its own `:` and `|` (not those of nested brackets)."""
    parts: list[str] = []
    seps: list[str] = []
    depth, begin, i = 0, 0, 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif depth == 0 and c in ":|":
            parts.append(inner[begin:i])
            seps.append(c)
            begin = i + 1
        i += 1
    parts.append(inner[begin:])
    return parts, seps


def _parse_construct(text: str, start: int) -> tuple[list[Node], int] | None:
    """The construct opening at `start` and the index after it, or None if it is not one."""
    end = _matching_close(text, start)
    if end is None:
        return None
    parts, seps = _split_depth0(text[start + 1:end])
    if text[start] == "(":
        if len(seps) > 1 or "|" in seps:
            return None
        inner = [_parse_inner(p) for p in parts]
        if any(p is None for p in inner):
            return None
        nodes: list[Node] = ["("]
        for k, p in enumerate(inner):
            if k:
                nodes.append(":")
            nodes.extend(p)                           # type: ignore[arg-type]
        nodes.append(")")
        return nodes, end + 1
    # square bracket: emphasis, alternation or schedule
    if not seps:
        body = _parse_inner(parts[0])
        return (["[", *body, "]"], end + 1) if body is not None else None
    if all(s == "|" for s in seps):
        options = [_parse_inner(p) for p in parts]
        if any(o is None for o in options):
            return None
        return [Alternate(tuple(tuple(o) for o in options))], end + 1   # type: ignore[arg-type]
    if all(s == ":" for s in seps) and len(seps) <= 2:
        when = _RE_WHEN.fullmatch(parts[-1])
        if when is None:
            return None
        prompts = [_parse_inner(p) for p in parts[:-1]]
        if any(p is None for p in prompts):
            return None
        before = tuple(prompts[0]) if len(prompts) == 2 else None     # type: ignore[arg-type]
        return [Scheduled(before, tuple(prompts[-1]), when.group(1))], end + 1  # type: ignore[arg-type]
    return None


def _parse_inner(text: str) -> list[Node] | None:
    """A `prompt` inside a construct: no stray brackets, colons or bars allowed."""
    try:
        return _parse_sequence(text, top_level=False)
    except _Unparsable:
        return None


def _parse_sequence(text: str, top_level: bool) -> list[Node] | None:
    nodes: list[Node] = []
    plain: list[str] = []
    i = 0

    def flush() -> None:
        if plain:
            nodes.append("".join(plain))
            plain.clear()

    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                raise _Unparsable()
            plain.append(text[i:i + 2])               # escapes stay verbatim for the emphasis stage
            i += 2
        elif c in "([":
            found = _parse_construct(text, i)
            if found is not None:
                flush()
                nodes.extend(found[0])
                i = found[1]
            elif top_level:
                plain.append(c)
                i += 1
            else:
                return None
        elif c == "|":
            raise _Unparsable()
        elif c in ")]:":
            if not top_level:
                return None
            plain.append(c)
            i += 1
        else:
            plain.append(c)
            i += 1
    flush()
    return nodes


def parse_schedule_tree(text: str) -> tuple[Node, ...] | None:
    """The prompt-editing tree of `text`, or None when A1111's grammar has no parse for it."""
    try:
        nodes = _parse_sequence(text, top_level=True)
    except _Unparsable:
        return None
    return tuple(nodes) if nodes is not None else None


# ---------------------------------------------------------------------------------------------
# 4. emphasis: (text) [text] (text:w), escapes, BREAK
# ---------------------------------------------------------------------------------------------

_RE_ATTENTION = re.compile(r"""
    \\[()\[\]\\]               # escaped bracket or backslash
  | \\                         # lone backslash (dropped)
  | \( | \[                    # openers
  | :\s*([+-]?[.\d]+)\s*\)     # weight closer
  | \) | \]                    # closers
  | [^\\()\[\]:]+              # text
  | :                          # lone colon
""", re.VERBOSE)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111 emphasis: `[(text, weight)]`, adjacent equal weights merged, `BREAK_MARKER` for BREAK.

    `(a (b:1.5) c:1.2)` -> `[("a ", 1.2), ("b", 1.8), (" c", 1.2)]`; unclosed brackets still count.
    """
    res: list[list] = []                 # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    def add_text(piece: str) -> None:
        for k, part in enumerate(_RE_BREAK.split(piece)):
            if k:
                res.append(["BREAK", -1.0, True])
            res.append([part, 1.0, False])

    for m in _RE_ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0, False])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:           # `1.3.3`: A1111 crashes; keep it as text
                add_text(tok)
                continue
            multiply(round_open.pop(), factor)
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(tok)

    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    if not res:
        return [("", 1.0)]
    # a BREAK inside brackets has a scaled weight and is not a break (prompts.md §2.1): it becomes
    # the space the split removed, at the weight of its surroundings
    pieces = [(t, w, brk and w == -1.0) if not brk or w == -1.0 else (" ", -w, False)
              for t, w, brk in res]
    merged: list[list] = []
    for t, w, brk in pieces:
        if merged and not brk and not merged[-1][2] and merged[-1][1] == w:
            merged[-1][0] += t
        else:
            merged.append([t, w, brk])
    return [(t, w) for t, w, _ in merged]


__all__ = [
    "BREAK_MARKER",
    "ROUND_MULTIPLIER",
    "SQUARE_MULTIPLIER",
    "Alternate",
    "ExtraNetworkTag",
    "HypernetTag",
    "LoraTag",
    "Node",
    "Scheduled",
    "hypernet_from_tag",
    "lora_from_tag",
    "parse_prompt_attention",
    "parse_schedule_tree",
    "split_and",
    "strip_extra_networks",
]
