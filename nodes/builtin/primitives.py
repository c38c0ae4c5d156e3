"""Pure nodes: primitives, strings and arithmetic (ComfyUI's names where ComfyUI has them)."""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

INT_LIMIT = 0xFFFFFFFFFFFFFFFF
FLOAT_LIMIT = 1e300


class _Primitive:
    CATEGORY = "utils/primitive"
    FUNCTION = "execute"

    def execute(self, value: Any) -> tuple[Any]:
        return (value,)


class PrimitiveInt(_Primitive):
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": -INT_LIMIT, "max": INT_LIMIT,
                                               "control_after_generate": True})}}


class PrimitiveFloat(_Primitive):
    RETURN_TYPES = ("FLOAT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("FLOAT", {"default": 0.0, "min": -FLOAT_LIMIT, "max": FLOAT_LIMIT, "step": 0.01})}}


class PrimitiveString(_Primitive):
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("STRING", {"default": ""})}}


class PrimitiveStringMultiline(_Primitive):
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("STRING", {"default": "", "multiline": True})}}


class PrimitiveBoolean(_Primitive):
    RETURN_TYPES = ("BOOLEAN",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("BOOLEAN", {"default": False})}}


class StringConcatenate:
    CATEGORY = "utils/string"
    FUNCTION = "execute"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"string_a": ("STRING", {"multiline": True}),
                             "string_b": ("STRING", {"multiline": True}),
                             "delimiter": ("STRING", {"default": ""})}}

    def execute(self, string_a: str, string_b: str, delimiter: str) -> tuple[str]:
        return (delimiter.join((string_a, string_b)),)


class StringReplace:
    CATEGORY = "utils/string"
    FUNCTION = "execute"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"string": ("STRING", {"multiline": True}),
                             "find": ("STRING", {"multiline": True}),
                             "replace": ("STRING", {"multiline": True})}}

    def execute(self, string: str, find: str, replace: str) -> tuple[str]:
        return (string.replace(find, replace),)


def _safe_div(a: float, b: float) -> float:
    if b == 0:
        raise ZeroDivisionError(f"division of {a} by zero")
    return a / b


def _int_div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError(f"division of {a} by zero")
    return a // b


def _int_mod(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError(f"modulo of {a} by zero")
    return a % b


INT_OPS: dict[str, Callable[[int, int], int]] = {
    "add": operator.add, "subtract": operator.sub, "multiply": operator.mul, "divide": _int_div,
    "modulo": _int_mod, "power": operator.pow, "min": min, "max": max}
FLOAT_OPS: dict[str, Callable[[float, float], float]] = {
    "add": operator.add, "subtract": operator.sub, "multiply": operator.mul, "divide": _safe_div,
    "power": math.pow, "min": min, "max": max}


class IntMath:
    """a <operation> b on integers."""
    CATEGORY = "utils/math"
    FUNCTION = "execute"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"a": ("INT", {"default": 0, "min": -INT_LIMIT, "max": INT_LIMIT}),
                             "b": ("INT", {"default": 0, "min": -INT_LIMIT, "max": INT_LIMIT}),
                             "operation": (list(INT_OPS), {"default": "add"})}}

    def execute(self, a: int, b: int, operation: str) -> tuple[int]:
        return (int(INT_OPS[operation](a, b)),)


class FloatMath:
    """a <operation> b on floats."""
    CATEGORY = "utils/math"
    FUNCTION = "execute"
    RETURN_TYPES = ("FLOAT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"a": ("FLOAT", {"default": 0.0, "min": -FLOAT_LIMIT, "max": FLOAT_LIMIT, "step": 0.01}),
                             "b": ("FLOAT", {"default": 0.0, "min": -FLOAT_LIMIT, "max": FLOAT_LIMIT, "step": 0.01}),
                             "operation": (list(FLOAT_OPS), {"default": "add"})}}

    def execute(self, a: float, b: float, operation: str) -> tuple[float]:
        return (float(FLOAT_OPS[operation](a, b)),)


class IntToFloat:
    CATEGORY = "utils/math"
    FUNCTION = "execute"
    RETURN_TYPES = ("FLOAT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": -INT_LIMIT, "max": INT_LIMIT})}}

    def execute(self, value: int) -> tuple[float]:
        return (float(value),)


class ShowText:
    """Shows a string in the UI (an output node, so a graph of pure nodes has something to run)."""
    CATEGORY = "utils"
    FUNCTION = "execute"
    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    def execute(self, text: str) -> dict[str, Any]:
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "PrimitiveInt": PrimitiveInt, "PrimitiveFloat": PrimitiveFloat, "PrimitiveString": PrimitiveString,
    "PrimitiveStringMultiline": PrimitiveStringMultiline, "PrimitiveBoolean": PrimitiveBoolean,
    "StringConcatenate": StringConcatenate, "StringReplace": StringReplace,
    "IntMath": IntMath, "FloatMath": FloatMath, "IntToFloat": IntToFloat, "ShowText": ShowText,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PrimitiveInt": "Int", "PrimitiveFloat": "Float", "PrimitiveString": "String",
    "PrimitiveStringMultiline": "String (Multiline)", "PrimitiveBoolean": "Boolean",
    "StringConcatenate": "Concatenate", "StringReplace": "Replace",
    "IntMath": "Int Math", "FloatMath": "Float Math", "IntToFloat": "Int to Float", "ShowText": "Show Text",
}
