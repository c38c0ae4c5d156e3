"""Node expansion (protocol.md 6.7): a node that returns {"expand": graph, "result": ...}.

The new nodes join the run's prompt under ids prefixed with the expanding node's id, are
validated like submitted nodes and signed in their own topological order; the expanding node
resolves once the nodes its results point at (and any new output nodes) have. This module turns
the returned dict into an `Expansion` and, later, into the node's outputs; the executor decides
when each happens.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .cache import CacheEntry
from .errors import ValidationReport
from .explain import NodeRecord
from .nodespec import NodeSpec
from .plan import Link, Plan
from .validate import validate_node
from .workflow import is_link

# (exception type, message) -> the error to raise; the executor's carries the run's state
Fail = Callable[[str, str], Exception]


@dataclass(frozen=True)
class Expansion:
    results: tuple[Any, ...]        # per output: a Link into the new nodes, or a value
    ui: dict[str, Any] | None
    waits: list[str]                # new nodes that must resolve first

    def outputs(self, sig: str, resolved: Mapping[str, CacheEntry],
                plan: Plan) -> tuple[tuple[list[Any], ...], tuple[str, ...]]:
        """The expanded node's outputs and output signatures, once `waits` have resolved."""
        outputs, out_sigs = [], []
        for slot, item in enumerate(self.results):
            if isinstance(item, Link):
                outputs.append(resolved[item.source].outputs[item.slot])
                out_sigs.append(plan.out_sig(item.source, item.slot))
            else:
                outputs.append([item])
                out_sigs.append(f"{sig}:{slot}")
        return tuple(outputs), tuple(out_sigs)


def expand(node_id: str, spec: NodeSpec, result: dict[str, Any], plan: Plan,
           fail: Fail) -> tuple[Expansion, dict[str, NodeRecord | None]]:
    """Add the nodes a node returned under "expand" to the plan; returns the expansion and the
    new nodes' previous records (for `explain`)."""
    graph = result["expand"]
    if not isinstance(graph, Mapping):
        raise fail("TypeError", f"{spec.class_type} returned an expansion that is not a graph")
    prompt = plan.prompt
    rename = {str(old): (str(old) if str(old).startswith(f"{node_id}.") else f"{node_id}.{old}") for old in graph}
    report = ValidationReport()
    for old, node in graph.items():
        new = rename[str(old)]
        if new in prompt:
            raise fail("ValueError", f"expanded node id {new!r} is already in the prompt")
        inputs = {name: ([rename.get(v[0], v[0]), v[1]] if is_link(v) else v)
                  for name, v in (node.get("inputs") or {}).items()}
        prompt[new] = {"class_type": node.get("class_type"), "inputs": inputs}
    new_ids = [rename[str(old)] for old in graph]
    for new in new_ids:
        new_spec = plan.specs.get(str(prompt[new]["class_type"]))
        if new_spec is None:
            raise fail("ValueError", f"expanded node {new} has unknown class {prompt[new]['class_type']!r}")
        validate_node(new, prompt[new], new_spec, prompt, plan.specs, report)
    if report.node_errors:
        raise fail("ValueError", f"{spec.class_type} expanded into invalid nodes:\n" + report.describe())
    plan.report.literals.update(report.literals)
    previous = {new: plan.sign(new) for new in plan.order_of(new_ids)}
    values = tuple(result.get("result") or ())
    results = tuple(Link("", rename.get(v[0], v[0]), int(v[1]), False) if is_link(v) else v for v in values)
    waits = [r.source for r in results if isinstance(r, Link)]
    waits += [n for n in new_ids if plan.spec(n).output_node and n not in waits]
    return Expansion(results, result.get("ui"), waits), previous
