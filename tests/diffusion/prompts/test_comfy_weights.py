"""ComfyUI weight syntax and embedding words (prompts.md 2.3 and 10.5)."""
from __future__ import annotations

import pytest

from diffusion.prompts.comfy_weights import parse_weights, resolve_embedding_word, split_embedding_words


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.2100000000000002)]),
    ("((cat:1.5))", [("cat", 1.5)]),                                       # #62: absolute, not 1.65
    ("(a (b:1.5) c:1.2)", [("a ", 1.2), ("b", 1.5), (" c", 1.2)]),        # #63
    ("[cat]", [("[cat]", 1.0)]),                                           # #64: no meaning
    ("(cat", [("(cat", 1.0)]),                                             # #65: unmatched (
    ("(a:1e2)", [("a", 100.0)]),                                           # #66
    ("(:1.2)", [(":1.2", 1.1000000000000001)]),                            # #67: colon at 0
    ("(a:)", [("a:", 1.1000000000000001)]),
    ("a) (b", [("a) (b", 1.0)]),                                           # #68: stray )
    ("(word:-1)", [("word", -1.0)]),
    ("(a:b:1.3)", [("a:b", 1.3)]),                                         # last colon
    ("(a:1.3.3)", [("a:1.3.3", 1.1000000000000001)]),                      # not a float
    ("\\(cat\\)", [("(cat)", 1.0)]),                                       # escapes
    ("(\\(x\\):0.5) y", [("(x)", 0.5), (" y", 1.0)]),
    ("\\[a\\]", [("\\[a\\]", 1.0)]),                                       # only \( \) are escapes
    ("(cat)(dog)", [("cat", 1.1000000000000001), ("dog", 1.1000000000000001)]),
    ("a (b (c)) d", [("a ", 1.0), ("b ", 1.1), ("c", 1.2100000000000002), (" d", 1.0)]),
    ("()", []),
    ("", []),
])
def test_parse_weights(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        assert w == pytest.approx(e, abs=1e-9)


def test_stray_close_then_group() -> None:
    """After a stray `)` the depth is negative; a later `(` brings it back to 0 and a group can start."""
    assert parse_weights("a) ((b))") == [("a) (", 1.0), ("b", 1.1), (")", 1.0)]


def test_split_embedding_words() -> None:
    assert split_embedding_words("a embedding:mychar, dog") == ["a", "embedding:mychar, dog"]     # #69
    assert split_embedding_words("a,embedding:mychar") == ["a,embedding:mychar"]                 # #70
    assert split_embedding_words("embedding:mychar") == ["embedding:mychar"]                     # #71
    assert split_embedding_words("x\nembedding:a embedding:b c") == ["x", "embedding:a", "embedding:b c"]
    assert split_embedding_words("Embedding:x") == ["Embedding:x"]        # case-sensitive


def test_resolve_embedding_word() -> None:
    known = {"mychar": "E1", "sub/neg": "E2"}
    r = resolve_embedding_word("embedding:mychar, dog", known.get)
    assert (r.name, r.embedding, r.leftover) == ("mychar", "E1", ", dog")
    r = resolve_embedding_word("embedding:sub/neg", known.get)
    assert (r.name, r.embedding, r.leftover) == ("sub/neg", "E2", "")
    r = resolve_embedding_word("embedding:nosuch cat", known.get)                # #73
    assert (r.name, r.embedding, r.leftover) == ("nosuch", None, "cat")
    r = resolve_embedding_word("embedding:mychar,,", known.get)
    assert (r.embedding, r.leftover) == ("E1", ",,")
    with pytest.raises(ValueError, match="embedding:"):
        resolve_embedding_word("mychar", known.get)
