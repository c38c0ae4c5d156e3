"""The worker interface: where a prompt runs, seen from the server.

A `Backend` runs one prompt at a time (`run`, blocking, its events streamed to a sink as they
happen), can be interrupted from another thread, can drop its caches, and reports the model files
it holds in its output cache (`models`, keys like "checkpoints:sd15.safetensors") so that the
scheduler can send a prompt where its checkpoint is already loaded.

Two implementations: `InProcessBackend` (the executor in the server process: today's behaviour)
and `server.ray_backend.RayBackend` (an executor in a Ray actor). A backend that loses its process
mid-prompt raises `WorkerLost`; the server re-queues the prompt once (server/scheduler.py).
"""
from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from graph import events as ev
from graph.executor import Executor, RunResult

# input name -> model folder kind, for the loader inputs that name a model file
MODEL_INPUTS = {"ckpt_name": "checkpoints", "lora_name": "loras", "unet_name": "unet", "vae_name": "vae",
                "clip_name": "clip", "clip_name1": "clip", "clip_name2": "clip", "control_net_name": "controlnet",
                "hypernetwork_name": "hypernetworks"}


class WorkerLost(Exception):
    """The process running the prompt died or stopped answering (no heartbeat)."""


@dataclass(frozen=True)
class RunRequest:
    prompt: dict[str, Any]
    prompt_id: str
    extra_data: dict[str, Any]
    targets: list[str] | None = None


class Backend(Protocol):
    name: str

    def run(self, request: RunRequest, sink: ev.EventSink, report: Any = None, specs: Any = None) -> RunResult:
        """Run one prompt; events go to `sink` (from the calling thread) in order. Raises WorkerLost."""

    def interrupt(self) -> None:
        """Ask the running prompt to stop (any thread)."""

    def models(self) -> frozenset[str]:
        """Model keys ("kind:file") whose loader outputs are in this worker's cache now."""

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Drop cached outputs (between prompts)."""

    def close(self) -> None:
        """Release the worker (its process, for remote ones)."""


def model_keys(prompt: Mapping[str, Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """Node id -> the model keys its literal inputs name (only nodes that name one)."""
    out: dict[str, frozenset[str]] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        if not isinstance(inputs, Mapping):
            continue
        keys = frozenset(f"{MODEL_INPUTS[name]}:{value}" for name, value in inputs.items()
                         if name in MODEL_INPUTS and isinstance(value, str) and value)
        if keys:
            out[str(node_id)] = keys
    return out


def prompt_models(prompt: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """Every model key a prompt names (what the scheduler matches against `Backend.models`)."""
    keys: set[str] = set()
    for node_keys in model_keys(prompt).values():
        keys |= node_keys
    return frozenset(keys)


class ModelTracker:
    """Which model keys an executor holds: loader-node signatures seen in runs, still in its cache."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._by_sig: dict[str, frozenset[str]] = {}

    def note_run(self, prompt: Mapping[str, Mapping[str, Any]]) -> None:
        """After a run: remember the signature each loader node ran (or came from the cache) under."""
        records = getattr(self.executor, "_records", {})
        for node_id, keys in model_keys(prompt).items():
            record = records.get(node_id)
            sig = getattr(record, "signature", None)
            if sig is not None:
                self._by_sig[sig] = keys
        cache = self.executor.cache
        for sig in [s for s in self._by_sig if s not in cache]:
            del self._by_sig[sig]

    def held(self) -> frozenset[str]:
        cache = self.executor.cache
        keys: set[str] = set()
        for sig, sig_keys in self._by_sig.items():
            if sig in cache:
                keys |= sig_keys
        return frozenset(keys)


class InProcessBackend:
    """The executor in this process (one prompt at a time, run on the caller's thread)."""

    name = "local"

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.tracker = ModelTracker(executor)
        self._takes_specs = "specs" in inspect.signature(executor.run).parameters
        self._lock = threading.Lock()

    def run(self, request: RunRequest, sink: ev.EventSink, report: Any = None, specs: Any = None) -> RunResult:
        extra = {"specs": specs} if specs is not None and self._takes_specs else {}
        with self._lock:
            self.executor.sink = sink
            try:
                result = self.executor.run(request.prompt, request.prompt_id, request.extra_data,
                                           targets=request.targets, report=report, **extra)
            finally:
                self.executor.sink = ev.null_sink
            self.tracker.note_run(request.prompt)
        return result

    def interrupt(self) -> None:
        self.executor.interrupt()

    def models(self) -> frozenset[str]:
        return self.tracker.held()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if unload_models or free_memory:
            self.executor.cache.clear()
            self.executor._instances.clear()
            import gc
            gc.collect()

    def close(self) -> None:
        self.executor.interrupt()
