"""The calling convention: list mapping, results, ui merging and what an error shows."""
from __future__ import annotations

from typing import Any

import pytest

from graph.node_call import (add_values, call_arguments, exception_name, hidden_inputs, merge_ui, shown_inputs,
                             split_result)
from graph.nodespec import read_spec


class Node:
    FUNCTION = "run"
    RETURN_TYPES = ("INT", "INT")
    OUTPUT_IS_LIST = (False, True)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"a": ("INT",)}, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID",
                                                         "extra_pnginfo": "EXTRA_PNGINFO", "other": "DYNPROMPT"}}


SPEC = read_spec("Node", Node)


def test_hidden_inputs() -> None:
    prompt = {"7": {"class_type": "Node", "inputs": {}}}
    assert hidden_inputs(SPEC, "7", prompt, {"extra_pnginfo": {"k": 1}}) == {
        "prompt": prompt, "unique_id": "7", "extra_pnginfo": {"k": 1}, "other": None}


def test_lists_map_calls_with_the_last_item_repeating() -> None:
    assert call_arguments({"a": [1], "b": [2]}, {"h": 0}, False) == [{"a": 1, "b": 2, "h": 0}]
    assert call_arguments({"a": [1, 2, 3], "b": [9]}, {}, False) == [{"a": 1, "b": 9}, {"a": 2, "b": 9},
                                                                     {"a": 3, "b": 9}]
    assert call_arguments({"a": [1, 2], "b": []}, {}, False) == []        # an empty list: no call
    assert call_arguments({}, {"h": 0}, False) == [{"h": 0}]
    assert call_arguments({"a": [1, 2]}, {"h": 0}, True) == [{"a": [1, 2], "h": 0}]   # INPUT_IS_LIST


def test_results_become_outputs_and_ui() -> None:
    assert split_result((1, [2, 3]), SPEC) == ((1, [2, 3]), None)
    assert split_result({"ui": {"x": [1]}, "result": (4,)}, SPEC) == ((4,), {"x": [1]})
    assert split_result(None, SPEC) == ((), None)
    with pytest.raises(TypeError, match="must return a tuple"):
        split_result(5, SPEC)
    outputs: tuple[list[Any], ...] = ([], [])
    add_values(outputs, (1, [2, 3]), SPEC)
    add_values(outputs, (4, [5]), SPEC)
    assert outputs == ([1, 4], [2, 3, 5])          # the OUTPUT_IS_LIST slot adds up items


def test_ui_of_several_calls() -> None:
    assert merge_ui(None, {"images": [1]}) == {"images": [1]}
    assert merge_ui({"images": [1], "text": "a"}, {"images": [2], "text": "b"}) == {"images": [1, 2], "text": "b"}


def test_error_details() -> None:
    class Custom(Exception):
        pass

    assert exception_name(ValueError("x")) == "ValueError"
    assert exception_name(Custom()) == f"{__name__}.Custom"
    shown = shown_inputs({"a": "x" * 500, "prompt": {}}, SPEC)
    assert list(shown) == ["a"] and len(shown["a"][0]) == 200 and shown["a"][0].endswith("...")
