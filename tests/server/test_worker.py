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
