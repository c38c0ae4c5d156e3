"""Reading the shapes of a UI workflow file: both link forms, subgraph definitions, bad entries."""
from __future__ import annotations

import pytest

from graph.ui_parse import Link, UIWorkflowError, collect_subgraphs, parse_graph, parse_link


def test_both_link_forms() -> None:
    assert parse_link([1, 2, 0, 3, 1, "MODEL"], "w") == Link(1, 2, 0, 3, 1, "MODEL")
    assert parse_link([1, 2, 0, 3, 1], "w").type == "*"
    assert parse_link({"id": 1, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 1}, "w") \
        == Link(1, 2, 0, 3, 1, "*")
    with pytest.raises(UIWorkflowError, match="w: malformed link"):
        parse_link([1, 2], "w")


def test_graph_nodes_and_bad_ids() -> None:
    graph = parse_graph({"nodes": [{"id": "4", "type": "A"}], "links": [None, [1, 4, 0, 5, 0, "X"]]}, "workflow")
    assert list(graph.nodes) == [4] and list(graph.links) == [1]
    with pytest.raises(UIWorkflowError, match="appears twice"):
        parse_graph({"nodes": [{"id": 1, "type": "A"}, {"id": 1, "type": "B"}]}, "workflow")
    with pytest.raises(UIWorkflowError, match="not an integer"):
        parse_graph({"nodes": [{"id": "x", "type": "A"}]}, "workflow")


def test_nested_subgraph_definitions() -> None:
    inner = {"id": "b", "nodes": [], "links": []}
    outer = {"id": "a", "name": "Outer", "nodes": [], "links": [], "definitions": {"subgraphs": [inner]}}
    found: dict = {}
    collect_subgraphs({"definitions": {"subgraphs": [outer]}}, found)
    assert set(found) == {"a", "b"} and found["a"].name == "Outer"
