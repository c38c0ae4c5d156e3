"""Execution semantics: order, reachability, cache reuse, IS_CHANGED, lists, lazy inputs,
interrupt and failure recovery — asserted from the events the executor emits."""
from __future__ import annotations

import threading
from typing import Any

from graph.cache import OutputCache
from graph.events import EventLog
from graph.runtime import current
from graph.executor import Executor
from nodes.registry import Registry

from . import testnodes


def chain() -> dict[str, Any]:
    return {"1": {"class_type": "Const", "inputs": {"value": 2}},
            "2": {"class_type": "Const", "inputs": {"value": 3}},
            "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
            "4": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": ["1", 0]}},
            "5": {"class_type": "Sink", "inputs": {"value": ["4", 0]}},
            "9": {"class_type": "Const", "inputs": {"value": 50}}}   # unreachable: no output uses it


def test_execution_order_is_topological_and_result_right(executor: Executor, log: EventLog) -> None:
    result = executor.run(chain())
    assert result.ok
    order = log.executed_nodes()
    assert set(order) == {"1", "2", "3", "4", "5"}
    for before, after in [("1", "3"), ("2", "3"), ("3", "4"), ("4", "5")]:
        assert order.index(before) < order.index(after)
    assert result.outputs == {"5": {"values": [7]}}
    names = log.names()
    assert names[0] == "execution_start" and names[1] == "execution_cached"
    assert names[-2:] == ["execution_success", "executing"]
    assert log.events[-1][1]["node"] is None


def test_unreachable_nodes_do_not_run(executor: Executor, log: EventLog) -> None:
    executor.run(chain())
    assert "9" not in log.executed_nodes()
    assert ("Const", 50) not in testnodes.CALLS


def test_full_cache_hit_runs_nothing(executor: Executor, log: EventLog) -> None:
    executor.run(chain())
    log.clear()
    testnodes.CALLS.clear()
    result = executor.run(chain())
    assert result.ok
    assert log.executed_nodes() == []
    assert testnodes.CALLS == []
    assert sorted(log.of("execution_cached")[0]["nodes"]) == ["1", "2", "3", "4", "5"]
    # the cached output node still reports its ui
    assert log.of("executed") == [{"node": "5", "display_node": "5", "output": {"values": [7]},
                                  "prompt_id": result.prompt_id}]
    assert result.outputs == {"5": {"values": [7]}}


def test_changing_one_literal_reruns_it_and_descendants_only(executor: Executor, log: EventLog) -> None:
    executor.run(chain())
    log.clear()
    prompt = chain()
    prompt["2"]["inputs"]["value"] = 10
    result = executor.run(prompt)
    assert sorted(log.executed_nodes()) == ["2", "3", "4", "5"]
    assert result.outputs["5"] == {"values": [14]}
    assert "input 'value' changed: 3 -> 10" in result.explanations["2"]
    assert any("upstream node 2" in r for r in result.explanations["3"])


def test_cache_is_shared_across_node_ids(executor: Executor, log: EventLog) -> None:
    executor.run(chain())
    log.clear()
    renamed = {f"x{k}": {"class_type": v["class_type"],
                         "inputs": {n: ([f"x{val[0]}", val[1]] if isinstance(val, list) else val)
                                    for n, val in v["inputs"].items()}} for k, v in chain().items()}
    executor.run(renamed)
    assert log.executed_nodes() == []


def test_is_changed_nan_always_reruns(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Volatile", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    executor.run(prompt)
    log.clear()
    result = executor.run(prompt)
    assert log.executed_nodes() == ["1", "2"]
    assert any("always re-run" in r for r in result.explanations["1"])


def test_is_changed_value_change_forces_rerun(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Watched", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    testnodes.TOKEN["value"] = "a"
    executor.run(prompt)
    log.clear()
    executor.run(prompt)
    assert log.executed_nodes() == []
    testnodes.TOKEN["value"] = "b"
    result = executor.run(prompt)
    assert log.executed_nodes() == ["1", "2"]
    assert any("IS_CHANGED returned a new value" in r for r in result.explanations["1"])


def test_is_changed_unhashable_is_not_an_error(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "UnhashableChanged", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    assert executor.run(prompt).ok
    log.clear()
    assert executor.run(prompt).ok
    assert log.executed_nodes() == ["1", "2"]


def test_output_is_list_maps_downstream_node(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Fanout", "inputs": {"count": 3}},
              "2": {"class_type": "Const", "inputs": {"value": 10}},
              "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
              "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}
    result = executor.run(prompt)
    assert [c for c in testnodes.CALLS if c[0] == "Add"] == [("Add", (0, 10)), ("Add", (1, 10)), ("Add", (2, 10))]
    assert result.outputs["4"] == {"values": [10, 11, 12]}   # ui merged over the three calls


def test_input_is_list_receives_whole_list(executor: Executor) -> None:
    prompt = {"1": {"class_type": "Fanout", "inputs": {"count": 4}},
              "2": {"class_type": "SumList", "inputs": {"values": ["1", 0]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    result = executor.run(prompt)
    assert ("SumList", [0, 1, 2, 3]) in testnodes.CALLS
    assert result.outputs["3"] == {"values": [6]}


def test_lazy_branch_not_needed_never_runs(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 1}},
              "2": {"class_type": "Const", "inputs": {"value": 2}},
              "3": {"class_type": "Switch", "inputs": {"pick_a": False, "a": ["1", 0], "b": ["2", 0]}},
              "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}
    result = executor.run(prompt)
    assert result.outputs["4"] == {"values": [2]}
    assert "1" not in log.executed_nodes()
    assert ("Const", 1) not in testnodes.CALLS
    log.clear()
    prompt["3"]["inputs"]["pick_a"] = True
    result = executor.run(prompt)
    assert result.outputs["4"] == {"values": [1]}
    assert "1" in log.executed_nodes()


def test_interrupt_between_steps(registry: Registry, log: EventLog) -> None:
    executor = Executor(registry, OutputCache(), log)
    testnodes.Steps.ON_STEP = [lambda i: executor.interrupt() if i == 2 else None]
    try:
        prompt = {"1": {"class_type": "Steps", "inputs": {"steps": 10}},
                  "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
        result = executor.run(prompt)
    finally:
        testnodes.Steps.ON_STEP = []
    assert result.status == "interrupted"
    assert [p["value"] for p in log.of("progress")] == [1, 2]
    interrupted = log.of("execution_interrupted")
    assert interrupted and interrupted[0]["node_id"] == "1" and interrupted[0]["node_type"] == "Steps"
    assert "2" not in log.executed_nodes()
    log.clear()
    assert executor.run(prompt).ok   # the next run is not interrupted


def test_interrupt_from_another_thread_stops_between_nodes(registry: Registry, log: EventLog) -> None:
    executor = Executor(registry, OutputCache(), log)
    gate = threading.Event()
    release = threading.Event()

    def hook(i: int) -> None:
        gate.set()
        release.wait(5)

    testnodes.Steps.ON_STEP = [hook]
    prompt = {"1": {"class_type": "Steps", "inputs": {"steps": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", executor.run(prompt)))
    try:
        thread.start()
        assert gate.wait(5)
        executor.interrupt()
        release.set()
        thread.join(5)
    finally:
        testnodes.Steps.ON_STEP = []
    assert out["r"].status == "interrupted"
    assert "2" not in log.executed_nodes()


def test_raising_node_reports_and_next_run_works(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Boom", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    testnodes.Boom.FAIL["on"] = True
    try:
        result = executor.run(prompt)
    finally:
        testnodes.Boom.FAIL["on"] = False
    assert result.status == "error"
    err = log.of("execution_error")[0]
    assert err["node_id"] == "2" and err["node_type"] == "Boom"
    assert err["exception_type"] == "RuntimeError" and "boom with 4" in err["exception_message"]
    assert err["executed"] == ["1"] and err["current_inputs"] == {"value": ["4"]}
    assert any("boom with 4" in line for line in err["traceback"])
    log.clear()
    result = executor.run(prompt)
    assert result.ok and result.outputs["3"] == {"values": [4]}
    assert log.executed_nodes() == ["2", "3"]   # node 1 kept its cached output


def test_progress_events_carry_node_id(executor: Executor, log: EventLog) -> None:
    executor.run({"1": {"class_type": "Steps", "inputs": {"steps": 3}},
                  "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    assert [(p["node"], p["value"], p["max"]) for p in log.of("progress")] == [("1", 1, 3), ("1", 2, 3), ("1", 3, 3)]


def test_nodes_see_the_preview_method_of_the_run(executor: Executor) -> None:
    seen: list[str] = []
    testnodes.Steps.ON_STEP = [lambda i: seen.append(current().preview_method) if i == 0 else None]
    try:
        prompt = {"1": {"class_type": "Steps", "inputs": {"steps": 2}},
                  "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
        executor.run(prompt)
        executor.run({**prompt, "1": {"class_type": "Steps", "inputs": {"steps": 3}}},
                     extra_data={"preview_method": "TAESD"})
        executor.run({**prompt, "1": {"class_type": "Steps", "inputs": {"steps": 4}}},
                     extra_data={"preview_method": "none"})
    finally:
        testnodes.Steps.ON_STEP = []
    assert seen == ["auto", "taesd", "none"]


def test_targets_run_only_what_they_need(executor: Executor, log: EventLog) -> None:
    result = executor.run(chain(), targets=["3"])
    assert result.ok
    assert sorted(log.executed_nodes()) == ["1", "2", "3"]


class Patched:
    """A value with patch_fingerprint(): equal fingerprints count as the same value downstream."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def patch_fingerprint(self) -> str:
        return self.fingerprint


class Loader:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model_strength": ("FLOAT", {"default": 1.0}), "clip_strength": ("FLOAT", {"default": 1.0})}}

    def run(self, model_strength: float, clip_strength: float) -> tuple[Patched, Patched]:
        return Patched(f"m{model_strength}"), Patched(f"c{clip_strength}")


class Encode:
    CATEGORY = "test"
    FUNCTION = "run"
    RETURN_TYPES = ("INT",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"clip": ("CLIP",)}}

    def run(self, clip: Patched) -> tuple[int]:
        testnodes.CALLS.append(("Encode", clip.fingerprint))
        return (1,)


def test_fingerprinted_outputs_keep_downstream_cached(registry: Registry, log: EventLog) -> None:
    registry.register("Loader", Loader)
    registry.register("Encode", Encode)
    executor = Executor(registry, OutputCache(), log)
    prompt = {"1": {"class_type": "Loader", "inputs": {"model_strength": 1.0, "clip_strength": 1.0}},
              "2": {"class_type": "Encode", "inputs": {"clip": ["1", 1]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}},
              "4": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    executor.run(prompt)
    log.clear()
    prompt["1"]["inputs"]["model_strength"] = 0.5
    executor.run(prompt)
    assert sorted(log.executed_nodes()) == ["1", "4"]    # the text side stays cached
    log.clear()
    prompt["1"]["inputs"]["clip_strength"] = 0.5
    executor.run(prompt)
    assert sorted(log.executed_nodes()) == ["1", "2", "3"]


def test_cache_bounds_evict_and_explain(registry: Registry, log: EventLog) -> None:
    executor = Executor(registry, OutputCache(max_entries=2), log)
    prompt = chain()
    executor.run(prompt)
    assert len(executor.cache) == 2            # five outputs, two kept: the last ones (4 and 5)
    log.clear()
    result = executor.run(prompt)
    assert log.executed_nodes() == []          # the output is still cached
    result = executor.run(prompt, targets=["3"])
    assert "3" in log.executed_nodes()
    assert any("evicted" in r for r in result.explanations["3"])


def test_node_expansion_runs_the_new_nodes(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "AddTimes", "inputs": {"a": 10, "b": 3, "times": 4}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["1", 1]}}}
    result = executor.run(prompt)
    assert result.ok, result.error
    assert result.outputs["2"] == {"values": [22]}
    assert result.outputs["3"] == {"values": ["literal"]}
    ran = log.executed_nodes()
    assert ran[0] == "1" and "1.add3" in ran and ran.index("1.add3") < ran.index("2")
    log.clear()
    testnodes.CALLS.clear()
    assert executor.run(prompt).outputs["2"] == {"values": [22]}
    assert log.executed_nodes() == [] and testnodes.CALLS == []
    prompt["1"]["inputs"]["times"] = 2
    assert executor.run(prompt).outputs["2"] == {"values": [16]}


def test_invalid_expansion_is_a_node_error(executor: Executor, log: EventLog) -> None:
    class BadExpand(testnodes.AddTimes):
        def run(self, a: int, b: int, times: int) -> dict[str, Any]:
            return {"result": (["x", 0], ""), "expand": {"x": {"class_type": "Add", "inputs": {"a": 1}}}}

    executor.registry.register("BadExpand", BadExpand)
    result = executor.run({"1": {"class_type": "BadExpand", "inputs": {"a": 1, "b": 1, "times": 1}},
                           "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}})
    assert result.status == "error"
    assert result.error["node_id"] == "1" and "Required input is missing" in result.error["exception_message"]


def test_execution_blocker_stops_downstream(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Gate", "inputs": {"value": 5, "open": False, "message": ""}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    result = executor.run(prompt)
    assert result.ok and result.outputs == {}
    assert not any(c[0] in ("Add", "Sink") for c in testnodes.CALLS)
    prompt["1"]["inputs"]["message"] = "gate closed"
    result = executor.run(prompt)
    assert result.status == "error"
    assert result.error["exception_type"] == "ExecutionBlocked" and result.error["node_id"] == "3"
    assert result.error["exception_message"] == "gate closed"
    prompt["1"]["inputs"]["open"] = True
    assert executor.run(prompt).outputs == {"3": {"values": [6]}}


def test_node_records_reach_the_result_also_from_the_cache(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Noted", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Noted", "inputs": {"value": 7}},
              "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
              "5": {"class_type": "Sink", "inputs": {"value": ["4", 0]}}}
    first = executor.run(prompt)
    assert first.ok
    expected = {"2": {"seen": {"value": 4, "doubled": 8}, "values": [4]},
                "3": {"seen": {"value": 7, "doubled": 14}, "values": [7]}}
    assert first.node_records == expected
    seen = [d["node"] for e, d in log.events if e == "node_record" and d["name"] == "seen"]
    assert seen == sorted(["2", "3"], key=log.executed_nodes().index)
    # everything cached: nothing runs, the prompt still carries what its nodes recorded
    testnodes.CALLS.clear()
    second = executor.run(prompt)
    assert second.ok and testnodes.CALLS == []
    assert second.node_records == expected
    second.node_records["2"]["seen"]["value"] = -1         # a result holds copies, not the cache's records
    assert executor.run(prompt).node_records == expected
    # a changed input re-runs one recorder; the other's record comes from the cache
    prompt["3"]["inputs"]["value"] = 9
    third = executor.run(prompt)
    assert [c for c in testnodes.CALLS if c[0] == "Noted"] == [("Noted", 9)]
    assert third.node_records == {"2": expected["2"], "3": {"seen": {"value": 9, "doubled": 18}, "values": [9]}}


def test_a_mapped_node_adds_up_its_list_records(executor: Executor, log: EventLog) -> None:
    prompt = {"1": {"class_type": "Fanout", "inputs": {"count": 3}},
              "2": {"class_type": "Noted", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "SumList", "inputs": {"values": ["2", 0]}},
              "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}
    first = executor.run(prompt)
    assert first.ok
    # one call per item: list records add up, others keep the last call's
    assert first.node_records["2"] == {"values": [0, 1, 2], "seen": {"value": 2, "doubled": 4}}
    second = executor.run(prompt)                # from the cache: the same, not doubled
    assert second.node_records == first.node_records
    second.node_records["2"]["values"].append(99)   # results hold copies: the cached records stay as they were
    assert executor.run(prompt).node_records == {"2": {"values": [0, 1, 2], "seen": {"value": 2, "doubled": 4}}}
