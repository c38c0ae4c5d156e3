"""Services the executor offers to the node that is running: progress, interrupt, warnings.

The executor installs a `NodeRuntime` in a context variable around each node call, so node code
(and the ComfyUI compatibility shims) can report without knowing who listens.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from graph import events as ev


class Interrupted(Exception):
    """Raised inside a node when the run was asked to stop."""


class ExecutionBlocker:
    """Returned in an output slot: nodes that read it do not run and pass it on. At an output
    node it ends silently when `message` is None, else as an error carrying the message."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message


@dataclass
class NodeRuntime:
    node_id: str | None = None
    prompt_id: str | None = None
    emit: Callable[[str, dict[str, Any]], None] = field(default=lambda event, data: None)
    interrupt_requested: Callable[[], bool] = field(default=lambda: False)
    folders: Any = None
    # how a sampler should make step previews: "none", "latent2rgb", "taesd" or "auto" (TAESD when
    # its decoder file is there); the server sets it from its setting or the prompt's extra_data
    preview_method: str = "auto"

    def progress(self, value: int, total: int, preview: object | None = None) -> None:
        self.emit("progress", {"value": int(value), "max": int(total), "node": self.node_id,
                               "prompt_id": self.prompt_id, "preview": preview})

    def check_interrupt(self) -> None:
        if self.interrupt_requested():
            raise Interrupted(f"interrupted in node {self.node_id}")

    def record(self, name: str, data: Any) -> None:
        """Facts worth keeping with the prompt's history (e.g. LoRA key coverage)."""
        self.emit(ev.NODE_RECORD, {"node": self.node_id, "prompt_id": self.prompt_id, "name": name, "data": data})

    def warn(self, message: str, data: dict[str, Any] | None = None) -> None:
        self.emit("warning", {"node": self.node_id, "prompt_id": self.prompt_id,
                              "message": message, **(data or {})})


CURRENT_RUNTIME: contextvars.ContextVar[NodeRuntime] = contextvars.ContextVar("easel_node_runtime")
_current = CURRENT_RUNTIME
_IDLE = NodeRuntime()


def current() -> NodeRuntime:
    """The runtime of the node being executed (a silent one outside the executor)."""
    return _current.get(_IDLE)


@contextlib.contextmanager
def running(runtime: NodeRuntime) -> Iterator[NodeRuntime]:
    token = _current.set(runtime)
    try:
        yield runtime
    finally:
        _current.reset(token)
