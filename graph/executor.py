"""Run a validated prompt as a DAG, reusing cached outputs across runs.

A node's signature hashes its class, its literal inputs, the signatures of the outputs it reads
and its IS_CHANGED value. An output's signature is `<node signature>:<slot>`, unless the value
offers `patch_fingerprint()` (models and CLIPs with patches): then it is that fingerprint, so a
LoRA loader that re-ran with an unchanged CLIP side leaves the text encoders cached.

Nodes run on demand from the outputs with an explicit stack (no recursion per node): a node
runs once its non-lazy inputs (and the lazy ones it asked for) are resolved.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import events as ev
from .cache import CacheEntry, OutputCache
from .errors import ValidationReport
from .explain import NodeRecord, explain
from .nodespec import NodeRegistry, NodeSpec, SpecTable
from .runtime import CURRENT_RUNTIME, ExecutionBlocker, Interrupted, NodeRuntime, running
from .validate import validate_node, validate_prompt
from .workflow import is_link

HIDDEN_FROM_EXTRA = {"EXTRA_PNGINFO": "extra_pnginfo", "AUTH_TOKEN_COMFY_ORG": "auth_token_comfy_org",
                     "API_KEY_COMFY_ORG": "api_key_comfy_org", "COMFY_USAGE_SOURCE": "comfy_usage_source"}
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


class _Link(NamedTuple):
    """One linked input (a NamedTuple: built for every link of every node, so it must be cheap)."""

    name: str
    source: str
    slot: int
    lazy: bool


def _merge_record(bucket: dict[str, Any], name: str, data: Any) -> None:
    """A node's records by name: a later record replaces an earlier one, except that lists add up (a
    node mapped over a list of inputs records once per call, e.g. one LoRA coverage per file)."""
    old = bucket.get(name)
    bucket[name] = old + data if isinstance(old, list) and isinstance(data, list) else data


def _digest(payload: str) -> str:
    return hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


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
        self.expanding: dict[str, _Expansion] = {}
        self.specs, self.report = specs, report
        self.cache = ex.cache
        self.result = RunResult(prompt_id, "success", validation=report)
        self.links: dict[str, list[_Link]] = {}
        self.node_specs: dict[str, NodeSpec] = {}
        self.sigs: dict[str, str] = {}
        self.out_sigs: dict[str, tuple[str, ...] | None] = {}    # None: provisional "<sig>:<slot>"
        self.diverged: set[str] = set()     # resolved nodes whose output sigs differ from provisional
        self.resolved: dict[str, CacheEntry] = {}
        self.always: set[str] = set()
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

    # -- signatures ------------------------------------------------------------------------------
    def spec(self, node_id: str) -> NodeSpec:
        spec = self.node_specs.get(node_id)
        if spec is None:
            spec = self.specs.get(str(self.prompt[node_id]["class_type"]))
            if spec is None:  # validation guarantees it
                raise KeyError(node_id)
            self.node_specs[node_id] = spec
        return spec

    def node_links(self, node_id: str) -> list[_Link]:
        cached = self.links.get(node_id)
        if cached is not None:
            return cached
        return self._read_links(node_id)

    def _read_links(self, node_id: str) -> list[_Link]:
        inputs = self.spec(node_id).inputs
        out = []
        for name, value in self.prompt[node_id].get("inputs", {}).items():
            # inlined graph.workflow.is_link: this runs once per input of every node
            if type(value) is list and len(value) == 2 and type(value[0]) is str and name in inputs:
                slot = value[1]
                if isinstance(slot, (int, float)) and not isinstance(slot, bool):
                    out.append(_Link(name, value[0], int(slot), inputs[name].lazy))
        self.links[node_id] = out
        return out

    def static_order(self) -> list[str]:
        """Post-order DFS from the outputs over every link: a topological order, iteratively."""
        order: list[str] = []
        seen: set[str] = set()
        for root in self.report.outputs:
            if root in seen:
                continue
            seen.add(root)
            stack = [(root, iter(self.node_links(root)))]
            while stack:
                node_id, it = stack[-1]
                for link in it:
                    if link.source not in seen:
                        seen.add(link.source)
                        stack.append((link.source, iter(self.node_links(link.source))))
                        break
                else:
                    stack.pop()
                    order.append(node_id)
        return order

    def out_sig(self, node_id: str, slot: int) -> str:
        sigs = self.out_sigs.get(node_id)
        if sigs is not None and slot < len(sigs):
            return sigs[slot]
        return f"{self.sigs[node_id]}:{slot}"

    def is_changed(self, node_id: str, spec: NodeSpec) -> str | None:
        if not spec.has_is_changed:
            return None
        kwargs = dict(self.report.literals.get(node_id, {}))
        for link in self.node_links(node_id):
            kwargs[link.name] = None
        kwargs.update(self.hidden(node_id, spec))
        try:
            value = spec.cls.IS_CHANGED(**kwargs)
            hash(value)
        except Exception:  # ComfyUI: an exception or unhashable value counts as NaN
            value = float("nan")
        if isinstance(value, float) and math.isnan(value):
            self.always.add(node_id)
            return f"nan:{uuid.uuid4().hex}"
        return repr(value)

    def signature(self, node_id: str, spec: NodeSpec, changed: str | None) -> tuple[str, NodeRecord]:
        literals = self.report.literals.get(node_id, {})
        link_sigs = {link.name: (link.source, self.out_sig(link.source, link.slot)) for link in self.node_links(node_id)}
        ident = node_id if spec.not_idempotent else None
        payload = repr((spec.class_type, sorted(literals.items()), sorted((k, v[1]) for k, v in link_sigs.items()),
                        changed, ident))
        sig = _digest(payload)
        return sig, NodeRecord(spec.class_type, literals, link_sigs, changed, sig)

    # -- the run ---------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        self.emit(ev.EXECUTION_START, {"prompt_id": self.prompt_id, "timestamp": ev.timestamp_ms()})
        records = self.ex._records
        if len(records) > MAX_RECORDS:
            records.clear()
        cached: list[str] = []
        for node_id in self.static_order():
            spec = self.spec(node_id)
            sig, record = self.signature(node_id, spec, self.is_changed(node_id, spec))
            self.sigs[node_id] = sig
            entry = self.cache.get(sig)
            if entry is not None:
                self.out_sigs[node_id] = entry.output_sigs
                cached.append(node_id)
                self.keep_cached_records(node_id, entry)
            else:
                self.prev_records[node_id] = records.get(node_id)
            records[node_id] = record
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

    def current_sig(self, node_id: str) -> str:
        """The node's signature with the real output signatures of upstream nodes that ran."""
        if self.diverged and any(link.source in self.diverged for link in self.links[node_id]):
            spec = self.spec(node_id)
            prev = self.ex._records.get(node_id)
            changed = prev.changed if prev is not None else None
            sig, record = self.signature(node_id, spec, changed)
            if sig != self.sigs[node_id]:
                self.diverged.add(node_id)   # consumers assumed "<old sig>:<slot>"
            self.sigs[node_id] = sig
            self.ex._records[node_id] = record
        return self.sigs[node_id]

    def walk(self, announced: set[str]) -> None:
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
            entry = self.cache.get(self.current_sig(node_id))
            if entry is not None:
                self.take_cached(node_id, entry, node_id in outputs, announced)
                stack.pop()
                continue
            wanted = requested.get(node_id, ())
            missing = [link.source for link in self.links[node_id]
                       if (not link.lazy or link.name in wanted) and link.source not in self.resolved]
            if missing:
                stack.extend(reversed(missing))
                continue
            spec = self.spec(node_id)
            if spec.has_lazy and node_id not in lazy_checked:
                more = self.check_lazy(node_id, spec, requested.setdefault(node_id, set()))
                if more:
                    continue
                lazy_checked.add(node_id)
                entry = self.cache.get(self.current_sig(node_id))
                if entry is not None:
                    self.take_cached(node_id, entry, node_id in outputs, announced)
                    stack.pop()
                    continue
            if self.run_node(node_id, spec, requested.get(node_id, set())):
                stack.pop()

    def take_cached(self, node_id: str, entry: CacheEntry, is_output: bool, announced: set[str]) -> None:
        self.resolved[node_id] = entry
        self.keep_cached_records(node_id, entry)
        assumed = tuple(self.out_sig(node_id, slot) for slot in range(len(entry.output_sigs)))
        if assumed != entry.output_sigs:
            self.diverged.add(node_id)
        self.out_sigs[node_id] = entry.output_sigs
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
        out: dict[str, Any] = {}
        for name, kind in spec.hidden.items():
            if kind == "PROMPT":
                out[name] = self.original
            elif kind == "UNIQUE_ID":
                out[name] = node_id
            elif kind in HIDDEN_FROM_EXTRA:
                out[name] = self.extra.get(HIDDEN_FROM_EXTRA[kind])
            else:
                out[name] = None
        return out

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
        for link in self.node_links(node_id):
            if link.lazy and link.name not in wanted and link.source not in self.resolved:
                inputs[link.name] = [None]
            elif self.spec(node_id).inputs[link.name].raw_link:
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
        lazy_links = {link.name for link in self.node_links(node_id) if link.lazy}
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
            kind = type(exc)
            name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
            raise NodeExecutionError({
                "prompt_id": self.prompt_id, "node_id": node_id, "node_type": spec.class_type,
                "executed": list(self.result.executed), "exception_message": f"{exc}",
                "exception_type": name, "traceback": traceback.format_exception(exc),
                "current_inputs": {k: [_short(v)] for k, v in kwargs.items() if k not in spec.hidden},
                "current_outputs": list(self.resolved), "timestamp": ev.timestamp_ms(), "phase": what,
            }) from exc

    def run_node(self, node_id: str, spec: NodeSpec, wanted: set[str]) -> bool:
        """Run a node; False when it expanded into new nodes that must run before it resolves."""
        sig = self.sigs[node_id]
        reasons = explain(self.prev_records.get(node_id), self.ex._records[node_id],
                          sig in self.cache.evicted, node_id in self.always)
        self.result.explanations[node_id] = reasons
        self.emit(ev.EXPLAIN, {"node": node_id, "class_type": spec.class_type, "reasons": reasons,
                               "prompt_id": self.prompt_id})
        self.emit(ev.EXECUTING, {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        obj = self.instance(node_id, spec)
        fn = getattr(obj, spec.function, None)
        if fn is None:
            raise NodeExecutionError({
                "prompt_id": self.prompt_id, "node_id": node_id, "node_type": spec.class_type,
                "executed": list(self.result.executed),
                "exception_message": f"{spec.class_type} has no method {spec.function!r} (its FUNCTION)",
                "exception_type": "AttributeError", "traceback": [], "current_inputs": {},
                "current_outputs": list(self.resolved), "timestamp": ev.timestamp_ms()})
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
            if spec.input_is_list:
                calls = [dict(inputs, **hidden)]
            else:
                lengths = [len(v) for v in inputs.values()]
                if all(n == 1 for n in lengths):        # the common case: one call, one item each
                    calls = [{k: v[0] for k, v in inputs.items()}]
                    if hidden:
                        calls[0].update(hidden)
                else:
                    count = 0 if 0 in lengths else max(lengths, default=1)
                    calls = [{k: v[min(i, len(v) - 1)] for k, v in inputs.items()} | hidden for i in range(count)]
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
                values, part_ui = _split_result(result, spec)
                if part_ui is not None:
                    ui = _merge_ui(ui, part_ui)
                for slot in range(min(n_out, len(values))):
                    if spec.output_is_list[slot]:
                        outputs[slot].extend(values[slot])
                    else:
                        outputs[slot].append(values[slot])
        finally:
            CURRENT_RUNTIME.reset(token)
        out_sigs = tuple(_output_sig(sig, slot, outputs[slot]) for slot in range(n_out))
        if any(o.startswith("fp:") for o in out_sigs):
            self.diverged.add(node_id)
        self.out_sigs[node_id] = out_sigs
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
    def failure(self, node_id: str, spec: NodeSpec, kind: str, message: str) -> NodeExecutionError:
        return NodeExecutionError({
            "prompt_id": self.prompt_id, "node_id": node_id, "node_type": spec.class_type,
            "executed": list(self.result.executed), "exception_message": message, "exception_type": kind,
            "traceback": [], "current_inputs": {}, "current_outputs": list(self.resolved),
            "timestamp": ev.timestamp_ms()})

    def add_expansion(self, node_id: str, spec: NodeSpec, result: dict[str, Any]) -> None:
        """Add the nodes a node returned under "expand"; it resolves once they have run."""
        graph = result["expand"]
        if not isinstance(graph, Mapping):
            raise self.failure(node_id, spec, "TypeError", f"{spec.class_type} returned an expansion that is not a graph")
        rename = {str(old): (str(old) if str(old).startswith(f"{node_id}.") else f"{node_id}.{old}") for old in graph}
        report = ValidationReport()
        for old, node in graph.items():
            new = rename[str(old)]
            if new in self.prompt:
                raise self.failure(node_id, spec, "ValueError", f"expanded node id {new!r} is already in the prompt")
            inputs = {name: ([rename.get(v[0], v[0]), v[1]] if is_link(v) else v)
                      for name, v in (node.get("inputs") or {}).items()}
            self.prompt[new] = {"class_type": node.get("class_type"), "inputs": inputs}
        new_ids = [rename[str(old)] for old in graph]
        for new in new_ids:
            new_spec = self.specs.get(str(self.prompt[new]["class_type"]))
            if new_spec is None:
                raise self.failure(node_id, spec, "ValueError",
                                   f"expanded node {new} has unknown class {self.prompt[new]['class_type']!r}")
            validate_node(new, self.prompt[new], new_spec, self.prompt, self.specs, report)
        if report.node_errors:
            raise self.failure(node_id, spec, "ValueError", f"{spec.class_type} expanded into invalid nodes:\n"
                               + report.describe())
        self.report.literals.update(report.literals)
        records = self.ex._records
        for new in self.order_of(new_ids):
            new_spec = self.spec(new)
            sig, record = self.signature(new, new_spec, self.is_changed(new, new_spec))
            self.sigs[new] = sig
            self.prev_records[new] = records.get(new)
            records[new] = record
        values = tuple(result.get("result") or ())
        results = tuple(_Link("", rename.get(v[0], v[0]), int(v[1]), False) if is_link(v) else v for v in values)
        waits = [r.source for r in results if isinstance(r, _Link)]
        waits += [n for n in new_ids if self.spec(n).output_node and n not in waits]
        self.expanding[node_id] = _Expansion(results, result.get("ui"), waits)

    def order_of(self, node_ids: list[str]) -> list[str]:
        """A topological order of some new nodes (links among them only), iteratively."""
        members, order, seen = set(node_ids), [], set()
        for root in node_ids:
            if root in seen:
                continue
            seen.add(root)
            stack = [(root, iter(self.node_links(root)))]
            while stack:
                current, it = stack[-1]
                for link in it:
                    if link.source in members and link.source not in seen:
                        seen.add(link.source)
                        stack.append((link.source, iter(self.node_links(link.source))))
                        break
                else:
                    stack.pop()
                    order.append(current)
        return order

    def finish_expansion(self, node_id: str, expansion: _Expansion) -> None:
        del self.expanding[node_id]
        sig = self.sigs[node_id]
        outputs, out_sigs = [], []
        for slot, item in enumerate(expansion.results):
            if isinstance(item, _Link):
                outputs.append(self.resolved[item.source].outputs[item.slot])
                out_sigs.append(self.out_sig(item.source, item.slot))
            else:
                outputs.append([item])
                out_sigs.append(f"{sig}:{slot}")
        self.out_sigs[node_id] = tuple(out_sigs)
        self.diverged.add(node_id)
        self.resolved[node_id] = self.cache.put(sig, tuple(outputs), tuple(out_sigs), expansion.ui,
                                                node_records=tuple(self.pending_records.pop(node_id, ())))
        if expansion.ui is not None:
            self.result.outputs[node_id] = expansion.ui
            self.emit(ev.EXECUTED, {"node": node_id, "display_node": node_id, "output": expansion.ui,
                                    "prompt_id": self.prompt_id})


@dataclass(frozen=True)
class _Expansion:
    results: tuple[Any, ...]        # per output: a _Link into the new nodes, or a value
    ui: dict[str, Any] | None
    waits: list[str]                # new nodes that must resolve first


def _split_result(result: Any, spec: NodeSpec) -> tuple[Sequence[Any], dict[str, Any] | None]:
    if isinstance(result, dict):
        ui = result.get("ui")
        values = result.get("result", ())
        return tuple(values) if values is not None else (), ui
    if result is None:
        return (), None
    if isinstance(result, (tuple, list)):
        return tuple(result), None
    raise TypeError(f"{spec.class_type}.{spec.function} must return a tuple or a dict with 'result'/'ui', "
                    f"returned {type(result).__name__}")


def _merge_ui(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if old is None:
        return dict(new)
    merged = dict(old)
    for key, value in new.items():
        if key in merged and isinstance(merged[key], list) and isinstance(value, list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def _output_sig(sig: str, slot: int, items: list[Any]) -> str:
    if len(items) == 1:
        fingerprint = getattr(items[0], "patch_fingerprint", None)
        if callable(fingerprint):
            return f"fp:{fingerprint()}"
    return f"{sig}:{slot}"


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
