"""Every validation failure kind: node id, input name and error type in ComfyUI's shape."""
from __future__ import annotations

from typing import Any

import pytest

from graph.cache import OutputCache
from graph.events import EventLog
from graph.executor import Executor
from graph.workflow import WorkflowFormatError, check_api_prompt
from nodes.registry import Registry


def node_error(report: Any, node_id: str) -> dict[str, Any]:
    assert node_id in report.node_errors, report.node_errors
    return report.node_errors[node_id]["errors"][0]


def test_valid_prompt_has_no_errors_and_coerces_literals(executor: Executor) -> None:
    prompt = {"1": {"class_type": "Const", "inputs": {"value": "7"}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    report = executor.validate(prompt)
    assert report.ok and report.node_errors == {}
    assert report.outputs == ["2"]
    assert report.literals["1"] == {"value": 7}


def test_unknown_class_type(executor: Executor) -> None:
    prompt = {"1": {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "Mystery"}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    report = executor.validate(prompt)
    assert report.error["type"] == "missing_node_type"
    assert report.error["extra_info"]["node_id"] == "1"
    assert report.error["extra_info"]["class_type"] == "NoSuchNode"
    assert "Mystery" in report.error["message"]


def test_missing_class_type(executor: Executor) -> None:
    report = executor.validate({"1": {"inputs": {}}})
    assert report.error["type"] == "missing_node_type"
    assert report.error["extra_info"]["node_id"] == "1"


def test_required_input_missing(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Add", "inputs": {"a": 1}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    err = node_error(report, "1")
    assert err["type"] == "required_input_missing"
    assert err["extra_info"]["input_name"] == "b"
    assert report.node_errors["1"]["dependent_outputs"] == ["2"]
    assert report.node_errors["1"]["class_type"] == "Add"
    assert report.error["type"] == "prompt_outputs_failed_validation"


def test_wrong_type_on_link(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Mode", "inputs": {"mode": "fast", "label": "", "ratio": 0.1, "flag": True}},
                                "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
                                "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}})
    err = node_error(report, "2")
    assert err["type"] == "return_type_mismatch"
    assert err["extra_info"]["input_name"] == "a"
    assert err["extra_info"]["received_type"] == "STRING"


def test_literal_of_wrong_type(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": "seven"}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    err = node_error(report, "1")
    assert err["type"] == "invalid_input_type"
    assert err["extra_info"]["input_name"] == "value"
    assert "INT" in err["message"]


@pytest.mark.parametrize("value,kind", [(101, "value_bigger_than_max"), (-101, "value_smaller_than_min")])
def test_number_out_of_range(executor: Executor, value: int, kind: str) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": value}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    err = node_error(report, "1")
    assert err["type"] == kind
    assert err["extra_info"]["input_name"] == "value"
    assert err["details"] == "value"


def test_float_out_of_range(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Mode", "inputs": {"mode": "fast", "label": "", "ratio": 1.5, "flag": 0}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    err = node_error(report, "1")
    assert err["type"] == "value_bigger_than_max"
    assert err["extra_info"]["input_name"] == "ratio"


def test_combo_value_not_in_list(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Mode", "inputs": {"mode": "medium", "label": "", "ratio": 0.5, "flag": 0}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    err = node_error(report, "1")
    assert err["type"] == "value_not_in_list"
    assert err["extra_info"]["input_name"] == "mode"
    assert "'medium' not in" in err["details"]


def test_newer_combo_form_is_checked_like_a_list(registry: Registry, log: EventLog) -> None:
    class Pick:
        CATEGORY = "test"
        FUNCTION = "run"
        RETURN_TYPES = ("STRING",)

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"choice": ("COMBO", {"options": ["a", "b"], "default": "a"})}}

        def run(self, choice: str) -> tuple[str]:
            return (choice,)

    registry.register("Pick", Pick)
    ex = Executor(registry, OutputCache(), log)
    prompt = {"1": {"class_type": "Pick", "inputs": {"choice": "c"}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    err = node_error(ex.validate(prompt), "1")
    assert err["type"] == "value_not_in_list" and err["extra_info"]["input_name"] == "choice"
    prompt["1"]["inputs"]["choice"] = "b"
    assert ex.validate(prompt).ok


def test_link_to_missing_node(executor: Executor) -> None:
    report = executor.validate({"2": {"class_type": "Sink", "inputs": {"value": ["9", 0]}}})
    err = node_error(report, "2")
    assert err["type"] == "bad_linked_input"
    assert err["extra_info"]["input_name"] == "value"
    assert "'9' does not exist" in err["details"]


def test_link_to_missing_output_index(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": 1}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 3]}}})
    err = node_error(report, "2")
    assert err["type"] == "bad_linked_input"
    assert err["extra_info"]["input_name"] == "value"
    assert "no output 3" in err["details"]


def test_link_with_integer_node_id_is_named(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": 1}},
                                "2": {"class_type": "Sink", "inputs": {"value": [1, 0]}}})
    err = node_error(report, "2")
    assert err["type"] == "bad_linked_input"
    assert err["extra_info"]["input_name"] == "value"


def test_cycle(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
                                "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
                                "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}})
    for node_id in ("1", "2"):
        err = node_error(report, node_id)
        assert err["type"] == "dependency_cycle"
        assert set(err["extra_info"]["cycle_nodes"]) == {"1", "2"}
    assert "(Add) ->" in node_error(report, "1")["details"]
    assert report.error["type"] == "prompt_outputs_failed_validation"


def test_no_output_node(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": 1}}})
    assert report.error["type"] == "prompt_no_outputs"
    assert report.node_errors == {}


def test_custom_validation(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Checked", "inputs": {"value": 3}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    err = node_error(report, "1")
    assert err["type"] == "custom_validation_failed"
    assert err["extra_info"]["input_name"] == "value"
    assert "must be even" in err["details"]


def test_one_bad_output_leaves_the_others_valid(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": 1}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
                                "3": {"class_type": "Const", "inputs": {"value": 500}},
                                "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}})
    assert report.ok
    assert report.outputs == ["2"]
    assert report.node_errors["3"]["dependent_outputs"] == ["4"]


def test_invalid_run_executes_nothing(executor: Executor, log: Any) -> None:
    result = executor.run({"1": {"class_type": "Const", "inputs": {"value": 500}},
                           "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    assert result.status == "invalid"
    assert log.events == []


def test_outer_shape_errors_name_the_problem() -> None:
    with pytest.raises(WorkflowFormatError, match="JSON object of nodes"):
        check_api_prompt([1, 2])
    with pytest.raises(WorkflowFormatError, match="node '1'.*inputs must be an object"):
        check_api_prompt({"1": {"class_type": "Const", "inputs": [1]}})
    with pytest.raises(WorkflowFormatError, match="UI-format"):
        check_api_prompt({"nodes": [], "links": []})


def test_deep_chain_validates_without_recursion(executor: Executor) -> None:
    n = 5000
    prompt = {"0": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(1, n):
        prompt[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": 0}}
    prompt["out"] = {"class_type": "Sink", "inputs": {"value": [str(n - 1), 0]}}
    report = executor.validate(prompt)
    assert report.ok and len(report.literals) == n + 1


def test_self_loop_is_a_cycle(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
                                "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    assert node_error(report, "1")["type"] == "dependency_cycle"


def test_diamond_is_not_a_cycle(executor: Executor) -> None:
    report = executor.validate({"1": {"class_type": "Const", "inputs": {"value": 1}},
                                "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
                                "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
                                "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
                                "5": {"class_type": "Sink", "inputs": {"value": ["4", 0]}}})
    assert report.ok and report.node_errors == {}
