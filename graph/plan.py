"""Planning a run: which nodes the outputs need, in which order, and under which signature.

A node's signature hashes its class, its literal inputs, the signatures of the outputs it reads
and its IS_CHANGED value. An output's signature is `<node signature>:<slot>`, unless the value
offers `patch_fingerprint()` (models and CLIPs with patches): then it is that fingerprint, so a
LoRA loader that re-ran with an unchanged CLIP side leaves the text encoders cached.

Before anything runs every needed node is signed in a static (topological) order, each against
its sources' *provisional* output signatures: the real ones of a cache hit, `<sig>:<slot>`
otherwise. When a source turns out to produce other output signatures (a fingerprint, a cache
entry with different ones, an expansion), it is marked diverged and its consumers re-sign before
their own cache lookup (`current_sig`). Running the nodes is `graph/executor.py`'s job.
"""
from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

from .cache import CacheEntry, OutputCache
from .errors import ValidationReport
from .explain import NodeRecord
from .node_call import hidden_inputs
from .nodespec import NodeSpec, SpecTable


class Link(NamedTuple):
    """One linked input (a NamedTuple: built for every link of every node, so it must be cheap)."""

    name: str
    source: str
    slot: int
    lazy: bool


def _digest(payload: str) -> str:
    return hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def output_sig(sig: str, slot: int, items: list[Any]) -> str:
    """The signature an output passes on: a single patched model's fingerprint, else positional."""
    if len(items) == 1:
        fingerprint = getattr(items[0], "patch_fingerprint", None)
        if callable(fingerprint):
            return f"fp:{fingerprint()}"
    return f"{sig}:{slot}"


class Plan:
    """The links, order and signatures of one prompt run.

    `prompt` is the run's own copy: node expansion adds nodes to it. `records` is the executor's
    last-seen NodeRecord per node id, shared across runs so that `explain` can say what changed.
    """

    def __init__(self, prompt: dict[str, Mapping[str, Any]], original: Mapping[str, Any],
                 extra: Mapping[str, Any], specs: SpecTable, report: ValidationReport,
                 records: dict[str, NodeRecord]) -> None:
        self.prompt = prompt
        self.original = original          # what PROMPT hidden inputs receive (IS_CHANGED too)
        self.extra = extra
        self.specs, self.report, self.records = specs, report, records
        self.links: dict[str, list[Link]] = {}
        self.node_specs: dict[str, NodeSpec] = {}
        self.sigs: dict[str, str] = {}
        self.out_sigs: dict[str, tuple[str, ...] | None] = {}    # None: provisional "<sig>:<slot>"
        self.diverged: set[str] = set()     # resolved nodes whose output sigs differ from provisional
        self.always: set[str] = set()       # IS_CHANGED said NaN: never served from the cache

    # -- the graph ---------------------------------------------------------------------------
    def spec(self, node_id: str) -> NodeSpec:
        spec = self.node_specs.get(node_id)
        if spec is None:
            spec = self.specs.get(str(self.prompt[node_id]["class_type"]))
            if spec is None:  # validation guarantees it
                raise KeyError(node_id)
            self.node_specs[node_id] = spec
        return spec

    def node_links(self, node_id: str) -> list[Link]:
        cached = self.links.get(node_id)
        if cached is not None:
            return cached
        return self._read_links(node_id)

    def _read_links(self, node_id: str) -> list[Link]:
        inputs = self.spec(node_id).inputs
        out = []
        for name, value in self.prompt[node_id].get("inputs", {}).items():
            # inlined graph.workflow.is_link: this runs once per input of every node
            if type(value) is list and len(value) == 2 and type(value[0]) is str and name in inputs:
                slot = value[1]
                if isinstance(slot, (int, float)) and not isinstance(slot, bool):
                    out.append(Link(name, value[0], int(slot), inputs[name].lazy))
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

    # -- signatures --------------------------------------------------------------------------
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
        kwargs.update(hidden_inputs(spec, node_id, self.original, self.extra))
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

    def sign(self, node_id: str) -> NodeRecord | None:
        """Sign a node (asking IS_CHANGED); returns the record it had before, for `explain`."""
        spec = self.spec(node_id)
        sig, record = self.signature(node_id, spec, self.is_changed(node_id, spec))
        self.sigs[node_id] = sig
        previous = self.records.get(node_id)
        self.records[node_id] = record
        return previous

    def sign_all(self, cache: OutputCache) -> tuple[list[tuple[str, CacheEntry]], dict[str, NodeRecord | None]]:
        """Sign every needed node and look it up: the cache hits in static order, and the previous
        records of the misses. A hit's real output signatures are taken at once, so its consumers
        sign against them rather than a provisional `<sig>:<slot>`."""
        hits: list[tuple[str, CacheEntry]] = []
        previous: dict[str, NodeRecord | None] = {}
        for node_id in self.static_order():
            before = self.sign(node_id)
            entry = cache.get(self.sigs[node_id])
            if entry is not None:
                self.out_sigs[node_id] = entry.output_sigs
                hits.append((node_id, entry))
            else:
                previous[node_id] = before
        return hits, previous

    def current_sig(self, node_id: str) -> str:
        """The node's signature with the real output signatures of upstream nodes that ran."""
        if self.diverged and any(link.source in self.diverged for link in self.links[node_id]):
            spec = self.spec(node_id)
            prev = self.records.get(node_id)
            # IS_CHANGED is not asked again: its answer does not depend on upstream outputs
            changed = prev.changed if prev is not None else None
            sig, record = self.signature(node_id, spec, changed)
            if sig != self.sigs[node_id]:
                self.diverged.add(node_id)   # consumers assumed "<old sig>:<slot>"
            self.sigs[node_id] = sig
            self.records[node_id] = record
        return self.sigs[node_id]

    # -- real output signatures, once a node resolved ----------------------------------------
    def outputs_from_cache(self, node_id: str, output_sigs: tuple[str, ...]) -> None:
        assumed = tuple(self.out_sig(node_id, slot) for slot in range(len(output_sigs)))
        if assumed != output_sigs:
            self.diverged.add(node_id)
        self.out_sigs[node_id] = output_sigs

    def outputs_from_run(self, node_id: str, outputs: tuple[list[Any], ...]) -> tuple[str, ...]:
        """The output signatures of a node that just ran (for its cache entry)."""
        sig = self.sigs[node_id]
        out_sigs = tuple(output_sig(sig, slot, outputs[slot]) for slot in range(len(outputs)))
        if any(o.startswith("fp:") for o in out_sigs):
            self.diverged.add(node_id)
        self.out_sigs[node_id] = out_sigs
        return out_sigs

    def outputs_from_expansion(self, node_id: str, output_sigs: tuple[str, ...]) -> None:
        # an expanded node passes on its new nodes' signatures, never "<sig>:<slot>"
        self.out_sigs[node_id] = output_sigs
        self.diverged.add(node_id)
