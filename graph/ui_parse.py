"""Reading a UI (litegraph) workflow file into graphs, links and subgraph definitions.

A UI file (schema 0.4 or 1) stores nodes by integer id and links either as arrays
`[id, origin_id, origin_slot, target_id, target_slot, type]` (0.4) or as objects with those keys
(1); subgraph definitions live under `definitions.subgraphs`, nested ones inside them. Parsing
checks only the shape (ids, link fields); what the nodes mean is `graph/ui_format.py`'s job.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# the pseudo node ids a subgraph definition's links use for its own inputs and outputs
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = -10, -20


class UIWorkflowError(ValueError):
    """A UI-format workflow that cannot be converted; the message names the node and the problem."""

    def __init__(self, message: str, node_id: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id


def is_ui_workflow(data: object) -> bool:
    """True for a litegraph (UI) workflow object: it has a `nodes` list (API prompts never do)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


@dataclass(frozen=True)
class Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: str


@dataclass(frozen=True)
class Graph:
    """One litegraph graph: the root workflow or a subgraph definition."""

    nodes: dict[int, dict[str, Any]]
    links: dict[int, Link]
    inputs: list[dict[str, Any]] = field(default_factory=list)    # subgraph definition inputs
    outputs: list[dict[str, Any]] = field(default_factory=list)   # subgraph definition outputs
    name: str = "workflow"


@dataclass(frozen=True)
class Frame:
    """Where a graph sits: the chain of instance ids above it, and the instance in the parent."""

    graph: Graph
    path: tuple[str, ...]
    parent: Frame | None = None
    instance: dict[str, Any] | None = None     # the subgraph-instance node in the parent graph

    def record_id(self, node_id: int | str) -> str:
        return ":".join((*self.path, str(node_id)))


def parse_link(raw: object, where: str) -> Link:
    """One link in either stored form; `where` names the graph in the error."""
    try:
        if isinstance(raw, dict):
            return Link(int(raw["id"]), int(raw["origin_id"]), int(raw["origin_slot"]),
                        int(raw["target_id"]), int(raw["target_slot"]), str(raw.get("type", "*")))
        if isinstance(raw, (list, tuple)) and len(raw) >= 5:
            typ = raw[5] if len(raw) > 5 else "*"
            return Link(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]),
                        typ if isinstance(typ, str) else "*")
    except (KeyError, TypeError, ValueError):
        pass
    raise UIWorkflowError(f"{where}: malformed link {raw!r} (expected [id, origin_id, origin_slot, "
                          "target_id, target_slot, type] or an object with those keys)")


def parse_graph(data: Mapping[str, Any], name: str) -> Graph:
    """The nodes (by integer id) and links of one graph; null link entries are skipped."""
    nodes: dict[int, dict[str, Any]] = {}
    for raw in data.get("nodes") or []:
        if not isinstance(raw, dict) or "id" not in raw or "type" not in raw:
            raise UIWorkflowError(f"{name}: node entry {str(raw)[:80]!r} has no 'id' or 'type'")
        try:
            nid = int(raw["id"])
        except (TypeError, ValueError):
            raise UIWorkflowError(f"{name}: node id {raw['id']!r} is not an integer") from None
        if nid in nodes:
            raise UIWorkflowError(f"{name}: node id {nid} appears twice", str(nid))
        nodes[nid] = raw
    links = {}
    for raw in data.get("links") or []:
        if raw is None:
            continue
        link = parse_link(raw, name)
        links[link.id] = link
    return Graph(nodes, links, list(data.get("inputs") or []), list(data.get("outputs") or []),
                 str(data.get("name") or name))


def collect_subgraphs(data: Mapping[str, Any], into: dict[str, Graph]) -> None:
    """Every subgraph definition under `data`, nested ones too, by definition id (a node's type)."""
    defs = data.get("definitions") or {}
    for sub in defs.get("subgraphs") or []:
        if not isinstance(sub, dict) or "id" not in sub:
            raise UIWorkflowError("definitions.subgraphs holds an entry without an 'id'")
        into[str(sub["id"])] = parse_graph(sub, f"subgraph {sub.get('name') or sub['id']!r}")
        collect_subgraphs(sub, into)
