"""`comfy_execution.graph_utils` for plugins: GraphBuilder, is_link, ExecutionBlocker.

A node may return `{"result": (...), "expand": GraphBuilder.finalize()}` to add nodes at run time
(protocol.md 6.7); whether the executor runs such expansions is up to `graph/executor.py`.
"""
from __future__ import annotations

from typing import Any

from graph.runtime import ExecutionBlocker  # the executor recognises this class

__all__ = ["ExecutionBlocker", "GraphBuilder", "is_link"]


def is_link(obj: Any) -> bool:
    """A 2-list whose first item is a str (node id) and second an int/float (output slot)."""
    return (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], (int, float)) and not isinstance(obj[1], bool))




class Node:
    def __init__(self, node_id: str, class_type: str, inputs: dict[str, Any]) -> None:
        self.id = node_id
        self.class_type = class_type
        self.inputs = inputs
        self.override_display_id: str | None = None

    def out(self, index: int) -> list[Any]:
        return [self.id, index]

    def set_input(self, key: str, value: Any) -> None:
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_input(self, key: str) -> Any:
        return self.inputs.get(key)

    def set_override_display_id(self, override_display_id: str) -> None:
        self.override_display_id = override_display_id

    def serialize(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class_type": self.class_type, "inputs": self.inputs}
        if self.override_display_id is not None:
            out["override_display_id"] = self.override_display_id
        return out


class GraphBuilder:
    """Builds an API-format graph; ids get a unique prefix `"<root>.<call>.<graph>."`."""

    _default_prefix_root = ""
    _default_prefix_call_index = 0
    _default_prefix_graph_index = 0

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = GraphBuilder.alloc_prefix() if prefix is None else prefix
        self.nodes: dict[str, Node] = {}
        self.id_gen = 1

    @classmethod
    def set_default_prefix(cls, prefix_root: str, call_index: int, graph_index: int = 0) -> None:
        cls._default_prefix_root = prefix_root
        cls._default_prefix_call_index = call_index
        cls._default_prefix_graph_index = graph_index

    @classmethod
    def alloc_prefix(cls, root: str | None = None, call_index: int | None = None,
                     graph_index: int | None = None) -> str:
        root = cls._default_prefix_root if root is None else root
        call_index = cls._default_prefix_call_index if call_index is None else call_index
        if graph_index is None:
            graph_index = cls._default_prefix_graph_index
            cls._default_prefix_graph_index += 1
        return f"{root}.{call_index}.{graph_index}."

    def node(self, class_type: str, id: str | None = None, **kwargs: Any) -> Node:  # noqa: A002
        if id is None:
            id = str(self.id_gen)
            self.id_gen += 1
        full = self.prefix + id
        if full in self.nodes:
            return self.nodes[full]
        node = Node(full, class_type, kwargs)
        self.nodes[full] = node
        return node

    def lookup_node(self, id: str) -> Node | None:  # noqa: A002
        return self.nodes.get(self.prefix + id)

    def remove_node(self, id: str) -> None:  # noqa: A002
        self.nodes.pop(self.prefix + id, None)

    def replace_node_output(self, node_id: str, index: int, new_value: Any) -> None:
        """Point every input linked to output `index` of `node_id` at `new_value` instead."""
        full = self.prefix + node_id
        for node in self.nodes.values():
            for key, value in list(node.inputs.items()):
                if is_link(value) and value[0] == full and value[1] == index:
                    node.set_input(key, new_value)

    def finalize(self) -> dict[str, Any]:
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}
