"""UI (litegraph) workflow -> API prompt, the way the ComfyUI frontend's `graphToPrompt` does it.

A UI file (schema 0.4 or 1) stores nodes with positional `widgets_values` and numbered links; the
API format (`workflows.md` section 1) is `{id: {"class_type", "inputs", "_meta"}}` with links as
`[source_id, slot]`. The conversion needs the node definitions of `/object_info` to know which
inputs are widgets and in which order they were created (`input_order`), and which widgets carry a
hidden companion value (the `control_after_generate` mode after a seed, the upload button after
an image combo) that is stored in `widgets_values` but never sent.

Rules (workflows.md section 3):
- PrimitiveNode's value becomes the literal of every input it feeds; it is never sent.
- Reroute is followed to its own source; Note and MarkdownNote are dropped; groups are drawing only.
- mode 2 (muted): not sent, consumers lose that input; mode 4 (bypassed): not sent, consumers are
  rewired to one of its inputs chosen by type.
- subgraph instances are replaced by their definition's nodes, ids joined with ":" ("60:11").
Anything that cannot be converted raises `UIWorkflowError` naming the node and the problem.

Reading the file is `graph/ui_parse.py`'s job and naming the widget values `graph/ui_widgets.py`'s;
this file follows links through the nodes that are not sent and emits the API prompt. The public
names of all three are importable from here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .ui_parse import (SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE, Frame, Graph, Link, UIWorkflowError, collect_subgraphs,
                       is_ui_workflow, parse_graph)
from .ui_widgets import WidgetSlot, map_widget_values, widget_slots

__all__ = ["Frame", "Graph", "Link", "Literal", "UIWorkflowError", "WidgetSlot", "is_ui_workflow", "map_widget_values",
           "types_compatible", "ui_to_api", "widget_slots"]

VIRTUAL_TYPES = frozenset({"PrimitiveNode", "Reroute"})
IGNORED_TYPES = frozenset({"Note", "MarkdownNote"})
MODE_MUTED, MODE_BYPASS = 2, 4


# ---------------------------------------------------------------------------------------------
# Link resolution through virtual, muted, bypassed and subgraph nodes


def types_compatible(a: object, b: object) -> bool:
    """Equal ignoring case, either side `*`/empty, or sharing a member of a comma-separated list."""
    sa = a if isinstance(a, str) else ""
    sb = b if isinstance(b, str) else ""
    if sa in ("", "*") or sb in ("", "*"):
        return True
    if sa.lower() == sb.lower():
        return True
    left = {t.strip().lower() for t in sa.split(",")}
    right = {t.strip().lower() for t in sb.split(",")}
    return bool(left & right)


def _node_label(frame: Frame, node: Mapping[str, Any]) -> str:
    return f"node {frame.record_id(node['id'])} ({node.get('type')})"


def _bypass_input(node: Mapping[str, Any], out_slot: int, target_type: object) -> int | None:
    """Which input of a bypassed node stands in for its output `out_slot` (workflows.md 3.4b)."""
    inputs = node.get("inputs") or []
    if not inputs:
        return None
    outputs = node.get("outputs") or []
    out_type = outputs[out_slot].get("type") if out_slot < len(outputs) else "*"
    if not isinstance(target_type, str) or target_type in ("", "*"):
        return out_slot if out_slot < len(inputs) else 0
    if out_slot < len(inputs):
        t = inputs[out_slot].get("type")
        if types_compatible(t, out_type) and types_compatible(t, target_type):
            return out_slot
    for i, inp in enumerate(inputs):
        if inp.get("type") == target_type:
            return i
    for i, inp in enumerate(inputs):
        t = inp.get("type")
        if types_compatible(t, out_type) and types_compatible(t, target_type):
            return i
    return None


class _Converter:
    def __init__(self, workflow: Mapping[str, Any], definitions: Mapping[str, Mapping[str, Any]]):
        self.definitions = definitions
        self.root = parse_graph(workflow, "workflow")
        self.subgraphs: dict[str, Graph] = {}
        collect_subgraphs(workflow, self.subgraphs)

    # -- resolution --------------------------------------------------------------------------

    def link(self, frame: Frame, link_id: object, node: Mapping[str, Any], what: str) -> Link:
        try:
            link = frame.graph.links[int(link_id)]  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise UIWorkflowError(f"{_node_label(frame, node)} {what}: link {link_id} does not exist "
                                  f"in the {frame.graph.name} (dangling link)",
                                  frame.record_id(node["id"])) from None
        return link

    def resolve_link(self, frame: Frame, link: Link, target_type: object,
                     seen: frozenset[tuple[str, int]] = frozenset()) -> object:
        """Follow a link to the emitted source: `[record_id, slot]`, a `Literal`, or None."""
        key = (":".join(frame.path), link.id)
        if key in seen:
            raise UIWorkflowError(f"link {link.id} in the {frame.graph.name} loops back on itself "
                                  "through reroute or bypassed nodes")
        seen = seen | {key}
        if link.origin_id == SUBGRAPH_INPUT_NODE:
            return self.resolve_subgraph_input(frame, link.origin_slot, target_type, seen)
        source = frame.graph.nodes.get(link.origin_id)
        if source is None:
            target = frame.graph.nodes.get(link.target_id, {"id": link.target_id, "type": "?"})
            raise UIWorkflowError(f"{_node_label(frame, target)}: link {link.id} comes from node "
                                  f"{link.origin_id}, which is not in the {frame.graph.name} "
                                  "(dangling link)", frame.record_id(link.target_id))
        return self.resolve_output(frame, source, link.origin_slot, target_type, seen)

    def resolve_output(self, frame: Frame, node: Mapping[str, Any], slot: int, target_type: object,
                       seen: frozenset[tuple[str, int]]) -> object:
        mode = node.get("mode", 0)
        ntype = node.get("type")
        if mode == MODE_MUTED or ntype in IGNORED_TYPES:
            return None
        if ntype == "PrimitiveNode":
            # applyToGraph: the value goes into the widget of whatever it feeds, through reroutes,
            # bypassed nodes and subgraph inputs alike.
            values = node.get("widgets_values")
            values = list(values.values()) if isinstance(values, dict) else values
            return Literal(values[0]) if values else None
        if mode == MODE_BYPASS:
            idx = _bypass_input(node, slot, target_type)
            if idx is None:
                return None
            return self.resolve_input(frame, node, idx, target_type, seen)
        if ntype == "Reroute":
            return self.resolve_input(frame, node, 0, target_type, seen)
        sub = self.subgraphs.get(str(ntype))
        if sub is not None:
            inner = Frame(sub, (*frame.path, str(node["id"])), frame, dict(node))
            for link in sub.links.values():
                if link.target_id == SUBGRAPH_OUTPUT_NODE and link.target_slot == slot:
                    return self.resolve_link(inner, link, target_type, seen)
            return None
        return [frame.record_id(node["id"]), int(slot)]

    def resolve_input(self, frame: Frame, node: Mapping[str, Any], index: int, target_type: object,
                      seen: frozenset[tuple[str, int]]) -> object:
        inputs = node.get("inputs") or []
        if index >= len(inputs) or inputs[index].get("link") is None:
            return None
        link = self.link(frame, inputs[index]["link"], node, f"input {inputs[index].get('name')!r}")
        return self.resolve_link(frame, link, target_type, seen)

    def resolve_subgraph_input(self, frame: Frame, slot: int, target_type: object,
                               seen: frozenset[tuple[str, int]]) -> object:
        instance, parent = frame.instance, frame.parent
        if instance is None or parent is None:
            raise UIWorkflowError(f"a link in the {frame.graph.name} starts at a subgraph input node "
                                  "outside of any subgraph")
        name = frame.graph.inputs[slot].get("name") if slot < len(frame.graph.inputs) else None
        inst_inputs = instance.get("inputs") or []
        index = next((i for i, inp in enumerate(inst_inputs) if name is not None
                      and inp.get("name") == name), slot if slot < len(inst_inputs) else None)
        if index is None:
            return None
        inp = inst_inputs[index]
        if inp.get("link") is not None:
            link = self.link(parent, inp["link"], instance, f"input {inp.get('name')!r}")
            return self.resolve_link(parent, link, target_type, seen)
        if isinstance(inp.get("widget"), dict):
            found, value = self.instance_widget_value(instance, inp["widget"].get("name"))
            if found:
                return Literal(value)
        return None

    @staticmethod
    def instance_widget_value(instance: Mapping[str, Any], name: object) -> tuple[bool, Any]:
        """A promoted widget's value on a subgraph instance (by name, else by widget position)."""
        for source in (instance.get("widgets_values_named"), instance.get("widgets_values")):
            if isinstance(source, dict) and name in source:
                return True, source[name]
        values = instance.get("widgets_values")
        if isinstance(values, list):
            names = [i["widget"].get("name") for i in instance.get("inputs") or []
                     if isinstance(i.get("widget"), dict)]
            if name in names and names.index(name) < len(values):
                return True, values[names.index(name)]
        return False, None

    # -- emission ----------------------------------------------------------------------------

    def emit_graph(self, frame: Frame, prompt: dict[str, Any]) -> None:
        for nid, node in frame.graph.nodes.items():
            ntype = str(node.get("type"))
            mode = node.get("mode", 0)
            if mode in (MODE_MUTED, MODE_BYPASS) or ntype in VIRTUAL_TYPES or ntype in IGNORED_TYPES:
                continue
            sub = self.subgraphs.get(ntype)
            if sub is not None:
                self.emit_graph(Frame(sub, (*frame.path, str(nid)), frame, dict(node)), prompt)
                continue
            prompt[frame.record_id(nid)] = self.emit_node(frame, node)

    def emit_node(self, frame: Frame, node: Mapping[str, Any]) -> dict[str, Any]:
        ntype = str(node["type"])
        rid = frame.record_id(node["id"])
        definition = self.definitions.get(ntype)
        if definition is None:
            if ">" in ntype or ntype.startswith("workflow/"):
                raise UIWorkflowError(f"{_node_label(frame, node)} is a legacy group node; open and "
                                      "save the workflow in a current ComfyUI frontend first", rid)
            raise UIWorkflowError(f"{_node_label(frame, node)}: unknown node type {ntype!r} (not a "
                                  "built-in node, a loaded plugin node or a subgraph definition)", rid)
        inputs: dict[str, Any] = {}
        for name, value in map_widget_values(node, definition).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for index, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is None:
                continue
            name = inp["widget"].get("name") if isinstance(inp.get("widget"), dict) else inp.get("name")
            link = self.link(frame, inp["link"], node, f"input {name!r}")
            source = self.resolve_link(frame, link, inp.get("type", "*"))
            if isinstance(source, Literal):
                inputs[name] = {"__value__": source.value} if isinstance(source.value, list) \
                    else source.value
            elif source is not None:
                inputs[name] = source
            elif inp.get("widget") is None:
                inputs.pop(name, None)
        title = node.get("title") or definition.get("display_name") or ntype
        meta: dict[str, Any] = {"title": title}
        props = node.get("properties") or {}
        for key in ("cnr_id", "aux_id", "ver"):
            if isinstance(props.get(key), str) and props[key]:
                meta[key] = props[key]
        return {"class_type": ntype, "inputs": inputs, "_meta": meta}


@dataclass(frozen=True)
class Literal:
    """A constant reached through a link: a PrimitiveNode's value or a promoted subgraph widget."""

    value: Any


def ui_to_api(workflow: Mapping[str, Any], definitions: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Convert a UI-format workflow to an API prompt using `/object_info` definitions."""
    if not is_ui_workflow(workflow):
        raise UIWorkflowError("not a UI-format workflow: expected an object with 'nodes' and 'links'")
    if isinstance(workflow.get("extra"), dict) and workflow["extra"].get("groupNodes"):
        names = ", ".join(sorted(workflow["extra"]["groupNodes"]))
        raise UIWorkflowError(f"legacy group nodes ({names}) are not supported; convert them to "
                              "subgraphs in a current ComfyUI frontend first")
    conv = _Converter(workflow, definitions)
    root = Frame(conv.root, ())
    prompt: dict[str, Any] = {}
    conv.emit_graph(root, prompt)
    # A link whose source was not emitted (e.g. an unknown virtual node) is dropped.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) \
                    and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt
