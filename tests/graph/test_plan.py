"""Planning without running anything: static order, signatures, cache hits, output signatures."""
from __future__ import annotations

from typing import Any

from graph.cache import OutputCache
from graph.explain import NodeRecord
from graph.nodespec import SpecTable
from graph.plan import Plan, output_sig
from graph.validate import validate_prompt
from nodes.registry import Registry


def chain() -> dict[str, Any]:
    return {"1": {"class_type": "Const", "inputs": {"value": 2}},
            "2": {"class_type": "Const", "inputs": {"value": 3}},
            "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
            "5": {"class_type": "Sink", "inputs": {"value": ["3", 0]}},
            "9": {"class_type": "Const", "inputs": {"value": 50}}}   # no output uses it


def make_plan(registry: Registry, prompt: dict[str, Any], records: dict[str, NodeRecord] | None = None) -> Plan:
    specs = SpecTable(registry)
    report = validate_prompt(prompt, specs)
    assert report.ok, report.describe()
    return Plan(dict(prompt), prompt, {}, specs, report, records if records is not None else {})


def test_static_order_is_topological_and_only_what_outputs_need(registry: Registry) -> None:
    order = make_plan(registry, chain()).static_order()
    assert sorted(order) == ["1", "2", "3", "5"]
    assert order.index("1") < order.index("3") < order.index("5")
    assert order.index("2") < order.index("3")


def test_signatures_follow_literals_and_upstream(registry: Registry) -> None:
    first = make_plan(registry, chain())
    first.sign_all(OutputCache())
    again = make_plan(registry, chain())
    again.sign_all(OutputCache())
    assert first.sigs == again.sigs
    changed = chain()
    changed["2"]["inputs"]["value"] = 4
    other = make_plan(registry, changed)
    other.sign_all(OutputCache())
    assert other.sigs["1"] == first.sigs["1"]
    assert all(other.sigs[n] != first.sigs[n] for n in ("2", "3", "5"))   # the change travels down


def test_sign_all_reports_hits_and_previous_records_of_misses(registry: Registry) -> None:
    records: dict[str, NodeRecord] = {}
    plan = make_plan(registry, chain(), records)
    cache = OutputCache()
    hits, previous = plan.sign_all(cache)
    assert hits == [] and previous == {"1": None, "2": None, "3": None, "5": None}
    assert set(records) == {"1", "2", "3", "5"}
    entry = cache.put(plan.sigs["1"], ([2],), ("fp:x",), None)
    last = records["3"]
    again = make_plan(registry, chain(), records)
    hits, previous = again.sign_all(cache)
    assert hits == [("1", entry)]
    assert set(previous) == {"2", "3", "5"} and previous["3"] is last and records["3"] is not last
    # a hit's real output signature is what its consumers sign against
    assert again.out_sig("1", 0) == "fp:x" and again.sigs["3"] != plan.sigs["3"]


def test_a_diverged_source_makes_its_consumer_re_sign(registry: Registry) -> None:
    plan = make_plan(registry, chain())
    plan.sign_all(OutputCache())
    before = plan.sigs["3"]
    assert plan.current_sig("3") == before
    plan.outputs_from_cache("1", ("fp:patched",))
    assert "1" in plan.diverged
    assert plan.current_sig("3") != before and "3" in plan.diverged


def test_output_signatures_of_a_run() -> None:
    class Patched:
        def patch_fingerprint(self) -> str:
            return "abc"

    assert output_sig("s", 1, [3]) == "s:1"
    assert output_sig("s", 0, [Patched()]) == "fp:abc"
    assert output_sig("s", 0, [Patched(), Patched()]) == "s:0"   # a list of models keeps its position


def test_nan_is_changed_marks_the_node_always_new(registry: Registry) -> None:
    prompt = {"1": {"class_type": "Volatile", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    first, second = make_plan(registry, prompt), make_plan(registry, prompt)
    first.sign_all(OutputCache())
    second.sign_all(OutputCache())
    assert first.always == {"1"} and first.sigs["1"] != second.sigs["1"]
