"""`easel run` and `easel nodes`, in-process, on workflows of pure built-in nodes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.cli import main, parse_set


def write(tmp_path: Path, prompt: Any, name: str = "wf.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(prompt) if not isinstance(prompt, str) else prompt)
    return path


def math_workflow(b: int = 2, op: str = "add") -> dict[str, Any]:
    return {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 6}},
            "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": b, "operation": op}},
            "3": {"class_type": "PrimitiveString", "inputs": {"value": "result"}},
            "4": {"class_type": "ShowText", "inputs": {"text": ["3", 0]}},
            "5": {"class_type": "IntToFloat", "inputs": {"value": ["2", 0]}}}


def run(tmp_path: Path, *args: str) -> int:
    return main(["run", *args, "--base-dir", str(tmp_path)])


def test_run_prints_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, str(write(tmp_path, math_workflow()))) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outputs"] == {"4": {"text": ["result"]}}
    assert set(out["executed"]) == {"3", "4"}


def test_set_overrides_an_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, math_workflow())
    assert run(tmp_path, str(path), "--set", "3.value=changed", "--explain") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["outputs"] == {"4": {"text": ["changed"]}}
    assert "node 3 (PrimitiveString) runs" in captured.err


def test_set_on_missing_node_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, str(write(tmp_path, math_workflow())), "--set", "77.value=1") == 2
    assert "no node '77'" in capsys.readouterr().err


def test_invalid_workflow_exits_2_with_node_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = math_workflow()
    wf["4"]["inputs"] = {}
    assert run(tmp_path, str(write(tmp_path, wf))) == 2
    err = capsys.readouterr().err
    assert "node 4 (ShowText), input 'text'" in err and "Required input is missing" in err


def test_failing_node_exits_1_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wf = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 6}},
          "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": 0, "operation": "divide"}},
          "3": {"class_type": "IntToFloat", "inputs": {"value": ["2", 0]}}}
    assert run(tmp_path, str(write(tmp_path, wf)), "--target", "3") == 1
    assert "node 2 (IntMath) failed: ZeroDivisionError: division of 6 by zero" in capsys.readouterr().err


def test_truncated_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, str(write(tmp_path, '{"1": {"class_type": "Prim'))) == 2
    assert "wf.json" in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, str(tmp_path / "nope.json")) == 2
    assert "nope.json" in capsys.readouterr().err


def test_nodes_prints_definitions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "StringConcatenate", "--base-dir", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)["StringConcatenate"]
    assert info["input_order"]["required"] == ["string_a", "string_b", "delimiter"]
    assert info["output"] == ["STRING"] and info["python_module"] == "nodes"
    assert main(["nodes", "NoSuchNode"]) == 2


def test_parse_set() -> None:
    assert parse_set(["3.seed=42", "6.text=a cat", "1.flag=true"]) == [
        ("3", "seed", 42), ("6", "text", "a cat"), ("1", "flag", True)]
    with pytest.raises(ValueError, match="ID.INPUT=VALUE"):
        parse_set(["seed=42"])
