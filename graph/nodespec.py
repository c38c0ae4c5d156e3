"""What the engine reads from a node class (ComfyUI classic API), gathered once per run.

`INPUT_TYPES()` is called for every run because combo lists of files change; a `SpecTable` asks
each class once per validation or execution, however many nodes use it.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class NodeRegistry(Protocol):
    """What graph/ needs of the node registry (nodes.registry.Registry satisfies it)."""

    def get(self, class_type: str) -> type | None: ...


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str | list[Any]        # a type name, or the list of choices of a classic combo
    options: Mapping[str, Any]
    section: str                 # "required" | "optional"

    @property
    def lazy(self) -> bool:
        return bool(self.options.get("lazy"))

    @property
    def raw_link(self) -> bool:
        return bool(self.options.get("rawLink"))


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    cls: type
    inputs: Mapping[str, InputSpec]
    hidden: Mapping[str, str]
    return_types: tuple[Any, ...]
    output_is_list: tuple[bool, ...]
    input_is_list: bool
    output_node: bool
    function: str
    not_idempotent: bool
    has_is_changed: bool
    validate_params: frozenset[str] | None     # names VALIDATE_INPUTS takes; None = no VALIDATE_INPUTS
    validate_takes_all: bool                    # VALIDATE_INPUTS(**kwargs)
    validate_input_types: bool                  # VALIDATE_INPUTS(input_types=...)

    @property
    def has_lazy(self) -> bool:
        return any(spec.lazy for spec in self.inputs.values())


def _input_section(types: Mapping[str, Any], section: str) -> dict[str, InputSpec]:
    out: dict[str, InputSpec] = {}
    for name, spec in (types.get(section) or {}).items():
        if isinstance(spec, (list, tuple)) and spec:
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
        else:
            kind, opts = spec, {}
        if isinstance(kind, tuple):
            kind = list(kind)
        if kind == "COMBO" and isinstance(opts.get("options"), (list, tuple)):
            kind = list(opts["options"])      # the newer combo form (V3 nodes): checked like a list
        out[name] = InputSpec(name, kind, opts, section)
    return out


def read_spec(class_type: str, cls: type) -> NodeSpec:
    types = cls.INPUT_TYPES()
    inputs = _input_section(types, "required")
    inputs.update(_input_section(types, "optional"))
    hidden = dict(types.get("hidden") or {})
    return_types = tuple(getattr(cls, "RETURN_TYPES", ()))
    out_list = tuple(getattr(cls, "OUTPUT_IS_LIST", ()) or ())
    out_list = tuple(bool(x) for x in out_list) + (False,) * (len(return_types) - len(out_list))
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    params: frozenset[str] | None = None
    takes_all = takes_types = False
    if validate is not None:
        sig = inspect.signature(validate)
        params = frozenset(p.name for p in sig.parameters.values()
                           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        takes_all = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        takes_types = "input_types" in params
    return NodeSpec(
        class_type=class_type, cls=cls, inputs=inputs, hidden=hidden, return_types=return_types,
        output_is_list=out_list, input_is_list=bool(getattr(cls, "INPUT_IS_LIST", False)),
        output_node=getattr(cls, "OUTPUT_NODE", False) is True,
        function=str(getattr(cls, "FUNCTION", "")),
        not_idempotent=bool(getattr(cls, "NOT_IDEMPOTENT", False)),
        has_is_changed=callable(getattr(cls, "IS_CHANGED", None)),
        validate_params=params, validate_takes_all=takes_all, validate_input_types=takes_types)


class SpecTable:
    """NodeSpec per class_type, read once per run; unknown classes map to None."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self._specs: dict[str, NodeSpec | None] = {}

    def get(self, class_type: str) -> NodeSpec | None:
        try:
            return self._specs[class_type]
        except KeyError:
            cls = self.registry.get(class_type)
            spec = read_spec(class_type, cls) if cls is not None else None
            self._specs[class_type] = spec
            return spec
