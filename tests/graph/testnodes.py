"""Node classes used by the graph tests: they record calls so tests can see what ran."""
from __future__ import annotations

from typing import Any

from graph.runtime import current

CALLS: list[tuple[str, Any]] = []


class Const:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100})}}

    def run(self, value: int) -> tuple[int]:
        CALLS.append(("Const", value))
        return (value,)


class Add:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}

    def run(self, a: int, b: int) -> tuple[int]:
        CALLS.append(("Add", (a, b)))
        return (a + b,)


class Mode:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"mode": (["fast", "slow"],), "label": ("STRING", {"default": ""}),
                             "ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0}),
                             "flag": ("BOOLEAN", {"default": False})}}

    def run(self, mode: str, label: str, ratio: float, flag: bool) -> tuple[str]:
        return (f"{mode}:{label}:{ratio}:{flag}",)


class Sink:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("*",)}}

    def run(self, value: Any) -> dict[str, Any]:
        CALLS.append(("Sink", value))
        return {"ui": {"values": [value]}}


class Volatile:
    """IS_CHANGED returns NaN: always re-runs."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def IS_CHANGED(cls, value: int) -> float:
        return float("nan")

    def run(self, value: int) -> tuple[int]:
        CALLS.append(("Volatile", value))
        return (value,)


TOKEN = {"value": "a"}


class Watched:
    """IS_CHANGED returns a value tests change from outside (like a file hash)."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def IS_CHANGED(cls, value: int) -> Any:
        return TOKEN["value"]

    def run(self, value: int) -> tuple[int]:
        CALLS.append(("Watched", value))
        return (value,)


class UnhashableChanged(Watched):
    @classmethod
    def IS_CHANGED(cls, value: int) -> Any:
        return {"not": ["hashable"]}


class Fanout:
    """OUTPUT_IS_LIST: one list output whose items map a downstream node."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"count": ("INT", {"default": 3, "min": 0, "max": 10})}}

    def run(self, count: int) -> tuple[list[int]]:
        return (list(range(count)),)


class SumList:
    """INPUT_IS_LIST: called once with the whole list."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"values": ("INT",)}}

    def run(self, values: list[int]) -> tuple[int]:
        CALLS.append(("SumList", list(values)))
        return (sum(values),)


class Switch:
    """Lazy inputs: only the branch the switch picks is computed."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"pick_a": ("BOOLEAN", {"default": True}),
                             "a": ("INT", {"lazy": True}), "b": ("INT", {"lazy": True})}}

    def check_lazy_status(self, pick_a: bool, a: Any = None, b: Any = None) -> list[str]:
        return ["a"] if pick_a else ["b"]

    def run(self, pick_a: bool, a: Any = None, b: Any = None) -> tuple[int]:
        return (a if pick_a else b,)


class Boom:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)
    FAIL = {"on": True}

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0})}}

    def run(self, value: int) -> tuple[int]:
        if Boom.FAIL["on"]:
            raise RuntimeError(f"boom with {value}")
        return (value,)


class Steps:
    """Reports progress and polls for interrupt like a sampler does."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)
    ON_STEP: list[Any] = []

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"steps": ("INT", {"default": 5, "min": 1, "max": 100})}}

    def run(self, steps: int) -> tuple[int]:
        rt = current()
        for i in range(steps):
            for hook in Steps.ON_STEP:
                hook(i)
            rt.check_interrupt()
            rt.progress(i + 1, steps)
        return (steps,)


class Checked:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value: int) -> Any:
        return True if value % 2 == 0 else f"value must be even, got {value}"

    def run(self, value: int) -> tuple[int]:
        return (value,)


class AddTimes:
    """Node expansion: adds `b` to `a` `times` times by returning a chain of Add nodes."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT", "STRING")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 1}),
                             "times": ("INT", {"default": 2, "min": 1, "max": 50})}}

    def run(self, a: int, b: int, times: int) -> dict[str, Any]:
        CALLS.append(("AddTimes", times))
        graph: dict[str, Any] = {"c": {"class_type": "Const", "inputs": {"value": a}}}
        prev = "c"
        for i in range(times):
            graph[f"add{i}"] = {"class_type": "Add", "inputs": {"a": [prev, 0], "b": b}}
            prev = f"add{i}"
        return {"result": ([prev, 0], "literal"), "expand": graph}


class Gate:
    """Blocks its output (silently, or with a message) unless open."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0}), "open": ("BOOLEAN", {"default": True}),
                             "message": ("STRING", {"default": ""})}}

    def run(self, value: int, open: bool, message: str) -> tuple[Any]:
        from graph.runtime import ExecutionBlocker
        return (value if open else ExecutionBlocker(message or None),)


class Noted:
    """Passes its value on and records a fact about it for the prompt's history."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0})}}

    def run(self, value: int) -> tuple[int]:
        CALLS.append(("Noted", value))
        current().record("seen", {"value": value, "doubled": 2 * value})
        current().record("values", [value])       # lists add up over the calls of a mapped node
        return (value,)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (AddTimes, Gate, Noted,
    Const, Add, Mode, Sink, Volatile, Watched, UnhashableChanged, Fanout, SumList, Switch, Boom, Steps, Checked)}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
