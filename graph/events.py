"""Execution events and their sinks.

The executor calls `sink(event, data)` synchronously from the thread that runs the prompt; a sink
must be quick (the server's sink hands messages to its event loop, the CLI's draws a bar).
Event names and payloads follow ComfyUI's websocket messages (protocol.md 4), plus `warning`
(something a user should hear about, e.g. LoRA keys that matched nothing) and `explain`
(why a node ran instead of coming from the cache).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

EventSink = Callable[[str, dict[str, Any]], None]

EXECUTION_START = "execution_start"
EXECUTION_CACHED = "execution_cached"
EXECUTING = "executing"
PROGRESS = "progress"
EXECUTED = "executed"
EXECUTION_ERROR = "execution_error"
EXECUTION_INTERRUPTED = "execution_interrupted"
EXECUTION_SUCCESS = "execution_success"
WARNING = "warning"
NODE_RECORD = "node_record"     # a fact a node recorded for the prompt's history (NodeRuntime.record)
EXPLAIN = "explain"

JOB_EVENTS = frozenset({EXECUTION_START, EXECUTION_CACHED, EXECUTION_ERROR,
                        EXECUTION_INTERRUPTED, EXECUTION_SUCCESS})


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` as plain JSON data: dict keys become strings, tuples and sets lists, non-finite floats
    and any other object their `str()`; nesting deeper than 32 levels (or a cycle) is cut there.
    For what nodes record (`NodeRuntime.record`), which goes to the history, SQLite and the CLI."""
    if depth > 32:
        return "..."
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, depth + 1) for v in value]
    return str(value)


def timestamp_ms() -> int:
    return int(time.time() * 1000)


def null_sink(event: str, data: dict[str, Any]) -> None:
    """A sink that drops everything."""


class EventLog:
    """A sink that keeps every event, for tests and for building history entries."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        self.events.append((event, data))

    def of(self, event: str) -> list[dict[str, Any]]:
        return [data for name, data in self.events if name == event]

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def executed_nodes(self) -> list[str]:
        """Ids of the nodes that ran (had an `executing` event), in order."""
        return [d["node"] for d in self.of(EXECUTING) if d.get("node") is not None]

    def clear(self) -> None:
        self.events.clear()


def fan_out(sinks: Iterable[EventSink]) -> EventSink:
    """One sink that forwards to several."""
    targets = list(sinks)

    def sink(event: str, data: dict[str, Any]) -> None:
        for target in targets:
            target(event, data)

    return sink
