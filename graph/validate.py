"""Validate an API-format prompt before anything runs (protocol.md 3.1).

Everything is checked up front: unknown classes, missing or ill-typed inputs, out-of-range
numbers, combo values not in the list, links to missing nodes or slots, cycles, and the absence
of output nodes. Nothing here recurses per node, so graphs of any depth validate.
"""
from __future__ import annotations

import traceback
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx

from .errors import InputError, ValidationReport, input_error, prompt_error
from .nodespec import InputSpec, NodeSpec, SpecTable
from .workflow import as_link, is_link, title, unwrap_literal

MAX_LISTED_CHOICES = 20


def _type_set(kind: Any) -> frozenset[str]:
    if isinstance(kind, (list, tuple)):
        return frozenset({"COMBO"})
    return frozenset(part.strip() for part in str(kind).split(","))


def types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's link rule: `*` matches anything, comma-separated types are unions."""
    got, want = _type_set(received), _type_set(expected)
    return "*" in got or "*" in want or bool(got & want)


def type_name(kind: Any) -> str:
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def _coerce(value: Any, kind: str) -> Any:
    if kind == "INT":
        if isinstance(value, float) and not value.is_integer():
            return int(value)
        return int(value)
    if kind == "FLOAT":
        return float(value)
    if kind == "STRING":
        return str(value)
    if kind == "BOOLEAN":
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off", ""):
            return False
        return bool(value)
    return value


def _check_literal(spec: InputSpec, value: Any, node: NodeSpec) -> tuple[Any, InputError | None]:
    """Coerce one literal and check its range or choices; (coerced value, error or None)."""
    name = spec.name
    checked_by_node = node.validate_takes_all or (node.validate_params is not None and name in node.validate_params)
    kind = spec.type
    if isinstance(kind, list):
        if checked_by_node or spec.options.get("multi_select"):
            return value, None
        if value not in kind:
            shown = kind if len(kind) <= MAX_LISTED_CHOICES else f"(list of length {len(kind)})"
            return value, input_error(
                "value_not_in_list", "Value not in list", f"{name}: {value!r} not in {shown}",
                name, input_config=None if len(kind) > MAX_LISTED_CHOICES else [kind, dict(spec.options)],
                received_value=value)
        return value, None
    if kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
        try:
            value = _coerce(value, kind)
        except (TypeError, ValueError, OverflowError) as exc:
            return value, input_error(
                "invalid_input_type", f"Failed to convert an input value to a {kind} value",
                f"{name}, {value!r}, {exc}", name, input_config=[kind, dict(spec.options)],
                received_value=value)
        if kind in ("INT", "FLOAT") and not checked_by_node:
            lo, hi = spec.options.get("min"), spec.options.get("max")
            if lo is not None and value < lo:
                return value, input_error("value_smaller_than_min", f"Value {value} smaller than min of {lo}",
                                          name, name, input_config=[kind, dict(spec.options)], received_value=value)
            if hi is not None and value > hi:
                return value, input_error("value_bigger_than_max", f"Value {value} bigger than max of {hi}",
                                          name, name, input_config=[kind, dict(spec.options)], received_value=value)
    return value, None


def validate_node(node_id: str, node: Mapping[str, Any], spec: NodeSpec,
                   prompt: Mapping[str, Mapping[str, Any]], specs: SpecTable,
                   report: ValidationReport) -> None:
    inputs = node.get("inputs", {})
    literals: dict[str, Any] = {}
    linked_types: dict[str, str] = {}
    errors: list[InputError] = []
    for name, ispec in spec.inputs.items():
        if name not in inputs:
            if ispec.section == "required":
                errors.append(input_error("required_input_missing", "Required input is missing", name, name))
            continue
        raw = inputs[name]
        link = as_link(raw)
        if link is not None:
            source = prompt.get(link.source)
            if source is None:
                errors.append(input_error(
                    "bad_linked_input", "Bad linked input",
                    f"{name}: linked node {link.source!r} does not exist", name, linked_node=[link.source, link.slot]))
                continue
            source_spec = specs.get(str(source.get("class_type")))
            if source_spec is None:
                continue  # reported at the source node
            if not 0 <= link.slot < len(source_spec.return_types):
                errors.append(input_error(
                    "bad_linked_input", "Bad linked input",
                    f"{name}: node {link.source!r} ({source_spec.class_type}) has no output {link.slot} "
                    f"(it has {len(source_spec.return_types)})", name, linked_node=[link.source, link.slot]))
                continue
            received = source_spec.return_types[link.slot]
            linked_types[name] = type_name(received)
            if not spec.validate_input_types and not types_match(received, ispec.type):
                errors.append(input_error(
                    "return_type_mismatch", "Return type mismatch between linked nodes",
                    f"{name}, received_type({type_name(received)}) mismatch input_type({type_name(ispec.type)})",
                    name, received_type=type_name(received), linked_node=[link.source, link.slot]))
            continue
        if isinstance(raw, list) and len(raw) == 2 and isinstance(raw[1], int) and isinstance(raw[0], int):
            errors.append(input_error(
                "bad_linked_input", "Bad linked input",
                f"{name}: a link is [\"<node id as string>\", output_index], found {raw!r}", name,
                received_value=raw))
            continue
        value, err = _check_literal(ispec, unwrap_literal(raw), spec)
        if err is not None:
            errors.append(err)
        else:
            literals[name] = value
    if not errors and spec.validate_params is not None:
        errors.extend(_custom_validation(spec, inputs, literals, linked_types))
    for err in errors:
        report.add(node_id, spec.class_type, err)
    if not errors:
        report.literals[node_id] = literals


def _custom_validation(spec: NodeSpec, inputs: Mapping[str, Any], literals: Mapping[str, Any],
                       linked_types: Mapping[str, str]) -> list[InputError]:
    names = set(spec.inputs) if spec.validate_takes_all else set(spec.validate_params or ())
    kwargs: dict[str, Any] = {}
    for name in names:
        if name == "input_types":
            kwargs[name] = dict(linked_types)
        elif name in literals:
            kwargs[name] = literals[name]
        elif name in inputs:
            kwargs[name] = None
    try:
        result = spec.cls.VALIDATE_INPUTS(**kwargs)
    except Exception as exc:  # a plugin's validation raising is reported, never propagated
        return [input_error("exception_during_validation", "Exception when validating node", str(exc),
                            exception_type=type(exc).__name__, traceback=traceback.format_exc().splitlines())]
    if result is True:
        return []
    named = sorted(n for n in names if n != "input_types")
    details = ", ".join(named) + (f" - {result}" if isinstance(result, str) else "")
    return [input_error("custom_validation_failed", "Custom validation failed for node", details,
                        named[0] if len(named) == 1 else None)]


def _needed(prompt: Mapping[str, Mapping[str, Any]], roots: Iterable[str]) -> list[str]:
    """Roots plus every node they (transitively) link to, breadth first."""
    seen: dict[str, None] = {}
    queue = deque(roots)
    for r in roots:
        seen[r] = None
    while queue:
        node_id = queue.popleft()
        for value in prompt[node_id].get("inputs", {}).values():
            if is_link(value) and value[0] in prompt and value[0] not in seen:
                seen[value[0]] = None
                queue.append(value[0])
    return list(seen)


def _has_cycle(prompt: Mapping[str, Mapping[str, Any]], nodes: Sequence[str]) -> bool:
    """Iterative three-colour depth-first search over the links among `nodes`."""
    state: dict[str, int] = {}          # 1 = on the current path, 2 = done
    for root in nodes:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(prompt[root].get("inputs", {}).values()))]
        while stack:
            node_id, it = stack[-1]
            for value in it:
                if is_link(value) and value[0] in prompt:
                    mark = state.get(value[0])
                    if mark == 1:
                        return True
                    if mark is None:
                        state[value[0]] = 1
                        stack.append((value[0], iter(prompt[value[0]].get("inputs", {}).values())))
                        break
            else:
                state[node_id] = 2
                stack.pop()
    return False


def _cycles(prompt: Mapping[str, Mapping[str, Any]], nodes: Sequence[str]) -> list[list[str]]:
    """Every cycle among `nodes`, one path each (networkx only when there is one to describe)."""
    if not _has_cycle(prompt, nodes):
        return []
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    for node_id in nodes:
        for value in prompt[node_id].get("inputs", {}).values():
            if is_link(value) and value[0] in prompt:
                graph.add_edge(value[0], node_id)
    cycles = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1 or any(graph.has_edge(n, n) for n in component):
            sub = graph.subgraph(component)
            cycles.append([u for u, _ in nx.find_cycle(sub)])
    return cycles


def validate_prompt(prompt: Mapping[str, Mapping[str, Any]], specs: SpecTable,
                    targets: Sequence[str] | None = None) -> ValidationReport:
    """Check the whole prompt; the report says which outputs can run and with which literals."""
    report = ValidationReport()
    for node_id, node in prompt.items():
        class_type = node.get("class_type")
        if not class_type:
            report.error = prompt_error(
                "missing_node_type", f"Node '{title(prompt, node_id)}' has no class_type. The workflow may be corrupted or a custom node may be missing.",
                f"Node ID '#{node_id}'", node_id=node_id, class_type=None, node_title=title(prompt, node_id))
            return report
        try:
            spec = specs.get(str(class_type))
        except Exception as exc:
            report.add(node_id, str(class_type), input_error(
                "exception_during_validation", "Exception when validating node",
                f"INPUT_TYPES of {class_type} raised {type(exc).__name__}: {exc}",
                exception_type=type(exc).__name__, traceback=traceback.format_exc().splitlines()))
            continue
        if spec is None:
            report.error = prompt_error(
                "missing_node_type", f"Node '{title(prompt, node_id)}' not found. The custom node may not be installed.",
                f"Node ID '#{node_id}'", node_id=node_id, class_type=class_type, node_title=title(prompt, node_id))
            return report

    if targets:
        unknown = [t for t in targets if t not in prompt]
        if unknown:
            report.error = prompt_error("prompt_no_outputs", "Prompt has no outputs",
                                        f"target node(s) not in the prompt: {', '.join(unknown)}")
            return report
        roots = [str(t) for t in targets]
    else:
        roots = [nid for nid, node in prompt.items()
                 if (s := specs.get(str(node["class_type"]))) is not None and s.output_node]
    if not roots:
        report.error = prompt_error("prompt_no_outputs", "Prompt has no outputs",
                                    "no node of an output class (SaveImage, PreviewImage, ...) is in the workflow")
        return report

    needed = _needed(prompt, roots)
    for node_id in needed:
        spec = specs.get(str(prompt[node_id]["class_type"]))
        if spec is not None:
            validate_node(node_id, prompt[node_id], spec, prompt, specs, report)
    for cycle in _cycles(prompt, needed):
        path = cycle + [cycle[0]]
        details = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in path)
        for node_id in cycle:
            report.add(node_id, str(prompt[node_id]["class_type"]), input_error(
                "dependency_cycle", "Dependency cycle detected", details, node_id=node_id, cycle_nodes=cycle))
            report.literals.pop(node_id, None)

    if report.node_errors:
        _mark_outputs(prompt, roots, report)
    else:
        report.outputs = roots
    if not report.outputs:
        lines = [f"{e['message']}: {e['details']}" for entry in report.node_errors.values() for e in entry["errors"]]
        report.error = prompt_error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                    "\n".join(lines))
    return report


def _mark_outputs(prompt: Mapping[str, Mapping[str, Any]], roots: Sequence[str], report: ValidationReport) -> None:
    """Fill dependent_outputs of failing nodes and keep only outputs with no failing ancestor."""
    bad_roots: set[str] = set()
    for root in roots:
        for node_id in _needed(prompt, [root]):
            if node_id in report.node_errors:
                report.node_errors[node_id]["dependent_outputs"].append(root)
                bad_roots.add(root)
    report.outputs = [r for r in roots if r not in bad_roots]
