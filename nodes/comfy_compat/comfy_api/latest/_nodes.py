"""The node side of `comfy_api.latest.io`: ComfyNode, Schema, NodeOutput, Hidden (Easel's own code).

Re-exported by `_io`; plugins reach these as `io.ComfyNode`, `io.Schema`, `io.NodeOutput`, `io.Hidden`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ._base import Input, Output


class Hidden(str, Enum):
    """Values the executor fills in; a node lists the ones it wants in `Schema.hidden` and reads them
    as `cls.hidden.<name>` while it runs."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """`cls.hidden` during a call: one attribute per Hidden member; unknown names read as None."""

    def __init__(self, unique_id: str | None = None, prompt: Any = None, extra_pnginfo: Any = None,
                 dynprompt: Any = None, auth_token_comfy_org: str | None = None,
                 api_key_comfy_org: str | None = None, **more: Any) -> None:
        self.unique_id, self.prompt, self.extra_pnginfo, self.dynprompt = unique_id, prompt, extra_pnginfo, dynprompt
        self.auth_token_comfy_org, self.api_key_comfy_org = auth_token_comfy_org, api_key_comfy_org
        self.__dict__.update(more)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    @classmethod
    def from_dict(cls, values: Mapping[Any, Any] | None) -> HiddenHolder:
        """Keys may be Hidden members, their values ("UNIQUE_ID") or their names ("unique_id")."""
        kwargs: dict[str, Any] = {}
        for key, value in (values or {}).items():
            if isinstance(key, Hidden):
                kwargs[key.name] = value
            elif key in Hidden.__members__:
                kwargs[str(key)] = value
            else:
                kwargs[Hidden(key).name] = value
        return cls(**kwargs)


@dataclass
class Schema:
    """What a V3 node declares; `nodes/v3_adapter.py` turns it into the classic class attributes."""

    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    search_aliases: list[str] = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    has_intermediate_output: bool = False
    accept_all_inputs: bool = False          # accepted, not acted on by Easel
    essentials_category: str | None = None
    price_badge: Any = None                  # accepted, not shown by Easel

    def finalize(self) -> None:
        """Fill the defaults ComfyUI fills: hidden values output and API nodes need, output ids."""
        self.inputs = list(self.inputs or [])
        self.outputs = list(self.outputs or [])
        self.hidden = [h if isinstance(h, Hidden) else Hidden(h) for h in (self.hidden or [])]
        wanted = []
        if self.is_api_node:
            wanted += [Hidden.auth_token_comfy_org, Hidden.api_key_comfy_org]
        if self.is_output_node:
            wanted += [Hidden.prompt, Hidden.extra_pnginfo]
        self.hidden += [h for h in wanted if h not in self.hidden]
        for index, output in enumerate(self.outputs):
            if getattr(output, "id", None) is None:
                output.id = f"_{index}_{output.io_type}_"

    def validate(self) -> None:
        """Raise ValueError/TypeError for a schema Easel cannot turn into a node."""
        from ._base import Input, Output
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"Schema.node_id must be a non-empty str, got {self.node_id!r}")
        issues = []
        for what, items, kind in (("inputs", self.inputs, Input), ("outputs", self.outputs, Output)):
            wrong = [type(i).__name__ for i in items if not isinstance(i, kind)]
            if wrong:
                issues.append(f"{what} must be io.{kind.__name__} objects (e.g. io.Int.{kind.__name__}(...)), "
                              f"found {', '.join(wrong)}")
        if issues:
            raise TypeError(f"node {self.node_id}: " + "; ".join(issues))
        input_ids = [i.id for item in self.inputs for i in item.get_all()]
        output_ids = [o.id for o in self.outputs]
        for what, ids in (("Input", input_ids), ("Output", output_ids)):
            twice = sorted(str(k) for k, n in Counter(ids).items() if n > 1)
            if twice:
                issues.append(f"{what} ids must be unique, but {twice} are not")
        both = sorted(set(input_ids) & set(output_ids))
        if both:
            issues.append(f"ids must differ between inputs and outputs, but {both} do not")
        if issues:
            raise ValueError(f"node {self.node_id}: " + "; ".join(issues))
        for item in [*self.inputs, *self.outputs]:
            item.validate()


class _UIOutput(ABC):
    """What `NodeOutput(ui=...)` may hold besides a plain dict: an object with as_dict()."""

    @abstractmethod
    def as_dict(self) -> dict[str, Any]: ...


class NodeOutput:
    """A node's result: output values, and optionally a UI dict, a graph expansion, or a blocking message."""

    def __init__(self, *args: Any, ui: _UIOutput | dict[str, Any] | None = None,
                 expand: dict[str, Any] | None = None, block_execution: str | None = None) -> None:
        self.args = args
        self.ui, self.expand, self.block_execution = ui, expand, block_execution

    @property
    def result(self) -> tuple[Any, ...] | None:
        return self.args if self.args else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeOutput:
        """A classic return dict ({"result", "ui", "expand"}) as a NodeOutput."""
        from graph.runtime import ExecutionBlocker
        result = data.get("result")
        if isinstance(result, ExecutionBlocker):
            return cls(block_execution=result.message)
        return cls(*(result or ()), ui=data.get("ui"), expand=data.get("expand"))

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    """Base class of V3 nodes. Override `define_schema` and `execute` (classmethods); the other
    classmethods are optional. `cls.hidden` holds the hidden values during a call."""

    RELATIVE_PYTHON_MODULE: ClassVar[str | None] = None
    hidden: ClassVar[HiddenHolder | None] = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} defines no define_schema() classmethod")

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} defines no execute() classmethod")

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        """Optional (V1 VALIDATE_INPUTS): True, or an error message."""
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        """Optional (V1 IS_CHANGED): a value that differs from last run's when the node must run again."""
        raise NotImplementedError

    @classmethod
    def check_lazy_status(cls, **kwargs: Any) -> list[str]:
        """The lazy inputs still needed (unevaluated ones arrive as None); by default all of them."""
        return [name for name, value in kwargs.items() if value is None]

    @classmethod
    def GET_BASE_CLASS(cls) -> type[ComfyNode]:
        return ComfyNode

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        """define_schema(), finalized and validated."""
        if first_real_override(cls, "define_schema") is None:
            raise TypeError(f"V3 node class {cls.__qualname__} has no define_schema() classmethod")
        if first_real_override(cls, "execute") is None:
            raise TypeError(f"V3 node class {cls.__qualname__} has no execute() classmethod")
        schema = cls.define_schema()
        if not isinstance(schema, Schema):
            raise TypeError(f"{cls.__qualname__}.define_schema() must return an io.Schema, "
                            f"got {type(schema).__name__}")
        schema.finalize()
        schema.validate()
        return schema


def first_real_override(cls: type, name: str, base: type | None = None) -> Callable[..., Any] | None:
    """`getattr(cls, name)` when a class between `cls` and `base` (default ComfyNode) defines it, else None."""
    stop = base if base is not None else ComfyNode
    for klass in cls.__mro__:
        if klass is stop:
            return None
        if name in vars(klass):
            return getattr(cls, name)
    return None
