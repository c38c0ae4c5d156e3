"""Queueing over real sockets: /prompt, /ws, /view, /queue, /interrupt, /history and /api/jobs."""
from __future__ import annotations

import asyncio
import json
import struct
import uuid
from typing import Any

import msgpack
from aiohttp.test_utils import TestClient

from .conftest import follow, receive
from .servernodes import image_prompt, slow_prompt


async def queue(client: TestClient, prompt: dict[str, Any], **body: Any) -> str:
    r = await client.post("/prompt", json={"prompt": prompt, **body})
    data = await r.json()
    assert r.status == 200, data
    return data["prompt_id"]


async def wait_history(client: TestClient, prompt_id: str, timeout: float = 10.0) -> dict[str, Any]:
    for _ in range(int(timeout / 0.01)):
        entry = await (await client.get(f"/history/{prompt_id}")).json()
        if entry:
            return entry[prompt_id]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{prompt_id} never reached the history")


def types(messages: list[Any]) -> list[str]:
    return [m["type"] for m in messages if isinstance(m, dict)]


def collapse(names: list[str]) -> list[str]:
    """Drop repeats of progress_state / progress so the trace reads like protocol.md 4."""
    out: list[str] = []
    for name in names:
        if name in ("progress_state", "progress") and out and out[-1] == name:
            continue
        out.append(name)
    return out


async def test_queue_follow_and_view_the_image(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=c1")
    await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    prompt_id = await queue(client, image_prompt(42), client_id="c1")
    messages = await follow(ws, prompt_id)
    names = types(messages)
    # protocol.md 4: status(sid) -> feature_flags -> status(1) -> execution_start -> execution_cached
    # -> per node {progress_state, executing, progress_state} -> executed -> execution_success
    # -> status(0) -> executing(null)
    assert collapse(names) == ["status", "feature_flags", "status", "execution_start", "execution_cached",
                               "progress_state", "executing", "progress_state", "executing", "progress_state",
                               "executed", "execution_success", "status", "executing"]
    assert messages[0]["data"]["sid"] == "c1"
    assert messages[2]["data"]["status"]["exec_info"]["queue_remaining"] == 1
    assert messages[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 0
    executed = [m for m in messages if m["type"] == "executed"][0]["data"]
    image = executed["output"]["images"][0]
    r = await client.get("/view", params={"filename": image["filename"], "subfolder": "", "type": "output"})
    assert r.status == 200 and r.headers["Content-Type"] == "image/png"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(await r.read())).getpixel((0, 0)) == (42, 213, 7)
    entry = (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert entry["outputs"]["2"]["images"][0] == image
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["prompt"][1] == prompt_id and len(entry["prompt"]) == 5


async def test_repeated_prompt_is_cached_and_history_still_lists_its_image(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=c2")
    first = await queue(client, image_prompt(5), client_id="c2")
    await follow(ws, first)
    second = await queue(client, image_prompt(5), client_id="c2")
    messages = await follow(ws, second)
    assert "executing" not in [m["type"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
    cached = [m["data"]["nodes"] for m in messages if m["type"] == "execution_cached"]
    assert sorted(cached[0]) == ["1", "2"]
    h1, h2 = await wait_history(client, first), await wait_history(client, second)
    assert h2["outputs"] == h1["outputs"] and h2["outputs"]["2"]["images"]


async def test_api_twin_and_prompt_without_client_gets_no_job_events(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=watcher")
    await receive(ws)   # status with sid
    r = await client.post("/api/prompt", json={"prompt": image_prompt(1)})
    assert r.status == 200
    prompt_id = (await r.json())["prompt_id"]
    await wait_history(client, prompt_id)
    seen = []
    while True:
        try:
            kind, data = await receive(ws, timeout=0.3)
        except asyncio.TimeoutError:
            break
        seen.append(data["type"])
    # no client_id: only queue status and progress-like messages reach other sockets
    assert "execution_start" not in seen and "executed" not in seen and "executing" not in seen
    assert "status" in seen and "progress_state" in seen


async def test_validation_errors_are_400_with_node_errors(client: TestClient) -> None:
    bad = image_prompt(300)   # above SolidImage... via PrimitiveInt -> fine; break SolidImage instead
    bad["2"]["inputs"]["value"] = 999
    r = await client.post("/prompt", json={"prompt": bad})
    body = await r.json()
    assert r.status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["2"]
    assert err["class_type"] == "SolidImage" and err["dependent_outputs"] == ["2"]
    assert err["errors"][0]["type"] == "value_bigger_than_max"
    assert err["errors"][0]["extra_info"]["input_name"] == "value"

    missing = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    body = await (await client.post("/prompt", json={"prompt": missing})).json()
    assert body["error"]["type"] == "missing_node_type" and body["node_errors"] == {}

    r = await client.post("/prompt", json={"client_id": "x"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "no_prompt"
    r = await client.post("/prompt", json={"prompt": image_prompt(), "prompt_id": "not-a-uuid"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_prompt_id"
    r = await client.post("/prompt", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
    r = await client.post("/prompt", json={"prompt": [1, 2]})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_prompt"
    r = await client.post("/prompt", json={"prompt": image_prompt(), "number": "soon"})
    assert r.status == 400
    # the server is still fine
    assert (await client.post("/prompt", json={"prompt": image_prompt()})).status == 200


async def test_caller_chosen_prompt_id_and_history_by_id(client: TestClient) -> None:
    pid = str(uuid.uuid4())
    assert await queue(client, image_prompt(3), prompt_id=pid) == pid
    entry = await wait_history(client, pid)
    assert entry["prompt"][1] == pid
    r = await client.post("/prompt", json={"prompt": image_prompt(3), "prompt_id": pid})
    assert r.status == 400 and "already" in (await r.json())["error"]["message"]
    assert await (await client.get(f"/history/{uuid.uuid4()}")).json() == {}
    other = await queue(client, image_prompt(4))
    await wait_history(client, other)
    everything = await (await client.get("/history")).json()
    assert list(everything) == [pid, other]
    assert list(await (await client.get("/history?max_items=1")).json()) == [other]
    assert (await client.post("/history", json={"delete": [pid]})).status == 200
    assert list(await (await client.get("/history")).json()) == [other]
    assert (await client.post("/history", json={"clear": True})).status == 200
    assert await (await client.get("/history")).json() == {}


async def test_interrupt_stops_a_running_sampler(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=c3")
    prompt_id = await queue(client, slow_prompt(steps=100000, delay=0.002), client_id="c3")
    while True:   # wait until the counter reports progress
        kind, data = await receive(ws)
        if kind == "json" and data["type"] == "progress":
            break
    assert (await client.post("/interrupt", json={"prompt_id": str(uuid.uuid4())})).status == 200  # not this job
    await asyncio.sleep(0.05)
    assert (await client.get("/queue")).status == 200
    running = (await (await client.get("/queue")).json())["queue_running"]
    assert running and running[0][1] == prompt_id
    assert (await client.post("/interrupt")).status == 200
    messages = await follow(ws, prompt_id)
    interrupted = [m for m in messages if isinstance(m, dict) and m["type"] == "execution_interrupted"]
    assert interrupted and interrupted[0]["data"]["node_id"] == "1"
    assert interrupted[0]["data"]["node_type"] == "SlowCount"
    entry = await wait_history(client, prompt_id)
    assert entry["status"]["status_str"] == "error"
    jobs = await (await client.get("/api/jobs?status=cancelled")).json()
    assert [j["id"] for j in jobs["jobs"]] == [prompt_id]


async def test_queue_listing_delete_clear_and_front(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=c4")
    blocker = await queue(client, slow_prompt(steps=100000, delay=0.002), client_id="c4")
    while True:
        kind, data = await receive(ws)
        if kind == "json" and data["type"] == "progress":
            break
    a = await queue(client, slow_prompt(tag=1))
    b = await queue(client, slow_prompt(tag=2))
    c = await queue(client, slow_prompt(tag=3), front=True)
    q = await (await client.get("/queue")).json()
    assert [item[1] for item in q["queue_running"]] == [blocker]
    assert [item[1] for item in q["queue_pending"]] == [c, a, b]          # front goes first
    assert all(len(item) == 5 and isinstance(item[0], int) for item in q["queue_pending"])
    assert (await (await client.get("/prompt")).json())["exec_info"]["queue_remaining"] == 4
    assert (await client.post("/queue", json={"delete": [a]})).status == 200
    q = await (await client.get("/queue")).json()
    assert [item[1] for item in q["queue_pending"]] == [c, b]
    assert (await client.post("/queue", json={"clear": True})).status == 200
    q = await (await client.get("/queue")).json()
    assert q["queue_pending"] == [] and [i[1] for i in q["queue_running"]] == [blocker]
    r = await client.post(f"/api/jobs/{blocker}/cancel")
    assert (await r.json()) == {"cancelled": True}
    await wait_history(client, blocker)
    r = await client.post(f"/api/jobs/{blocker}/cancel")
    assert (await r.json()) == {"cancelled": False}                        # finished: not an error


async def test_jobs_api_lists_pending_and_finished_with_pagination(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=c5")
    blocker = await queue(client, slow_prompt(steps=100000, delay=0.002), client_id="c5")
    while True:
        kind, data = await receive(ws)
        if kind == "json" and data["type"] == "progress":
            break
    pending = await queue(client, image_prompt(9), extra_data={"extra_pnginfo": {"workflow": {"id": "wf-1"}}})
    body = await (await client.get("/api/jobs?status=in_progress,pending&limit=200&offset=0")).json()
    assert {j["id"]: j["status"] for j in body["jobs"]} == {blocker: "in_progress", pending: "pending"}
    assert body["pagination"] == {"offset": 0, "limit": 200, "total": 2, "has_more": False}
    assert [j["id"] for j in (await (await client.get("/api/jobs?workflow_id=wf-1")).json())["jobs"]] == [pending]
    detail = await (await client.get(f"/api/jobs/{pending}")).json()
    assert detail["status"] == "pending" and detail["workflow"]["prompt"]["2"]["class_type"] == "SolidImage"
    r = await client.post("/api/jobs/cancel", json={"job_ids": [blocker]})
    assert (await r.json()) == {"cancelled": True}
    await wait_history(client, pending)
    done = await (await client.get("/api/jobs?status=completed,failed,cancelled&limit=1&offset=0")).json()
    assert done["pagination"]["total"] == 2 and done["pagination"]["has_more"] is True
    assert len(done["jobs"]) == 1
    detail = await (await client.get(f"/api/jobs/{pending}")).json()
    assert detail["status"] == "completed" and detail["outputs_count"] == 1
    assert detail["preview_output"]["nodeId"] == "2" and detail["outputs"]["2"]["images"]
    assert (await client.get(f"/api/jobs/{uuid.uuid4()}")).status == 404
    assert (await client.get("/api/jobs?status=bogus")).status == 400
    assert (await client.get("/api/jobs?limit=0")).status == 400
    r = await client.post("/api/jobs/cancel", json={"job_ids": ["nope"]})
    assert r.status == 400 and (await r.json())["invalid_ids"] == ["nope"]
    assert (await client.post("/api/jobs/cancel", json={"job_ids": "x"})).status == 400


async def test_previews_reach_only_clients_that_can_take_them(client: TestClient) -> None:
    meta_ws = await client.ws_connect("/ws?clientId=meta")
    await meta_ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    naive_ws = await client.ws_connect("/ws?clientId=naive")
    prompt_id = await queue(client, slow_prompt(steps=3, preview=True), client_id="meta",
                            extra_data={"preview_method": "auto"})
    frames = [m[1] for m in await follow(meta_ws, prompt_id) if isinstance(m, tuple)]
    assert len(frames) == 3
    kind, size = struct.unpack(">II", frames[0][:8])
    meta = json.loads(frames[0][8:8 + size])
    assert kind == 4 and meta["node_id"] == "1" and meta["prompt_id"] == prompt_id
    assert meta["image_type"] == "image/jpeg" and frames[0][8 + size:8 + size + 2] == b"\xff\xd8"
    # the naive client (no flag, not its job) saw no binary frame at all
    while True:
        try:
            kind_, data = await receive(naive_ws, timeout=0.3)
        except asyncio.TimeoutError:
            break
        assert kind_ == "json"
    # a naive client's own job that asked for previews gets type 1 frames
    prompt_id = await queue(client, slow_prompt(steps=2, preview=True, tag=7), client_id="naive",
                            extra_data={"preview_method": "auto"})
    frames = [m[1] for m in await follow(naive_ws, prompt_id) if isinstance(m, tuple)]
    assert len(frames) == 2 and struct.unpack(">II", frames[0][:8]) == (1, 1)
    # without preview_method (server default none) nobody gets previews
    prompt_id = await queue(client, slow_prompt(steps=2, preview=True, tag=8), client_id="meta")
    assert not [m for m in await follow(meta_ws, prompt_id) if isinstance(m, tuple)]


async def test_msgpack_encoding_by_query_and_by_feature_flag(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=mp&encoding=msgpack")
    msg = await ws.receive()
    first = msgpack.unpackb(msg.data)
    assert msg.data[0] == 0x82 and first["type"] == "status" and first["data"]["sid"] == "mp"
    prompt_id = await queue(client, image_prompt(2), client_id="mp")
    seen = []
    while True:
        data = msgpack.unpackb((await asyncio.wait_for(ws.receive(), 10)).data)
        seen.append(data["type"])
        if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
            break
    assert "executed" in seen and "execution_success" in seen

    ws2 = await client.ws_connect("/ws?clientId=mp2")
    assert (await receive(ws2))[0] == "json"
    await ws2.send_str(json.dumps({"type": "feature_flags", "data": {"encoding": "msgpack"}}))
    reply = msgpack.unpackb((await asyncio.wait_for(ws2.receive(), 10)).data)
    assert reply["type"] == "feature_flags" and reply["data"]["supports_preview_metadata"] is True


async def test_reconnecting_client_hears_status_and_the_running_node(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=re")
    prompt_id = await queue(client, slow_prompt(steps=100000, delay=0.002), client_id="re")
    while True:
        kind, data = await receive(ws)
        if kind == "json" and data["type"] == "progress":
            break
    await ws.close()
    ws = await client.ws_connect("/ws?clientId=re")
    kind, status = await receive(ws)
    assert status["type"] == "status" and status["data"]["sid"] == "re"
    assert status["data"]["status"]["exec_info"]["queue_remaining"] == 1
    kind, executing = await receive(ws)
    assert executing["type"] == "executing" and executing["data"] == {"node": "1", "display_node": "1",
                                                                    "prompt_id": prompt_id}
    await client.post("/interrupt")
    await follow(ws, prompt_id)


async def test_free_drops_the_cache(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=fr")
    first = await queue(client, image_prompt(11), client_id="fr")
    await follow(ws, first)
    assert (await client.post("/free", json={"unload_models": True, "free_memory": True})).status == 200
    second = await queue(client, image_prompt(11), client_id="fr")
    messages = await follow(ws, second)
    ran = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
    assert ran == ["1", "2"]


async def test_a_failing_node_reports_execution_error_everywhere(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=err")
    prompt_id = await queue(client, {"1": {"class_type": "Fail", "inputs": {"message": "kaput"}}}, client_id="err")
    messages = await follow(ws, prompt_id)
    assert collapse(types(messages))[-5:] == ["executing", "progress_state", "execution_error", "status", "executing"]
    error = [m for m in messages if m["type"] == "execution_error"][0]["data"]
    assert error["node_id"] == "1" and error["node_type"] == "Fail"
    assert error["exception_type"] == "RuntimeError" and error["exception_message"] == "kaput"
    states = [m for m in messages if m["type"] == "progress_state"][-1]["data"]["nodes"]
    assert states["1"]["state"] == "error"
    entry = await wait_history(client, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["messages"][-1][0] == "execution_error"
    job = await (await client.get(f"/api/jobs/{prompt_id}")).json()
    assert job["status"] == "failed" and job["execution_error"]["exception_message"] == "kaput"
    # the server keeps going
    assert (await wait_history(client, await queue(client, image_prompt(1))))["status"]["status_str"] == "success"


async def test_partial_execution_targets_run_only_what_they_need(client: TestClient) -> None:
    ws = await client.ws_connect("/ws?clientId=part")
    prompt = slow_prompt(steps=1, tag=31)
    prompt_id = await queue(client, prompt, client_id="part", partial_execution_targets=["4"])
    messages = await follow(ws, prompt_id)
    ran = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
    assert ran == ["3", "4"]                       # the SlowCount branch (1 -> 2) did not run
    entry = await wait_history(client, prompt_id)
    assert list(entry["outputs"]) == ["4"] and entry["prompt"][4] == ["4"]
    r = await client.post("/prompt", json={"prompt": prompt, "partial_execution_targets": ["99"]})
    assert r.status == 400 and (await r.json())["error"]["type"] == "prompt_no_outputs"
