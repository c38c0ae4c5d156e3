"""Executor overhead per node: validation, cold execution and fully-cached execution.

Graphs of trivial built-in nodes: a chain of StringConcatenate nodes, and a wide fan-in (a
balanced reduction tree of IntMath nodes over PrimitiveInt leaves). Prints medians in
microseconds per node. Run: python benchmarks/executor.py
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graph.cache import OutputCache  # noqa: E402
from graph.executor import Executor  # noqa: E402
from nodes.registry import Registry  # noqa: E402
import nodes.builtin.primitives as primitives  # noqa: E402


def chain(n: int) -> dict[str, Any]:
    prompt: dict[str, Any] = {"0": {"class_type": "PrimitiveString", "inputs": {"value": "x"}}}
    for i in range(1, n - 1):
        prompt[str(i)] = {"class_type": "StringConcatenate",
                          "inputs": {"string_a": [str(i - 1), 0], "string_b": "y", "delimiter": ""}}
    prompt[str(n - 1)] = {"class_type": "ShowText", "inputs": {"text": [str(n - 2), 0]}}
    return prompt


def fan_in(n: int) -> dict[str, Any]:
    leaves = (n + 1) // 2
    prompt: dict[str, Any] = {}
    level = []
    for i in range(leaves):
        prompt[f"l{i}"] = {"class_type": "PrimitiveInt", "inputs": {"value": i}}
        level.append(f"l{i}")
    k = 0
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level) - 1, 2):
            prompt[f"s{k}"] = {"class_type": "IntMath", "inputs": {"a": [level[j], 0], "b": [level[j + 1], 0],
                                                                  "operation": "add"}}
            nxt.append(f"s{k}")
            k += 1
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    prompt["out"] = {"class_type": "IntToFloat", "inputs": {"value": [level[0], 0]}}
    prompt["show"] = {"class_type": "ShowText", "inputs": {"text": ["str", 0]}}
    prompt["str"] = {"class_type": "PrimitiveString", "inputs": {"value": "done"}}
    prompt["sink"] = {"class_type": "FloatSink", "inputs": {"value": ["out", 0]}}
    return prompt


class FloatSink:
    CATEGORY = "bench"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"value": ("FLOAT",)}}

    def run(self, value: float) -> dict[str, Any]:
        return {"ui": {"value": [value]}}


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(kind: str, build: Callable[[int], dict[str, Any]], n: int, registry: Registry) -> dict[str, float]:
    prompt = build(n)
    nodes = len(prompt)
    repeats = 5 if n <= 1000 else 3
    probe = Executor(registry, OutputCache())
    validate = median_time(lambda: probe.validate(prompt), repeats)
    report = probe.validate(prompt)
    if not report.ok:
        raise SystemExit(f"{kind} {n}: invalid: {report.describe()}")

    def cold() -> None:
        ex = Executor(registry, OutputCache())
        result = ex.run(prompt, report=report)
        if not result.ok or len(result.executed) != nodes:
            raise SystemExit(f"{kind} {n}: cold run executed {len(result.executed)} of {nodes}")

    warm_ex = Executor(registry, OutputCache())
    warm_ex.run(prompt, report=report)

    def cached() -> None:
        result = warm_ex.run(prompt, report=report)
        if result.executed:
            raise SystemExit(f"{kind} {n}: cached run executed {len(result.executed)} nodes")

    cold_t = median_time(cold, repeats)
    cached_t = median_time(cached, repeats)
    return {"nodes": nodes, "validate": validate / nodes * 1e6, "cold": cold_t / nodes * 1e6,
            "cached": cached_t / nodes * 1e6}


def main() -> None:
    registry = Registry()
    registry.register_module(primitives, builtin=True)
    registry.register("FloatSink", FloatSink)
    print(f"{'graph':<8} {'nodes':>6} {'validate us/node':>17} {'cold us/node':>13} {'cached us/node':>15}")
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for kind, build in (("chain", chain), ("fan-in", fan_in)):
        for n in (100, 1000, 10_000):
            r = measure(kind, build, n, registry)
            rows[(kind, n)] = r
            print(f"{kind:<8} {int(r['nodes']):>6} {r['validate']:>17.1f} {r['cold']:>13.1f} {r['cached']:>15.1f}")
    for kind in ("chain", "fan-in"):
        small, big = rows[(kind, 100)], rows[(kind, 10_000)]
        print(f"{kind}: growth 10,000 vs 100 nodes (per-node cost ratio): validate {big['validate'] / small['validate']:.2f}x, "
              f"cold {big['cold'] / small['cold']:.2f}x, cached {big['cached'] / small['cached']:.2f}x")


if __name__ == "__main__":
    main()
