"""Validation errors as data, in ComfyUI's shape (protocol.md 3.1).

A prompt-level error is `{"type", "message", "details", "extra_info"}`; node-level errors are
collected per node id as `{"errors": [...], "dependent_outputs": [...], "class_type": ...}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class InputError:
    type: str
    message: str
    details: str
    extra_info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "details": self.details,
                "extra_info": dict(self.extra_info)}


def input_error(kind: str, message: str, details: str, input_name: str | None = None,
                **extra: Any) -> InputError:
    info: dict[str, Any] = {}
    if input_name is not None:
        info["input_name"] = input_name
    info.update(extra)
    return InputError(kind, message, details, info)


def prompt_error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": dict(extra)}


@dataclass
class ValidationReport:
    """What validation found: the prompt-level error (if the prompt cannot run), per-node errors,
    the output nodes that will run, and the coerced literal inputs of every valid node."""

    error: dict[str, Any] | None = None
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    literals: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def add(self, node_id: str, class_type: str | None, err: InputError) -> None:
        entry = self.node_errors.setdefault(
            node_id, {"errors": [], "dependent_outputs": [], "class_type": class_type})
        entry["errors"].append(err.to_json())

    def to_json(self) -> dict[str, Any]:
        """The body ComfyUI answers: `{"error": ..., "node_errors": ...}`."""
        return {"error": self.error, "node_errors": self.node_errors}

    def describe(self) -> str:
        """Readable lines for a terminal: the prompt error, then one line per node error."""
        lines = []
        if self.error:
            lines.append(f"{self.error['message']}" + (f": {self.error['details']}" if self.error.get("details") and not self.node_errors else ""))
        for node_id, entry in self.node_errors.items():
            for err in entry["errors"]:
                where = f"node {node_id} ({entry.get('class_type')})"
                name = err["extra_info"].get("input_name")
                if name:
                    where += f", input {name!r}"
                lines.append(f"  {where}: {err['message']}: {err['details']}")
        return "\n".join(lines)
