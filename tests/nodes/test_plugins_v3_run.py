"""V3 nodes run by graph.executor.Executor after nodes/plugins.py loaded them: lists, lazy inputs,
hidden values, fingerprint_inputs caching, validate_inputs, async execute, blocking, expansion, ui."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from graph.cache import OutputCache
from graph.executor import Executor, RunResult
from nodes.folders import ModelFolders, use_folders
from nodes.registry import Registry, build_registry
from tests.nodes.test_plugins_v3 import extension, py, write_plugin

NODES = py("""
    import asyncio
    from pathlib import Path
    from comfy_api.latest import ComfyExtension, io, ui
    from comfy_execution.graph_utils import GraphBuilder

    LAZY_CALLS = []

    def node(node_id, inputs=(), outputs=(), **more):
        return io.Schema(node_id=node_id, category="test/v3", inputs=list(inputs), outputs=list(outputs), **more)

    class Add(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Add", [io.Int.Input("a", default=0), io.Int.Input("b", default=0)], [io.Int.Output()])

        @classmethod
        def execute(cls, a, b):
            return io.NodeOutput(a + b)

    class Range(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Range", [io.Int.Input("count", min=1)], [io.Int.Output(is_output_list=True)])

        @classmethod
        def execute(cls, count):
            return io.NodeOutput(list(range(count)))

    class Join(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Join", [io.Int.Input("values")], [io.String.Output()], is_input_list=True)

        @classmethod
        def execute(cls, values):
            return io.NodeOutput(",".join(str(v) for v in values))

    class Pick(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Pick", [io.Boolean.Input("use_first", default=True),
                                   io.Int.Input("first", optional=True, lazy=True),
                                   io.Int.Input("second", optional=True, lazy=True)],
                        [io.Int.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def check_lazy_status(cls, use_first, first=None, second=None):
            LAZY_CALLS.append(cls.hidden.unique_id)
            name, value = ("first", first) if use_first else ("second", second)
            return [name] if value is None else []

        @classmethod
        def execute(cls, use_first, first=None, second=None):
            return io.NodeOutput(first if use_first else second)

    class Show(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Show", [io.AnyType.Input("value"), io.String.Input("prompt", default="", optional=True)],
                        is_output_node=True, hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, value, prompt=""):
            h = cls.hidden
            return io.NodeOutput(ui=ui.PreviewText(f"{value}|{h.unique_id}|{sorted(h.prompt)}|{h.extra_pnginfo}|{prompt}"))

    class AsyncDouble(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3AsyncDouble", [io.Int.Input("x")], [io.Int.Output()])

        @classmethod
        async def execute(cls, x):
            await asyncio.sleep(0)
            return io.NodeOutput(2 * x)

    class FileText(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3FileText", [io.String.Input("path")], [io.String.Output()])

        @classmethod
        def fingerprint_inputs(cls, path):
            return Path(path).read_text()

        @classmethod
        def execute(cls, path):
            return io.NodeOutput(Path(path).read_text())

    class Even(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Even", [io.Int.Input("value", min=0, max=10)], [io.Int.Output()])

        @classmethod
        def validate_inputs(cls, value):
            return True if value % 2 == 0 else f"{value} is odd"

        @classmethod
        def execute(cls, value):
            return io.NodeOutput(value)

    class Gate(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Gate", [io.Int.Input("value"), io.Boolean.Input("open")], [io.Int.Output()])

        @classmethod
        def execute(cls, value, open):
            return io.NodeOutput(value, block_execution=None if open else "gate closed")

    class Expand(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Expand", [io.Int.Input("a")], [io.Int.Output()], enable_expand=True)

        @classmethod
        def execute(cls, a):
            g = GraphBuilder()
            add = g.node("V3Add", a=a, b=1000)
            return io.NodeOutput(add.out(0), expand=g.finalize())

    class NoExpand(Expand):
        @classmethod
        def define_schema(cls):
            return node("V3NoExpand", [io.Int.Input("a")], [io.Int.Output()])

    class Preview(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return node("V3Preview", [io.Image.Input("images")], is_output_node=True)

        @classmethod
        def execute(cls, images):
            return io.NodeOutput(ui=ui.PreviewImage(images, cls=cls))
    """, extension("Add", "Range", "Join", "Pick", "Show", "AsyncDouble", "FileText", "Even", "Gate", "Expand",
                   "NoExpand", "Preview"))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    write_plugin(tmp_path / "custom_nodes", "v3run", {"__init__.py": NODES})
    reg = build_registry(plugin_dirs=[tmp_path / "custom_nodes"], builtins=False)
    assert reg.plugin_report.failed == []  # type: ignore[attr-defined]
    return reg


def run(ex: Executor, prompt: dict[str, Any], **extra: Any) -> RunResult:
    return ex.run(prompt, extra_data=extra)


def test_lists_lazy_hidden_and_async(registry: Registry) -> None:
    prompt = {
        "1": {"class_type": "V3Range", "inputs": {"count": 3}},
        "2": {"class_type": "V3Add", "inputs": {"a": ["1", 0], "b": 10}},          # fans out over the list
        "3": {"class_type": "V3Join", "inputs": {"values": ["2", 0]}},             # one call with every item
        "4": {"class_type": "V3Show", "inputs": {"value": ["3", 0], "prompt": "my words"}},
        "5": {"class_type": "V3Add", "inputs": {"a": 100, "b": 1}},
        "6": {"class_type": "V3Add", "inputs": {"a": 200, "b": 2}},
        "7": {"class_type": "V3Pick", "inputs": {"use_first": False, "first": ["5", 0], "second": ["6", 0]}},
        "8": {"class_type": "V3AsyncDouble", "inputs": {"x": ["7", 0]}},
        "9": {"class_type": "V3Show", "inputs": {"value": ["8", 0]}},
    }
    result = run(Executor(registry, OutputCache()), prompt, extra_pnginfo={"workflow": "w"})
    assert result.ok, (result.error, result.validation.describe() if result.validation else None)
    names = sorted(prompt)
    assert result.outputs["4"] == {"text": [f"10,11,12|4|{names}|{{'workflow': 'w'}}|my words"]}
    assert result.outputs["9"] == {"text": [f"404|9|{names}|{{'workflow': 'w'}}|"]}
    assert "6" in result.executed and "5" not in result.executed          # the lazy branch not asked for
    assert set(sys.modules["custom_nodes.v3run"].LAZY_CALLS) == {"7"}


def test_fingerprint_inputs_decides_reuse(registry: Registry, tmp_path: Path) -> None:
    source = tmp_path / "note.txt"
    source.write_text("one")
    prompt = {"1": {"class_type": "V3FileText", "inputs": {"path": str(source)}},
              "2": {"class_type": "V3Show", "inputs": {"value": ["1", 0]}}}
    ex = Executor(registry, OutputCache())
    first = run(ex, prompt)
    assert first.ok and "1" in first.executed
    again = run(ex, prompt)
    assert again.ok and "1" in again.cached and "1" not in again.executed
    source.write_text("two")
    third = run(ex, prompt)
    assert "1" in third.executed and third.outputs["2"]["text"][0].startswith("two|2|")


def test_validate_inputs_replaces_the_range_check(registry: Registry) -> None:
    ex = Executor(registry, OutputCache())
    show = {"class_type": "V3Show", "inputs": {"value": ["1", 0]}}
    odd = run(ex, {"1": {"class_type": "V3Even", "inputs": {"value": 3}}, "2": show})
    assert odd.status == "invalid"
    error = odd.validation.node_errors["1"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and "3 is odd" in error["details"]
    big = run(ex, {"1": {"class_type": "V3Even", "inputs": {"value": 12}}, "2": show})   # max=10 is not checked
    assert big.ok and big.outputs["2"]["text"][0].startswith("12|")


def test_block_execution_and_expansion(registry: Registry) -> None:
    ex = Executor(registry, OutputCache())
    blocked = run(ex, {"1": {"class_type": "V3Gate", "inputs": {"value": 5, "open": False}},
                       "2": {"class_type": "V3Show", "inputs": {"value": ["1", 0]}}})
    assert blocked.status == "error" and blocked.error["node_id"] == "2"
    assert (blocked.error["exception_type"], blocked.error["exception_message"]) == ("ExecutionBlocked", "gate closed")
    opened = run(ex, {"1": {"class_type": "V3Gate", "inputs": {"value": 5, "open": True}},
                      "2": {"class_type": "V3Show", "inputs": {"value": ["1", 0]}}})
    assert opened.ok and opened.outputs["2"]["text"][0].startswith("5|")
    expanded = run(ex, {"1": {"class_type": "V3Expand", "inputs": {"a": 7}},
                        "2": {"class_type": "V3Show", "inputs": {"value": ["1", 0]}}})
    assert expanded.ok and expanded.outputs["2"]["text"][0].startswith("1007|")
    refused = run(ex, {"1": {"class_type": "V3NoExpand", "inputs": {"a": 7}},
                       "2": {"class_type": "V3Show", "inputs": {"value": ["1", 0]}}})
    assert refused.status == "error" and "enable_expand=True" in refused.error["exception_message"]


def test_preview_image_ui(registry: Registry, tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path / "base")

    class Pixels:
        @classmethod
        def INPUT_TYPES(cls) -> dict[str, Any]:
            return {"required": {}}

        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "make"

        def make(self) -> tuple[torch.Tensor]:
            return (torch.full((2, 4, 6, 3), 0.5),)

    registry.register("TestPixels", Pixels)
    with use_folders(folders):
        result = run(Executor(registry, OutputCache(), folders=folders),
                     {"1": {"class_type": "TestPixels", "inputs": {}},
                      "2": {"class_type": "V3Preview", "inputs": {"images": ["1", 0]}}}, extra_pnginfo={"k": 1})
    assert result.ok, result.error
    ui = result.outputs["2"]
    assert ui["animated"] == [False] and len(ui["images"]) == 2
    first = ui["images"][0]
    assert first["type"] == "temp" and first["filename"].startswith("ComfyUI_temp_")
    from diffusion.images.image_io import read_png_text
    text = read_png_text(Path(folders.temp_dir) / first["subfolder"] / first["filename"])
    assert text["k"] == "1" and '"TestPixels"' in text["prompt"]
