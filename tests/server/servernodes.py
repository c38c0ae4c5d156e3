"""Pure node classes for the server tests (no torch): an image writer, a slow interruptible
counter with progress and previews, a node that kills its process, and the registry builder."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from graph.runtime import current
from nodes.builtin import primitives
from nodes.folders import current_folders
from nodes.registry import Registry


class SolidImage:
    """Writes a solid-colour PNG to the output folder and reports it like SaveImage does."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 255}),
                             "filename_prefix": ("STRING", {"default": "solid"})}}

    def run(self, value: int, filename_prefix: str) -> dict[str, Any]:
        from PIL import Image
        out = current_folders().output_dir
        out.mkdir(parents=True, exist_ok=True)
        name = f"{filename_prefix}_{value:03d}_{time.time_ns()}.png"
        Image.new("RGB", (16, 8), (value, 255 - value, 7)).save(out / name)
        return {"ui": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}}


class SlowCount:
    """Counts `steps` steps of `delay` seconds, with progress (and a preview image) per step."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"steps": ("INT", {"default": 3, "min": 1, "max": 100000}),
                             "delay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0}),
                             "preview": ("BOOLEAN", {"default": False})}}

    def run(self, steps: int, delay: float, preview: bool) -> tuple[int]:
        from PIL import Image
        rt = current()
        for i in range(steps):
            rt.check_interrupt()
            time.sleep(delay)
            image = Image.new("RGB", (8, 8), (i % 256, 0, 0)) if preview else None
            rt.progress(i + 1, steps, image)
        return (steps,)


class ShowInt:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": -10**9, "max": 10**9})}}

    def run(self, value: int) -> dict[str, Any]:
        return {"ui": {"text": [str(value)]}}


class KillProcess:
    """Takes the whole server process down with SIGKILL after `value` tenths of a second."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})}}

    def run(self, value: int) -> dict[str, Any]:
        time.sleep(value / 10)
        os.kill(os.getpid(), signal.SIGKILL)
        return {"ui": {}}


class Fail:
    """Raises, so the job ends with execution_error."""
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"message": ("STRING", {"default": "boom"})}}

    def run(self, message: str) -> dict[str, Any]:
        raise RuntimeError(message)


NODE_CLASS_MAPPINGS = {"Fail": Fail, "SolidImage": SolidImage, "SlowCount": SlowCount, "ShowInt": ShowInt, "KillProcess": KillProcess}


def make_registry() -> Registry:
    registry = Registry()
    registry.register_module(primitives, builtin=True)
    registry.register_module(__import__(__name__, fromlist=["x"]), python_module="tests")
    return registry


def image_prompt(value: int = 10, prefix: str = "solid") -> dict[str, Any]:
    return {"1": {"class_type": "PrimitiveInt", "inputs": {"value": value}},
            "2": {"class_type": "SolidImage", "inputs": {"value": ["1", 0], "filename_prefix": prefix}}}


def slow_prompt(steps: int = 3, delay: float = 0.01, preview: bool = False, tag: int = 0) -> dict[str, Any]:
    return {"1": {"class_type": "SlowCount", "inputs": {"steps": steps, "delay": delay, "preview": preview}},
            "2": {"class_type": "ShowInt", "inputs": {"value": ["1", 0]}},
            "3": {"class_type": "PrimitiveInt", "inputs": {"value": tag}},
            "4": {"class_type": "ShowInt", "inputs": {"value": ["3", 0]}}}
