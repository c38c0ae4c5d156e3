"""API-format workflows: `{node_id: {"class_type": str, "inputs": {name: literal | [src_id, slot]}}}`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class WorkflowFormatError(ValueError):
    """The workflow file or body is not an API-format graph."""


@dataclass(frozen=True)
class Link:
    source: str
    slot: int


def is_link(value: Any) -> bool:
    """ComfyUI's rule: a 2-list whose first item is a str and second an int (or integral float)."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


def as_link(value: Any) -> Link | None:
    if is_link(value):
        return Link(value[0], int(value[1]))
    return None


def unwrap_literal(value: Any) -> Any:
    """`{"__value__": [...]}` carries a literal list; any other value is itself."""
    if isinstance(value, dict) and "__value__" in value:
        return value["__value__"]
    return value


def check_api_prompt(prompt: Any) -> dict[str, dict[str, Any]]:
    """Check the outer shape of an API-format prompt and return it with string node ids.

    Node-level problems (unknown class, bad inputs) are left to validation; this only rejects
    bodies that are not a graph at all.
    """
    if not isinstance(prompt, Mapping):
        raise WorkflowFormatError(
            f"an API-format workflow is a JSON object of nodes, found {type(prompt).__name__}")
    if not prompt:
        raise WorkflowFormatError("the workflow has no nodes")
    if "nodes" in prompt and "links" in prompt and isinstance(prompt.get("nodes"), list):
        raise WorkflowFormatError("this is a UI-format workflow (nodes/links), not API format")
    out: dict[str, dict[str, Any]] = {}
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping):
            raise WorkflowFormatError(
                f"node {node_id!r} must be an object with class_type and inputs, found {type(node).__name__}")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping):
            raise WorkflowFormatError(
                f"node {node_id!r}: inputs must be an object, found {type(inputs).__name__}")
        out[str(node_id)] = dict(node)
    return out


def node_links(node: Mapping[str, Any]) -> list[tuple[str, Link]]:
    """(input name, link) for every linked input of a node."""
    links = []
    for name, value in node.get("inputs", {}).items():
        link = as_link(value)
        if link is not None:
            links.append((name, link))
    return links


def title(prompt: Mapping[str, Any], node_id: str) -> str:
    meta = prompt.get(node_id, {}).get("_meta") or {}
    return str(meta.get("title") or f"ID #{node_id}")
