"""ComfyUI's calling convention for one node, as pure functions over plain values.

How resolved inputs become the keyword arguments of one or more calls (hidden inputs, mapping
over lists unless INPUT_IS_LIST), how a return value becomes outputs and ui (OUTPUT_IS_LIST),
and how a failed call is described in an `execution_error`. The executor owns the run state and
makes the calls; nothing here touches it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .nodespec import NodeSpec

HIDDEN_FROM_EXTRA = {"EXTRA_PNGINFO": "extra_pnginfo", "AUTH_TOKEN_COMFY_ORG": "auth_token_comfy_org",
                     "API_KEY_COMFY_ORG": "api_key_comfy_org", "COMFY_USAGE_SOURCE": "comfy_usage_source"}


def hidden_inputs(spec: NodeSpec, node_id: str, prompt: Mapping[str, Any],
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """The hidden inputs a node declared; `prompt` is the prompt as submitted (before expansions)."""
    out: dict[str, Any] = {}
    for name, kind in spec.hidden.items():
        if kind == "PROMPT":
            out[name] = prompt
        elif kind == "UNIQUE_ID":
            out[name] = node_id
        elif kind in HIDDEN_FROM_EXTRA:
            out[name] = extra.get(HIDDEN_FROM_EXTRA[kind])
        else:
            out[name] = None
    return out


def call_arguments(inputs: dict[str, list[Any]], hidden: dict[str, Any], input_is_list: bool) -> list[dict[str, Any]]:
    """The keyword arguments of each call: one call with whole lists for INPUT_IS_LIST; otherwise
    one call per item of the longest list, shorter lists repeating their last item, and no call at
    all when an input is an empty list."""
    if input_is_list:
        return [dict(inputs, **hidden)]
    lengths = [len(v) for v in inputs.values()]
    if all(n == 1 for n in lengths):        # the common case: one call, one item each
        kwargs = {k: v[0] for k, v in inputs.items()}
        if hidden:
            kwargs.update(hidden)
        return [kwargs]
    count = 0 if 0 in lengths else max(lengths, default=1)
    return [{k: v[min(i, len(v) - 1)] for k, v in inputs.items()} | hidden for i in range(count)]


def split_result(result: Any, spec: NodeSpec) -> tuple[Sequence[Any], dict[str, Any] | None]:
    """A node's return value as (output values, ui): a tuple, None, or {"result", "ui"}."""
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


def add_values(outputs: tuple[list[Any], ...], values: Sequence[Any], spec: NodeSpec) -> None:
    """Append one call's values to the output lists; an OUTPUT_IS_LIST slot's value is a list of items."""
    for slot in range(min(len(outputs), len(values))):
        if spec.output_is_list[slot]:
            outputs[slot].extend(values[slot])
        else:
            outputs[slot].append(values[slot])


def merge_ui(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The ui of several calls of one node: lists add up, anything else the last call wins."""
    if old is None:
        return dict(new)
    merged = dict(old)
    for key, value in new.items():
        if key in merged and isinstance(merged[key], list) and isinstance(value, list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def exception_name(exc: BaseException) -> str:
    """`ValueError` for builtins, `module.Name` otherwise (ComfyUI's `exception_type`)."""
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def shown_inputs(kwargs: Mapping[str, Any], spec: NodeSpec, limit: int = 200) -> dict[str, list[str]]:
    """The `current_inputs` of an error: short reprs (values may be tensors), no hidden inputs."""
    out: dict[str, list[str]] = {}
    for name, value in kwargs.items():
        if name not in spec.hidden:
            text = repr(value)
            out[name] = [text if len(text) <= limit else text[: limit - 3] + "..."]
    return out
