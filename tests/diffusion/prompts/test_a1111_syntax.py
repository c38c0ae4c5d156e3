"""The A1111 prompt language: a table of prompts with their expected parse (prompts.md §10).

Emphasis pieces, step schedules (A1111 semantics), AND, extra-network tags and malformed input
that must parse as A1111 parses it. Token chunks are in test_a1111_chunks-style tests further down
(they need the CLIP tokenizer, which lives in diffusion/data).
"""
from __future__ import annotations

import math

import pytest

from diffusion.prompts.a1111.schedule import prompt_schedule
from diffusion.prompts.a1111.syntax import (
    BREAK_MARKER,
    ExtraNetworkTag,
    HypernetTag,
    LoraTag,
    hypernet_from_tag,
    lora_from_tag,
    parse_prompt_attention,
    parse_schedule_tree,
    split_and,
    strip_extra_networks,
)

B = BREAK_MARKER

# --- emphasis (prompts.md §10.1) -------------------------------------------------------------
EMPHASIS = [
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.2100000000000002)]),
    ("(((cat)))", [("cat", 1.3310000000000004)]),
    ("[cat]", [("cat", 0.9090909090909091)]),
    ("[[cat]]", [("cat", 0.8264462809917354)]),
    ("((cat:1.5))", [("cat", 1.6500000000000001)]),
    ("(a (b:1.5) c:1.2)", [("a ", 1.2), ("b", 1.7999999999999998), (" c", 1.2)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\] \\ x", [("[cat] \\ x", 1.0)]),
    ("(cat", [("cat", 1.1)]),                        # unclosed -> x1.1
    ("[cat", [("cat", 0.9090909090909091)]),
    ("cat)", [("cat)", 1.0)]),                       # stray closer is text
    ("cat]", [("cat]", 1.0)]),
    ("(cat)(dog)", [("catdog", 1.1)]),               # equal weights merge
    ("[(cat)]", [("cat", 1.0)]),
    ("(a:b:1.3)", [("a:b", 1.3)]),
    ("(a:1e2)", [("a:1e2", 1.1)]),                   # not a weight: digits and dots only
    ("(word:-1)", [("word", -1.0)]),
    ("( word : 0.5 )", [(" word ", 0.5)]),           # spaces before ":" stay in the text
    ("a\\b", [("ab", 1.0)]),                         # lone backslash dropped
    ("", [("", 1.0)]),
    ("a:b", [("a:b", 1.0)]),                         # stray colon
    ("x :1.2) y", [("x :1.2) y", 1.0)]),             # weight closer without opener is text
    ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), B, (",b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),               # BREAK must be a word
    ("a [cat] BREAK BREAK dog", [("a ", 1.0), ("cat", 0.9090909090909091), ("", 1.0), B,
                                 ("", 1.0), B, ("dog", 1.0)]),
    # differences from A1111, on purpose (module docstring):
    ("(a BREAK b)", [("a b", 1.1)]),                 # A1111: the word "break" at weight -1.1
    ("(a:1.3.3)", [("a:1.3.3)", 1.1)]),              # A1111: ValueError
]


def _same_pieces(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    return len(got) == len(want) and all(
        gt == wt and math.isclose(gw, ww, rel_tol=0, abs_tol=1e-9) for (gt, gw), (wt, ww) in zip(got, want))


@pytest.mark.parametrize("prompt, expected", EMPHASIS, ids=[repr(p) for p, _ in EMPHASIS])
def test_emphasis(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_attention(prompt)
    assert _same_pieces(got, expected), got


def test_emphasis_weights_are_repeated_float_products() -> None:
    # exact A1111 values, not a tolerance: 1.1 * 1.1 computed by repeated multiplication
    assert parse_prompt_attention("((x))")[0][1] == 1.1 * 1.1
    assert parse_prompt_attention("[[x]]")[0][1] == (1 / 1.1) * (1 / 1.1)


# --- schedules (prompts.md §10.2) ------------------------------------------------------------
SCHEDULES = [
    ("a [cat:dog:10] photo", 20, [(10, "a cat photo"), (20, "a dog photo")]),
    ("a [cat:dog:0.25]", 20, [(5, "a cat"), (20, "a dog")]),
    ("[cat:dog:1]", 20, [(1, "cat"), (20, "dog")]),                 # integer = step
    ("[cat:dog:1.0]", 20, [(20, "cat")]),                           # fraction 1.0 = never switches
    ("[cat:dog:0]", 20, [(20, "dog")]),
    ("[cat:dog:-1]", 20, [(20, "dog")]),
    ("[cat:dog:25]", 20, [(20, "cat")]),
    ("[cat:dog:2.5]", 20, [(20, "cat")]),
    ("[cat:dog:0.5]", 7, [(3, "cat"), (7, "dog")]),                 # int(3.5)
    ("[cat::5]", 20, [(5, "cat"), (20, "")]),
    ("[dog:5]", 20, [(5, ""), (20, "dog")]),
    ("[cat:1.5]", 20, [(20, "")]),
    ("[cat|dog]", 4, [(1, "cat"), (2, "dog"), (3, "cat"), (4, "dog")]),
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[|x]", 2, [(1, ""), (2, "x")]),
    ("[a|b] [c|d|e]", 6, [(1, "a c"), (2, "b d"), (3, "a e"), (4, "b c"), (5, "a d"), (6, "b e")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("[a:b:5] [c:d:0.5]", 20, [(5, "a c"), (10, "b c"), (20, "b d")]),
    ("(cat:1.2) [dog:fox:3]", 10, [(3, "(cat:1.2) dog"), (10, "(cat:1.2) fox")]),
    ("[cat:(dog:1.2):5]", 10, [(5, "cat"), (10, "(dog:1.2)")]),
    ("[(a:1.1)|[b]]", 2, [(1, "(a:1.1)"), (2, "[b]")]),              # emphasis kept verbatim
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),     # spaces kept
    ("[a:b: 3 ]", 10, [(3, "a"), (10, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),                      # lark SIGNED_NUMBER, no '.'
    ("[a:b:+.5]", 10, [(5, "a"), (10, "b")]),
    (r"[a\:b:c:3]", 10, [(3, r"a\:b"), (10, "c")]),                 # escaped colon is text
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    # malformed: no parse of the construct -> literal text, one entry
    ("[cat:dog:5", 20, [(20, "[cat:dog:5")]),
    ("[a:b:c:3]", 20, [(20, "[a:b:c:3]")]),
    (r"\[cat:dog:5\]", 20, [(20, r"\[cat:dog:5\]")]),
    ("[cat:dog:x]", 20, [(20, "[cat:dog:x]")]),
    ("[cat:dog:5)", 20, [(20, "[cat:dog:5)")]),
    ("[a:(b:5]", 20, [(20, "[a:(b:5]")]),
    ("[[cat:dog:5]", 20, [(5, "[cat"), (20, "[dog")]),             # stray '[' then a schedule
    ("[cat:dog:5]]", 20, [(5, "cat]"), (20, "dog]")]),
    ("a: b) [c:d:2]", 4, [(2, "a: b) c"), (4, "a: b) d")]),         # stray ':' and ')' at top level
    # whole prompt unparsable (a '|' outside an alternation, trailing backslash): no schedule at all
    ("a | [b:c:2]", 4, [(4, "a | [b:c:2]")]),
    ("([a|b] c|d)", 4, [(4, "([a|b] c|d)")]),
    ("[a|b:3]", 4, [(4, "[a|b:3]")]),
    ("[a:b:2] c\\", 4, [(4, "[a:b:2] c\\")]),
    ("", 5, [(5, "")]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULES, ids=[repr(p) for p, _, _ in SCHEDULES])
def test_schedule(prompt: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == expected


def test_schedule_hires_and_old_scheduling() -> None:
    # prompts.md §10.2 #40 / #41
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:15] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:0.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, use_old_scheduling=True) == [(1, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:0.5] c", 10, use_old_scheduling=True) == [(5, "a  c"), (10, "a b c")]


def test_schedule_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)


def test_schedule_tree_shape() -> None:
    tree = parse_schedule_tree("x [a:b:0.5] [c|d]")
    assert tree is not None and len(tree) == 4
    assert parse_schedule_tree("a | b") is None


# --- AND (prompts.md §3.4) -------------------------------------------------------------------
AND_CASES = [
    ("a cat AND a dog:0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("a cat", [("a cat", 1.0)]),
    ("ANDROID", [("ANDROID", 1.0)]),
    ("x AND", [("x", 1.0), ("", 1.0)]),
    ("a:1.5 AND b : -2", [("a", 1.5), (" b", -2.0)]),
    ("a and b", [("a and b", 1.0)]),                 # case-sensitive
]


@pytest.mark.parametrize("prompt, expected", AND_CASES)
def test_split_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected


# --- extra-network tags (prompts.md §10.3) ---------------------------------------------------
TAGS = [
    ("<lora:foo:0.7> a cat", " a cat", [LoraTag("foo", 0.7, 0.7)]),
    ("<lora:foo:0.7:0.3>", "", [LoraTag("foo", 0.7, 0.3)]),
    ("<lora:foo:te=0.5:unet=1.2:dyn=16>", "", [LoraTag("foo", 0.5, 1.2, 16)]),
    ("<lora:foo:0.5:unet=0>", "", [LoraTag("foo", 0.5, 0.0)]),
    ("<lora:foo>", "", [LoraTag("foo", 1.0, 1.0)]),
    ("<lora:my lora:0.8>", "", [LoraTag("my lora", 0.8, 0.8)]),
    ("<lyco:foo:0.4>", "", [LoraTag("foo", 0.4, 0.4)]),
    ("a, <lora:foo:1>, b", "a, , b", [LoraTag("foo", 1.0, 1.0)]),
    ("<lora:a:1><lora:b:0.5> x", " x", [LoraTag("a", 1.0, 1.0), LoraTag("b", 0.5, 0.5)]),
    ("<hypernet:bar:0.5> x", " x", [HypernetTag("bar", 0.5)]),
    ("<hypernet:bar>", "", [HypernetTag("bar", 1.0)]),
    ("<lora-x:y> z", "<lora-x:y> z", []),           # not a tag
    ("a <lora:x:1 b", "a <lora:x:1 b", []),          # unclosed: text
]


@pytest.mark.parametrize("prompt, rest, expected", TAGS, ids=[t[0] for t in TAGS])
def test_extra_network_tags(prompt: str, rest: str, expected: list[object]) -> None:
    text, tags = strip_extra_networks(prompt)
    assert text == rest
    parsed = [lora_from_tag(t) if t.kind in ("lora", "lyco") else hypernet_from_tag(t) for t in tags]
    assert parsed == expected


def test_unknown_tag_type_is_stripped_and_returned() -> None:
    text, tags = strip_extra_networks("<LoRA:foo:1> a <style:x>")
    assert text == " a "
    assert [t.kind for t in tags] == ["LoRA", "style"]
    with pytest.raises(ValueError, match="not a lora tag"):
        lora_from_tag(tags[0])


def test_named_arguments_need_exactly_one_equals() -> None:
    _, (tag,) = strip_extra_networks("<lora:a=b=c:te=0.5>")
    assert tag == ExtraNetworkTag("lora", ("a=b=c",), (("te", "0.5"),), "<lora:a=b=c:te=0.5>")


def test_non_numeric_multiplier_names_the_tag() -> None:
    _, (tag,) = strip_extra_networks("<lora:foo:x>")
    with pytest.raises(ValueError, match=r"<lora:foo:x>.*'x' is not a number"):
        lora_from_tag(tag)


def test_table_size() -> None:
    # the issue asks for at least 40 prompts with their expected parse
    assert len(EMPHASIS) + len(SCHEDULES) + len(AND_CASES) + len(TAGS) >= 40


# --- chunks (prompts.md §10.4, SD1 tokenizer; counts exclude BOS/EOS/padding) ----------------
from diffusion.models.tokenizer import CLIPTokenizer
from diffusion.prompts.a1111.chunks import a1111_layout, materialise

_TOK = CLIPTokenizer()
CHUNKS = [
    ("a photo of a cat", [5]),
    ("cat, " * 40, [75, 5]),                                  # the 76th token is a comma: no backtrack
    ("word " * 70 + ", long tail of nine words here to push over", [71, 9]),   # comma backtrack
    ("word " * 80, [75, 5]),                                  # no comma: plain cut
    ("a BREAK b", [1, 1]),
    ("a [cat] BREAK BREAK dog", [2, 0, 1]),
    ("BREAK a", [0, 1]),
    ("a BREAK", [1]),                                         # trailing BREAK: no empty last chunk
    ("", [0]),
    ("(a BREAK b)", [2]),                                     # bracketed BREAK is not a break
    ("word " * 75 + "BREAK x", [75, 1]),                      # BREAK closes the full chunk, no empty one
]


@pytest.mark.parametrize("prompt, sizes", CHUNKS, ids=[p[:30] for p, _ in CHUNKS])
def test_chunk_sizes(prompt: str, sizes: list[int]) -> None:
    layout = a1111_layout(parse_prompt_attention(prompt), _TOK)
    assert [len(c) for c in layout] == sizes


def test_chunk_ids_and_weights() -> None:
    layout = a1111_layout(parse_prompt_attention("a photo of a (cat:1.3)"), _TOK)
    (chunk,) = materialise(layout, "l", 32, pad=49407)
    assert [t for t, _ in chunk] == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71
    assert [w for _, w in chunk[:7]] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.3, 1.0]
    (g_chunk,) = materialise(layout, "g", 64, pad=0)         # OpenCLIP: 0 after the first EOS
    assert [t for t, _ in g_chunk][5:9] == [2368, 49407, 0, 0]


def test_backtracked_tail_keeps_its_weights() -> None:
    layout = a1111_layout(parse_prompt_attention("word " * 70 + ", (tail:1.5) " + "x " * 8), _TOK)
    assert [len(c) for c in layout] == [71, 9]
    assert layout[0][-1] == (267, 1.0) and layout[1][0] == (_TOK.encode("tail")[0], 1.5)


def test_no_backtrack_when_the_comma_is_far() -> None:
    layout = a1111_layout(parse_prompt_attention("a, " + "word " * 80), _TOK)
    assert [len(c) for c in layout] == [75, 7]
