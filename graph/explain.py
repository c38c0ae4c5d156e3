"""Why did a node run instead of coming from the cache?

The executor keeps, per node id, a record of the last signature inputs it saw; when a node runs,
comparing that record with the current one names the input, upstream node or IS_CHANGED value
that changed, or says the entry was evicted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class NodeRecord(NamedTuple):
    """What a node's signature was made of (a NamedTuple: one is built per node per run)."""

    class_type: str
    literals: Mapping[str, Any]
    links: Mapping[str, tuple[str, str]]   # input name -> (source node id, output signature)
    changed: str | None                    # repr of IS_CHANGED's value
    signature: str


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def explain(prev: NodeRecord | None, cur: NodeRecord, evicted: bool, always: bool) -> list[str]:
    """Reasons, most specific first, that `cur` could not be served from the cache."""
    if prev is None:
        return ["first run of this node (no cached output for these inputs)"]
    if prev.class_type != cur.class_type:
        return [f"class changed from {prev.class_type} to {cur.class_type}"]
    reasons: list[str] = []
    for name in sorted(set(prev.literals) | set(cur.literals)):
        old, new = prev.literals.get(name, "<absent>"), cur.literals.get(name, "<absent>")
        if old != new:
            reasons.append(f"input {name!r} changed: {_short(old)} -> {_short(new)}")
    for name in sorted(set(prev.links) | set(cur.links)):
        old_link, new_link = prev.links.get(name), cur.links.get(name)
        if old_link != new_link:
            if new_link is None or old_link is None or old_link[0] != new_link[0]:
                reasons.append(f"input {name!r} was relinked")
            else:
                reasons.append(f"input {name!r}: upstream node {new_link[0]} produced a new value")
    if always:
        reasons.append("IS_CHANGED says always re-run (NaN, unhashable or raised)")
    elif prev.changed != cur.changed:
        reasons.append(f"IS_CHANGED returned a new value: {prev.changed} -> {cur.changed}")
    if not reasons:
        if evicted:
            reasons.append("its cached output was evicted (cache bounds)")
        else:
            reasons.append("no cached output (cache cleared, or the last run of it did not finish)")
    return reasons
