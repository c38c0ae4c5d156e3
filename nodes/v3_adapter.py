"""ComfyUI V3 plugins (protocol.md 7): load a `comfy_entrypoint` and adapt its node classes.

`load_extension(entrypoint)` calls the entrypoint (awaiting it when it returns a coroutine), awaits
`on_load()` and `get_node_list()` on a private event loop (in a worker thread when this thread
already runs a loop), and returns the node classes. `adapt(node_cls)` returns a classic node class
(protocol.md 6.2) built from `node_cls.GET_SCHEMA()`:

- `INPUT_TYPES()` asks `define_schema()` anew (file combos stay fresh) and gives the sections as
  ComfyUI's V1 conversion does: `{id: (io_type, options)}` with the option keys of `Input.as_dict()`.
  Hidden values are classic strings (`{"unique_id": "UNIQUE_ID"}`), which Easel's executor fills;
  a hidden name equal to an input id is renamed `hidden_<name>` so the two never collide.
- `RETURN_TYPES`, `RETURN_NAMES` (display name, else the type), `OUTPUT_IS_LIST`, `OUTPUT_TOOLTIPS`,
  `OUTPUT_NODE`, `INPUT_IS_LIST`, `CATEGORY`, `DESCRIPTION`, `NOT_IDEMPOTENT`, `SEARCH_ALIASES`,
  `DEPRECATED`, `EXPERIMENTAL`, `DEV_ONLY`, `API_NODE`, `HAS_INTERMEDIATE_OUTPUT`.
- `FUNCTION` runs `execute` on a per-call subclass of the V3 class whose `hidden` holds the hidden
  values; `check_lazy_status`, and `IS_CHANGED` / `VALIDATE_INPUTS` when the class overrides
  `fingerprint_inputs` / `validate_inputs` (VALIDATE_INPUTS keeps its signature: the executor reads
  which inputs it checks from it), run the same way. Async methods stay async (the executor awaits).
- Results: a NodeOutput becomes a tuple, `{"ui", "result"}` or `{"result", "expand"[, "ui"]}`;
  `block_execution=msg` fills every output with `graph.runtime.ExecutionBlocker(msg)`. Tuples,
  dicts, None and a bare ExecutionBlocker are accepted as ComfyUI accepts them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine
from types import ModuleType
from typing import Any, ClassVar, TypeVar

from graph.runtime import ExecutionBlocker
from nodes.compat_install import install_compat_modules

_T = TypeVar("_T")
IO_MODULE = "comfy_api.latest._io"


def io_module() -> ModuleType:
    """`comfy_api.latest.io` as plugins import it (the same module object, so isinstance agrees)."""
    module = sys.modules.get(IO_MODULE)
    if module is not None:
        return module
    install_compat_modules()
    return importlib.import_module(IO_MODULE)


def is_v3_node(obj: Any) -> bool:
    """True for an `io.ComfyNode` subclass (False whenever no plugin has imported comfy_api)."""
    module = sys.modules.get(IO_MODULE)
    return module is not None and isinstance(obj, type) and issubclass(obj, module.ComfyNode) \
        and obj is not module.ComfyNode


def run_coroutine(awaitable: Awaitable[_T]) -> _T:
    """Run to completion on a private loop, never touching the thread's current loop."""
    async def main() -> _T:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_private(main())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="easel-v3") as pool:
        return pool.submit(_run_private, main()).result()


def _run_private(coro: Coroutine[Any, Any, _T]) -> _T:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def load_extension(entrypoint: Callable[[], Any]) -> list[Any]:
    """Call a plugin's comfy_entrypoint and return what its extension's get_node_list() gives."""
    async def load() -> list[Any]:
        extension = entrypoint()
        if inspect.isawaitable(extension):
            extension = await extension
        if not callable(getattr(extension, "get_node_list", None)):
            raise TypeError(f"comfy_entrypoint() returned {type(extension).__name__}, not a ComfyExtension "
                            "(an object with async get_node_list())")
        on_load = getattr(extension, "on_load", None)
        if callable(on_load):
            done = on_load()
            if inspect.isawaitable(done):
                await done
        nodes = extension.get_node_list()
        if inspect.isawaitable(nodes):
            nodes = await nodes
        if not isinstance(nodes, (list, tuple)):
            raise TypeError(f"get_node_list() returned {type(nodes).__name__}, not a list of node classes")
        return list(nodes)

    return run_coroutine(load())


def hidden_keys(schema: Any) -> dict[str, Any]:
    """INPUT_TYPES "hidden" key -> Hidden member: the member's name unless an input already has it."""
    taken = {i.id for item in schema.inputs for i in item.get_all()}
    keys: dict[str, Any] = {}
    for member in schema.hidden:
        key = member.name
        while key in taken:
            key = f"hidden_{key}"
        taken.add(key)
        keys[key] = member
    return keys


def v1_input_types(schema: Any) -> dict[str, dict[str, Any]]:
    """The classic INPUT_TYPES dict of a finalized schema."""
    types: dict[str, dict[str, Any]] = {"required": {}}
    for item in schema.inputs:
        options = item.as_dict()
        options.pop("optional", None)
        types.setdefault("optional" if item.optional else "required", {})[item.id] = (item.get_io_type(), options)
    keys = hidden_keys(schema)
    if keys:
        types["hidden"] = {key: member.value for key, member in keys.items()}
    return types


class V3NodeAdapter:
    """Base of the classic classes `adapt()` builds; one instance per node id, as for any node."""

    V3_NODE: ClassVar[Any]                       # the plugin's io.ComfyNode subclass
    V3_HIDDEN: ClassVar[dict[str, Any]] = {}     # hidden kwarg name -> io.Hidden member
    V3_EXPAND: ClassVar[bool] = False
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    FUNCTION = "execute_v3"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:
        return v1_input_types(cls.V3_NODE.GET_SCHEMA())

    @classmethod
    def bind(cls, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(a subclass of the V3 class whose `hidden` holds the hidden kwargs, the other kwargs)."""
        node = cls.V3_NODE
        inputs = dict(kwargs)
        values = {member: inputs.pop(key) for key, member in cls.V3_HIDDEN.items() if key in inputs}
        holder = io_module().HiddenHolder.from_dict(values)
        clone = type(node.__name__, (node,), {"hidden": holder, "__module__": node.__module__,
                                              "__qualname__": node.__qualname__})
        return clone, inputs

    def execute_v3(self, **kwargs: Any) -> Any:
        clone, inputs = self.bind(kwargs)
        out = clone.execute(**inputs)
        if inspect.isawaitable(out):
            return self._finish(out)
        return self.classic_result(out)

    async def _finish(self, pending: Awaitable[Any]) -> Any:
        return self.classic_result(await pending)

    def check_lazy_status(self, **kwargs: Any) -> Any:
        clone, inputs = self.bind(kwargs)
        return clone.check_lazy_status(**inputs)

    @classmethod
    def classic_result(cls, out: Any) -> Any:
        """A V3 return value in the classic form the executor reads."""
        io = io_module()
        count = len(cls.RETURN_TYPES)
        if out is None:
            return ()
        if isinstance(out, ExecutionBlocker):
            return tuple(out for _ in range(count))
        if isinstance(out, (tuple, list)):
            return tuple(out)
        if isinstance(out, dict):
            if isinstance(out.get("result"), ExecutionBlocker):
                out = {**out, "result": tuple(out["result"] for _ in range(count))}
            out = io.NodeOutput.from_dict(out)
        if not isinstance(out, io.NodeOutput):
            raise TypeError(f"{cls.V3_NODE.__qualname__}.execute() must return an io.NodeOutput, a tuple or "
                            f"a dict, returned {type(out).__name__}")
        values = tuple(out.args)
        if out.block_execution is not None:
            values = tuple(ExecutionBlocker(out.block_execution) for _ in range(count))
        ui = out.ui.as_dict() if isinstance(out.ui, io._UIOutput) else out.ui
        if out.expand is not None:
            if not cls.V3_EXPAND:
                raise ValueError(f"{cls.V3_NODE.__qualname__} returned an expansion but its schema does not "
                                 "set enable_expand=True")
            return {"result": values, "expand": out.expand, **({"ui": ui} if ui is not None else {})}
        if ui is not None:
            return {"ui": ui, "result": values}
        return values


def _hook(node: Any, name: str, keep_signature: bool) -> Callable[..., Any]:
    """IS_CHANGED / VALIDATE_INPUTS calling the V3 classmethod `name` (awaited when async)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        owner = args[0] if args else None
        if isinstance(owner, type) and issubclass(owner, V3NodeAdapter):
            clone, inputs = owner.bind(kwargs)
        else:
            clone, inputs = type(node.__name__, (node,), {"hidden": io_module().HiddenHolder()}), kwargs
        out = getattr(clone, name)(**inputs)
        return run_coroutine(out) if inspect.isawaitable(out) else out

    if keep_signature:
        call.__signature__ = inspect.signature(getattr(node, name))  # type: ignore[attr-defined]
        return staticmethod(call)                                   # type: ignore[return-value]
    return classmethod(call)                                        # type: ignore[return-value]


def adapt(node: Any) -> tuple[str, str | None, type[V3NodeAdapter]]:
    """(node_id, display_name, classic class) for a V3 node class; raises for a broken schema."""
    io = io_module()
    if not is_v3_node(node):
        raise TypeError(f"{node!r} is not a V3 node class (an io.ComfyNode subclass)")
    schema = node.GET_SCHEMA()
    outputs = schema.outputs
    attrs: dict[str, Any] = {
        "__module__": node.__module__, "__qualname__": node.__qualname__, "__doc__": node.__doc__,
        "V3_NODE": node, "V3_HIDDEN": hidden_keys(schema), "V3_EXPAND": bool(schema.enable_expand),
        "RETURN_TYPES": tuple(o.get_io_type() for o in outputs),
        "RETURN_NAMES": tuple(o.display_name or o.get_io_type() for o in outputs),
        "OUTPUT_IS_LIST": tuple(bool(o.is_output_list) for o in outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in outputs),
        "OUTPUT_NODE": bool(schema.is_output_node), "INPUT_IS_LIST": bool(schema.is_input_list),
        "CATEGORY": schema.category, "DESCRIPTION": schema.description or "",
        "NOT_IDEMPOTENT": bool(schema.not_idempotent), "SEARCH_ALIASES": list(schema.search_aliases or []),
        "DEPRECATED": bool(schema.is_deprecated), "EXPERIMENTAL": bool(schema.is_experimental),
        "DEV_ONLY": bool(schema.is_dev_only), "API_NODE": bool(schema.is_api_node),
        "HAS_INTERMEDIATE_OUTPUT": bool(schema.has_intermediate_output),
    }
    if schema.essentials_category:
        attrs["ESSENTIALS_CATEGORY"] = schema.essentials_category
    if io.first_real_override(node, "fingerprint_inputs") is not None:
        attrs["IS_CHANGED"] = _hook(node, "fingerprint_inputs", keep_signature=False)
    if io.first_real_override(node, "validate_inputs") is not None:
        attrs["VALIDATE_INPUTS"] = _hook(node, "validate_inputs", keep_signature=True)
    return schema.node_id, schema.display_name, type(node.__name__, (V3NodeAdapter,), attrs)
