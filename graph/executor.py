"""Run a validated prompt as a DAG, reusing cached outputs across runs.

The order, signatures and cache lookups are planned by `graph/plan.py`; this file runs what the
plan leaves: nodes run on demand from the outputs with an explicit stack (no recursion per
node), and a node runs once its non-lazy inputs (and the lazy ones it asked for) are resolved.
It calls nodes by `graph/node_call.py`'s convention, hands expansions to `graph/expansion.py`,
sends events to the sink and collects the node records and the result.
"""
from __future__ import annotations

import asyncio
import inspect
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import events as ev
from .cache import CacheEntry, OutputCache
from .errors import ValidationReport
from .expansion import Expansion, expand
from .explain import NodeRecord, explain
from .node_call import (HIDDEN_FROM_EXTRA, add_values, call_arguments, exception_name, hidden_inputs, merge_ui,
                        shown_inputs, split_result)
from .nodespec import NodeRegistry, NodeSpec, SpecTable
from .plan import Plan
from .runtime import CURRENT_RUNTIME, ExecutionBlocker, Interrupted, NodeRuntime, running
from .validate import validate_prompt

__all__ = ["HIDDEN_FROM_EXTRA", "MAX_RECORDS", "Executor", "NodeExecutionError", "RunResult"]

MAX_RECORDS = 200_000


class NodeExecutionError(Exception):
    """A node raised; carries the ComfyUI `execution_error` payload."""

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("exception_message", ""))
        self.payload = payload


@dataclass
class RunResult:
    prompt_id: str
    status: str                                   # "success" | "error" | "interrupted" | "invalid"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)   # output node id -> ui
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None           # execution_error / execution_interrupted payload
    validation: ValidationReport | None = None
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # job-level events
    explanations: dict[str, list[str]] = field(default_factory=dict)
    # node id -> {name: data}: what nodes recorded for the history (NodeRuntime.record), also for
    # nodes served from the cache
    node_records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"


def _merge_record(bucket: dict[str, Any], name: str, data: Any) -> None:
    """A node's records by name: a later record replaces an earlier one, except that lists add up (a
    node mapped over a list of inputs records once per call, e.g. one LoRA coverage per file)."""
    old = bucket.get(name)
    bucket[name] = old + data if isinstance(old, list) and isinstance(data, list) else data


class Executor:
    """Runs prompts against a node registry; keeps node instances and the last-run records."""

    def __init__(self, registry: NodeRegistry, cache: OutputCache | None = None,
                 events: ev.EventSink | None = None, folders: Any = None) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()
        self.sink: ev.EventSink = events or ev.null_sink
        self.folders = folders
        self._interrupt = False
        self._instances: dict[tuple[str, str], Any] = {}
        self._records: dict[str, NodeRecord] = {}

    # -- control -------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Ask the running prompt to stop at the next node boundary or interrupt check."""
        self._interrupt = True

    def interrupt_requested(self) -> bool:
        return self._interrupt

    def validate(self, prompt: Mapping[str, Any], targets: Sequence[str] | None = None) -> ValidationReport:
        return validate_prompt(prompt, SpecTable(self.registry), targets)

    # -- running -------------------------------------------------------------------------------
    def run(self, prompt: Mapping[str, Mapping[str, Any]], prompt_id: str | None = None,
            extra_data: Mapping[str, Any] | None = None, targets: Sequence[str] | None = None,
            report: ValidationReport | None = None, specs: SpecTable | None = None) -> RunResult:
        """Validate (unless a report is given) and run; events go to the sink as they happen.

        `specs` lets a caller reuse node specs across runs (the server refreshes its table every
        second, so new model files still show up in combo checks); by default they are read anew.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        specs = specs if specs is not None else SpecTable(self.registry)
        if report is None:
            report = validate_prompt(prompt, specs, targets)
        if not report.ok:
            return RunResult(prompt_id, "invalid", validation=report)
        self._interrupt = False
        run = _Run(self, prompt, prompt_id, dict(extra_data or {}), specs, report)
        return run.execute()


class _Run:
    """The state of one prompt run (locals of the executor, split out for readability)."""

    def __init__(self, ex: Executor, prompt: Mapping[str, Mapping[str, Any]], prompt_id: str,
                 extra_data: dict[str, Any], specs: SpecTable, report: ValidationReport) -> None:
        self.ex, self.prompt_id, self.extra = ex, prompt_id, extra_data
        self.original = prompt                   # what PROMPT hidden inputs receive
        self.prompt: dict[str, Mapping[str, Any]] = dict(prompt)   # grows with node expansions
        self.report = report
        self.plan = Plan(self.prompt, prompt, extra_data, specs, report, ex._records)
        self.expanding: dict[str, Expansion] = {}
        self.cache = ex.cache
        self.result = RunResult(prompt_id, "success", validation=report)
        self.resolved: dict[str, CacheEntry] = {}
        self.prev_records: dict[str, NodeRecord | None] = {}
        self.pending_records: dict[str, list[tuple[str, Any]]] = {}   # recorded by a running node

    def emit(self, event: str, data: dict[str, Any]) -> None:
        if event in ev.JOB_EVENTS:
            self.result.messages.append((event, data))
        elif event == ev.NODE_RECORD:
            # kept as plain data: a snapshot (the node may change its object later), small in the cache
            node_id, name, value = str(data.get("node")), str(data.get("name")), ev.json_safe(data.get("data"))
            self.pending_records.setdefault(node_id, []).append((name, value))
            _merge_record(self.result.node_records.setdefault(node_id, {}), name, value)
        self.ex.sink(event, data)

    def keep_cached_records(self, node_id: str, entry: CacheEntry) -> None:
        """What a node recorded when it ran, for this prompt's history (its output came from the cache)."""
        if entry.node_records:
            bucket: dict[str, Any] = {}
            for name, data in entry.node_records:
                _merge_record(bucket, name, ev.json_safe(data))      # a copy: results may be changed
            self.result.node_records[node_id] = bucket

    # -- the run ---------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        self.emit(ev.EXECUTION_START, {"prompt_id": self.prompt_id, "timestamp": ev.timestamp_ms()})
        if len(self.ex._records) > MAX_RECORDS:
            self.ex._records.clear()
        hits, self.prev_records = self.plan.sign_all(self.cache)
        cached = [node_id for node_id, _ in hits]
        for node_id, entry in hits:
            self.keep_cached_records(node_id, entry)
        self.result.cached = list(cached)
        self.emit(ev.EXECUTION_CACHED, {"nodes": cached, "prompt_id": self.prompt_id, "timestamp": ev.timestamp_ms()})
        try:
            self.walk(set(cached))
        except Interrupted as exc:
            node_id = getattr(exc, "node_id", None)
            payload = {"prompt_id": self.prompt_id, "node_id": node_id,
                       "node_type": self.prompt[node_id]["class_type"] if node_id else None,
                       "executed": list(self.result.executed), "timestamp": ev.timestamp_ms()}
            self.result.status, self.result.error = "interrupted", payload
            self.emit(ev.EXECUTION_INTERRUPTED, payload)
        except NodeExecutionError as exc:
            self.result.status, self.result.error = "error", exc.payload
            self.emit(ev.EXECUTION_ERROR, exc.payload)
        else:
            self.emit(ev.EXECUTION_SUCCESS, {"prompt_id": self.prompt_id, "timestamp": ev.timestamp_ms()})
        self.emit(ev.EXECUTING, {"node": None, "prompt_id": self.prompt_id})
        return self.result

    def walk(self, announced: set[str]) -> None:
        plan = self.plan
        requested: dict[str, set[str]] = {}
        lazy_checked: set[str] = set()
        stack = list(reversed(self.report.outputs))
        outputs = set(self.report.outputs)
        while stack:
            node_id = stack[-1]
            if node_id in self.resolved:
                stack.pop()
                continue
            expansion = self.expanding.get(node_id)
            if expansion is not None:
                missing = [n for n in expansion.waits if n not in self.resolved]
                if missing:
                    stack.extend(reversed(missing))
                else:
                    self.finish_expansion(node_id, expansion)
                    stack.pop()
                continue
            if self.ex._interrupt:
                exc = Interrupted("interrupted")
                exc.node_id = node_id  # type: ignore[attr-defined]
                raise exc
            entry = self.cache.get(plan.current_sig(node_id))
            if entry is not None:
                self.take_cached(node_id, entry, node_id in outputs, announced)
                stack.pop()
                continue
            wanted = requested.get(node_id, ())
            missing = [link.source for link in plan.links[node_id]
                       if (not link.lazy or link.name in wanted) and link.source not in self.resolved]
            if missing:
                stack.extend(reversed(missing))
                continue
            spec = plan.spec(node_id)
            if spec.has_lazy and node_id not in lazy_checked:
                more = self.check_lazy(node_id, spec, requested.setdefault(node_id, set()))
                if more:
                    continue
                lazy_checked.add(node_id)
                entry = self.cache.get(plan.current_sig(node_id))
                if entry is not None:
                    self.take_cached(node_id, entry, node_id in outputs, announced)
                    stack.pop()
                    continue
            if self.run_node(node_id, spec, requested.get(node_id, set())):
                stack.pop()

    def take_cached(self, node_id: str, entry: CacheEntry, is_output: bool, announced: set[str]) -> None:
        self.resolved[node_id] = entry
        self.keep_cached_records(node_id, entry)
        self.plan.outputs_from_cache(node_id, entry.output_sigs)
        if node_id not in announced:
            announced.add(node_id)
            self.result.cached.append(node_id)
            self.emit(ev.EXECUTION_CACHED, {"nodes": [node_id], "prompt_id": self.prompt_id, "timestamp": ev.timestamp_ms()})
        if is_output:
            if entry.ui is not None:
                self.result.outputs[node_id] = entry.ui
            self.emit(ev.EXECUTED, {"node": node_id, "display_node": node_id, "output": entry.ui,
                                    "prompt_id": self.prompt_id})

    # -- calling a node --------------------------------------------------------------------------
    def hidden(self, node_id: str, spec: NodeSpec) -> dict[str, Any]:
        return hidden_inputs(spec, node_id, self.original, self.extra)

    def instance(self, node_id: str, spec: NodeSpec) -> Any:
        key = (node_id, spec.class_type)
        obj = self.ex._instances.get(key)
        if obj is None:
            if len(self.ex._instances) > MAX_RECORDS:
                self.ex._instances.clear()
            obj = spec.cls()
            self.ex._instances[key] = obj
        return obj

    def gather_inputs(self, node_id: str, wanted: set[str]) -> dict[str, list[Any]]:
        inputs: dict[str, list[Any]] = {name: [value] for name, value in self.report.literals.get(node_id, {}).items()}
        for link in self.plan.node_links(node_id):
            if link.lazy and link.name not in wanted and link.source not in self.resolved:
                inputs[link.name] = [None]
            elif self.plan.spec(node_id).inputs[link.name].raw_link:
                inputs[link.name] = [[link.source, link.slot]]
            else:
                inputs[link.name] = self.resolved[link.source].outputs[link.slot]
        return inputs

    def runtime(self, node_id: str) -> NodeRuntime:
        return NodeRuntime(node_id, self.prompt_id, self.emit, self.ex.interrupt_requested, self.ex.folders,
                           str(self.extra.get("preview_method") or "auto").lower())

    def check_lazy(self, node_id: str, spec: NodeSpec, wanted: set[str]) -> bool:
        """Ask check_lazy_status which lazy inputs it needs; True when new ones were requested."""
        obj = self.instance(node_id, spec)
        check = getattr(obj, "check_lazy_status", None)
        lazy_links = {link.name for link in self.plan.node_links(node_id) if link.lazy}
        if check is None:
            new = lazy_links - wanted
        else:
            inputs = self.gather_inputs(node_id, wanted)
            first = {k: v[0] if v else None for k, v in inputs.items()}
            first.update(self.hidden(node_id, spec))
            with running(self.runtime(node_id)):
                needed = self.call(node_id, spec, check, first, "check_lazy_status")
            if isinstance(needed, str):
                needed = [needed]
            new = {name for name in (needed or []) if name in lazy_links} - wanted
        wanted |= new
        return bool(new)

    def failure(self, node_id: str, spec: NodeSpec, kind: str, message: str, trace: list[str] | None = None,
                current_inputs: dict[str, list[str]] | None = None, phase: str | None = None) -> NodeExecutionError:
        payload: dict[str, Any] = {
            "prompt_id": self.prompt_id, "node_id": node_id, "node_type": spec.class_type,
            "executed": list(self.result.executed), "exception_message": message, "exception_type": kind,
            "traceback": trace if trace is not None else [],
            "current_inputs": current_inputs if current_inputs is not None else {},
            "current_outputs": list(self.resolved), "timestamp": ev.timestamp_ms()}
        if phase is not None:
            payload["phase"] = phase
        return NodeExecutionError(payload)

    def call(self, node_id: str, spec: NodeSpec, fn: Any, kwargs: dict[str, Any], what: str) -> Any:
        try:
            out = fn(**kwargs)
            if inspect.iscoroutine(out):
                out = asyncio.run(out)
            return out
        except Interrupted as exc:
            exc.node_id = node_id  # type: ignore[attr-defined]
            raise
        except Exception as exc:
            raise self.failure(node_id, spec, exception_name(exc), f"{exc}", traceback.format_exception(exc),
                               shown_inputs(kwargs, spec), what) from exc

    def run_node(self, node_id: str, spec: NodeSpec, wanted: set[str]) -> bool:
        """Run a node; False when it expanded into new nodes that must run before it resolves."""
        sig = self.plan.sigs[node_id]
        reasons = explain(self.prev_records.get(node_id), self.ex._records[node_id],
                          sig in self.cache.evicted, node_id in self.plan.always)
        self.result.explanations[node_id] = reasons
        self.emit(ev.EXPLAIN, {"node": node_id, "class_type": spec.class_type, "reasons": reasons,
                               "prompt_id": self.prompt_id})
        self.emit(ev.EXECUTING, {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        obj = self.instance(node_id, spec)
        fn = getattr(obj, spec.function, None)
        if fn is None:
            raise self.failure(node_id, spec, "AttributeError",
                               f"{spec.class_type} has no method {spec.function!r} (its FUNCTION)")
        inputs = self.gather_inputs(node_id, wanted)
        n_out = len(spec.return_types)
        blocker = next((item for items in inputs.values() for item in items if isinstance(item, ExecutionBlocker)), None)
        if blocker is not None:
            if blocker.message is not None and spec.output_node:
                raise self.failure(node_id, spec, "ExecutionBlocked", blocker.message)
            self.resolved[node_id] = CacheEntry(tuple([blocker] for _ in range(n_out)),
                                                tuple(f"{sig}:{slot}" for slot in range(n_out)), None, 0)
            return True
        hidden = self.hidden(node_id, spec)
        outputs: tuple[list[Any], ...] = tuple([] for _ in range(n_out))
        ui: dict[str, Any] | None = None
        self.result.node_records.pop(node_id, None)     # (a cached entry's, when the node re-runs)
        self.pending_records.pop(node_id, None)
        token = CURRENT_RUNTIME.set(self.runtime(node_id))
        try:
            calls = call_arguments(inputs, hidden, spec.input_is_list)
            for kwargs in calls:
                result = self.call(node_id, spec, fn, kwargs, spec.function)
                if isinstance(result, dict) and result.get("expand") is not None:
                    if len(calls) != 1:
                        raise self.failure(node_id, spec, "TypeError",
                                           f"{spec.class_type} expanded into new nodes while mapped over a list; "
                                           "Easel expands only single calls")
                    self.result.executed.append(node_id)
                    self.add_expansion(node_id, spec, result)
                    return False
                values, part_ui = split_result(result, spec)
                if part_ui is not None:
                    ui = merge_ui(ui, part_ui)
                add_values(outputs, values, spec)
        finally:
            CURRENT_RUNTIME.reset(token)
        out_sigs = self.plan.outputs_from_run(node_id, outputs)
        entry = self.cache.put(sig, outputs, out_sigs, ui, node_records=tuple(self.pending_records.pop(node_id, ())))
        self.resolved[node_id] = entry
        self.result.executed.append(node_id)
        if ui is not None:
            if node_id in self.report.outputs or spec.output_node:
                self.result.outputs[node_id] = ui
            self.emit(ev.EXECUTED, {"node": node_id, "display_node": node_id, "output": ui,
                                    "prompt_id": self.prompt_id})
        return True

    # -- node expansion (protocol.md 6.7) --------------------------------------------------------
    def add_expansion(self, node_id: str, spec: NodeSpec, result: dict[str, Any]) -> None:
        """Add the nodes a node returned under "expand"; it resolves once they have run."""
        def fail(kind: str, message: str) -> NodeExecutionError:
            return self.failure(node_id, spec, kind, message)

        expansion, previous = expand(node_id, spec, result, self.plan, fail)
        self.prev_records.update(previous)
        self.expanding[node_id] = expansion

    def finish_expansion(self, node_id: str, expansion: Expansion) -> None:
        del self.expanding[node_id]
        sig = self.plan.sigs[node_id]
        outputs, out_sigs = expansion.outputs(sig, self.resolved, self.plan)
        self.plan.outputs_from_expansion(node_id, out_sigs)
        self.resolved[node_id] = self.cache.put(sig, outputs, out_sigs, expansion.ui,
                                                node_records=tuple(self.pending_records.pop(node_id, ())))
        if expansion.ui is not None:
            self.result.outputs[node_id] = expansion.ui
            self.emit(ev.EXECUTED, {"node": node_id, "display_node": node_id, "output": expansion.ui,
                                    "prompt_id": self.prompt_id})
