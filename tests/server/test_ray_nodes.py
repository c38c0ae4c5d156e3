"""Pure test nodes for the scale-out tests (no torch): a "checkpoint" loader whose loads are counted
from the events it sends, a node using it, and a node that freezes its process once (a hung
worker). `make_registry` adds them to the server test registry; Ray actors import it by name."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from graph import events as ev
from graph.executor import Executor
from graph.runtime import current
from nodes.registry import Registry

from . import servernodes


class TestCheckpointLoader:
    """Loads a pretend checkpoint: one `node_record` event "checkpoint_load" (with the process id)
    per load, so that tests count loads per worker; the model is a small dict."""
    __test__ = False                     # not a pytest class
    CATEGORY = "test"
    FUNCTION = "load"
    RETURN_TYPES = ("TEST_MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"ckpt_name": ("STRING", {"default": "a.safetensors"})}}

    def load(self, ckpt_name: str) -> tuple[dict[str, Any]]:
        current().record("checkpoint_load", {"ckpt_name": ckpt_name, "pid": os.getpid()})
        return ({"name": ckpt_name, "pid": os.getpid()},)


class UseModel:
    """Uses the pretend model for `delay` seconds per step; reports model name, seed and pid."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("TEST_MODEL",), "seed": ("INT", {"default": 0, "min": 0, "max": 10**9}),
                             "steps": ("INT", {"default": 2, "min": 1, "max": 10000}),
                             "delay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0})}}

    def run(self, model: dict[str, Any], seed: int, steps: int, delay: float) -> dict[str, Any]:
        rt = current()
        for i in range(steps):
            rt.check_interrupt()
            time.sleep(delay)
            rt.progress(i + 1, steps)
        return {"ui": {"text": [f"{model['name']}:{seed}:{os.getpid()}"]}}


class HangOnce:
    """Freezes its own process (SIGSTOP) unless `marker` exists; creates the marker first, so the
    run after the frozen worker was replaced goes through."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"marker": ("STRING", {"default": ""})}}

    def run(self, marker: str) -> dict[str, Any]:
        path = Path(marker)
        if not path.exists():
            path.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return {"ui": {"text": ["went through"]}}


NODE_CLASS_MAPPINGS = {"TestCheckpointLoader": TestCheckpointLoader, "UseModel": UseModel, "HangOnce": HangOnce}


def make_registry() -> Registry:
    registry = servernodes.make_registry()
    registry.register_module(__import__(__name__, fromlist=["x"]), python_module="tests")
    return registry


def model_prompt(ckpt: str, seed: int, steps: int = 2, delay: float = 0.01) -> dict[str, Any]:
    return {"1": {"class_type": "TestCheckpointLoader", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "UseModel", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "delay": delay}}}


def test_checkpoint_loads_are_counted_once_per_cache() -> None:
    log = ev.EventLog()
    executor = Executor(make_registry(), events=log)
    for seed in (1, 2):
        assert executor.run(model_prompt("a.safetensors", seed)).ok
    assert executor.run(model_prompt("b.safetensors", 3)).ok
    loads = [d["data"]["ckpt_name"] for d in log.of("node_record") if d["name"] == "checkpoint_load"]
    assert loads == ["a.safetensors", "b.safetensors"]
    texts = [d["output"]["text"][0] for d in log.of(ev.EXECUTED)]
    assert [t.rsplit(":", 1)[0] for t in texts] == ["a.safetensors:1", "a.safetensors:2", "b.safetensors:3"]


def test_hang_once_goes_through_when_the_marker_exists(tmp_path: Path) -> None:
    marker = tmp_path / "hung"
    marker.write_text("earlier run")
    result = Executor(make_registry()).run({"1": {"class_type": "HangOnce", "inputs": {"marker": str(marker)}}})
    assert result.ok and result.outputs["1"] == {"text": ["went through"]}
