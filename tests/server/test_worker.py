"""server/worker.py pieces that need no running server: the /history entry."""
from __future__ import annotations

import json
from pathlib import Path

from server.queue_store import Job
from server.worker import history_entry


def test_history_entry_carries_node_records_json_safe() -> None:
    job = Job("p1", 1.0, {"1": {"class_type": "ShowInt", "inputs": {"value": 1}}}, {}, ["1"])
    records = {"3": {"lora_coverage": [{"file": "a.safetensors", "matched_keys": 4}], "where": Path("/x/y")}}
    entry = history_entry(job, "success", {}, [], records)
    assert entry["node_records"] == {"3": {"lora_coverage": [{"file": "a.safetensors", "matched_keys": 4}],
                                           "where": "/x/y"}}
    assert json.loads(json.dumps(entry))["node_records"] == entry["node_records"]
    assert history_entry(job, "error", {}, [])["node_records"] == {}


def test_history_entry_survives_what_plugins_record() -> None:
    job = Job("p2", 1.0, {"1": {"class_type": "ShowInt", "inputs": {"value": 1}}}, {}, ["1"])
    cyclic: dict = {"name": "loop"}
    cyclic["self"] = cyclic
    records = {"4": {"sizes": {(512, 768): 2}, "score": float("nan"), "tags": {"a"}, "loop": cyclic}}
    entry = history_entry(job, "success", {}, [], records)
    text = json.dumps(entry, allow_nan=False)                 # plain JSON: no NaN, string keys, no cycle
    rec = json.loads(text)["node_records"]["4"]
    assert rec["sizes"] == {"(512, 768)": 2} and rec["score"] == "nan" and rec["tags"] == ["a"]
    assert rec["loop"]["name"] == "loop"
