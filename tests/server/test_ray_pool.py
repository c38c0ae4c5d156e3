"""Scale-out on a local Ray cluster started here (CPU only, bound to 127.0.0.1): model affinity,
events as if local, output files back to the server, a killed worker, a poison prompt, a hung
worker, interrupt. Workers run the pure test nodes of test_ray_nodes.py (no torch)."""
from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'easel[ray]'); the scale-out tests need it")

from server import ray_backend
from server.app import create_app
from server.settings import STATE

from .conftest import follow, make_settings, receive
from .servernodes import image_prompt, slow_prompt
from .test_ray_nodes import make_registry, model_prompt

REGISTRY = "tests.server.test_ray_nodes:make_registry"


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    if ray.is_initialized():
        ray.shutdown()
    started = ray_backend.connect("local", num_cpus=4, num_gpus=0)
    assert started
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]   # loopback only
    try:
        yield
    finally:
        ray.shutdown()


def pool_factory(settings: Any, workers: int, shared: bool, heartbeat: float = 3.0) -> Any:
    plan = ray_backend.PoolPlan(workers, 0.0, 1.0)

    def factory(folders: Any) -> Any:
        config = ray_backend.WorkerConfig(
            base_dir=str(settings.base_dir), output_dir=str(folders.output_dir) if shared else None,
            temp_dir=str(folders.temp_dir) if shared else None, registry=REGISTRY, demo_files=False, threads=1)
        pool = ray_backend.RayPool(config, plan, folders, heartbeat=heartbeat, poll_wait=0.2)
        return pool.start_all(), pool.make
    return factory


async def ray_client(tmp_path: Path, workers: int, shared: bool = True, heartbeat: float = 3.0,
                     affinity_wait: float = 3.0) -> TestClient:
    settings = make_settings(tmp_path)
    app = create_app(settings, registry=make_registry(), pool=pool_factory(settings, workers, shared, heartbeat),
                     affinity_wait=affinity_wait)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest_asyncio.fixture
async def two_workers(cluster: None, tmp_path: Path) -> AsyncIterator[TestClient]:
    client = await ray_client(tmp_path, 2)
    try:
        yield client
    finally:
        await client.close()


async def post(client: TestClient, prompt: dict[str, Any], client_id: str = "tester") -> str:
    resp = await client.post("/prompt", json={"prompt": prompt, "client_id": client_id})
    body = await resp.json()
    assert resp.status == 200, body
    return str(body["prompt_id"])


async def until_done(client: TestClient, prompt_ids: list[str], timeout: float = 40.0) -> dict[str, Any]:
    st = client.app[STATE]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        entries = {pid: st.history.get(pid) for pid in prompt_ids}
        if all(entries.values()):
            return entries
        await asyncio.sleep(0.05)
    raise AssertionError(f"prompts not finished in {timeout} s: {[p for p in prompt_ids if not st.history.get(p)]}")


async def until(check: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        await asyncio.sleep(0.05)


async def messages_until_done(ws: Any, prompt_ids: list[str], timeout: float = 40.0) -> list[dict[str, Any]]:
    """JSON messages until every prompt's `executing {node: null}` came."""
    left, out = set(prompt_ids), []
    while left:
        kind, data = await receive(ws, timeout)
        if kind != "json":
            continue
        out.append(data)
        if data["type"] == "executing" and data["data"].get("node") is None:
            left.discard(data["data"].get("prompt_id"))
    return out


async def test_prompts_over_two_checkpoints_load_each_once_per_worker(two_workers: TestClient) -> None:
    client = two_workers
    ws = await client.ws_connect("/ws?clientId=tester")
    await receive(ws)
    ids = [await post(client, model_prompt(ckpt, seed, steps=3, delay=0.05))
           for seed, ckpt in enumerate(["a.safetensors", "b.safetensors"] * 4)]
    messages = await messages_until_done(ws, ids)
    entries = await until_done(client, ids)
    assert all(e["status"]["status_str"] == "success" for e in entries.values())
    loads = collections.Counter((m["data"]["data"]["pid"], m["data"]["data"]["ckpt_name"]) for m in messages
                                if m["type"] == "node_record" and m["data"]["name"] == "checkpoint_load")
    assert max(loads.values()) == 1, loads                     # each checkpoint at most once per worker
    ran_on = {e["outputs"]["2"]["text"][0].rsplit(":", 1)[1] for e in entries.values()}
    assert len(ran_on) == 2                                     # both workers got prompts
    assert sum(loads.values()) == 2, loads                      # affinity: each checkpoint on one worker
    successes = collections.Counter(m["data"]["prompt_id"] for m in messages if m["type"] == "execution_success")
    assert successes == {pid: 1 for pid in ids}                # nothing ran twice
    await ws.close()


def _shape(messages: list[Any]) -> list[tuple[Any, ...]]:
    """What must match between local and remote runs: types, nodes, progress values, outputs."""
    out = []
    for m in messages:
        if isinstance(m, tuple):
            out.append(("binary",))
            continue
        data = m["data"]
        if m["type"] == "progress_state":
            out.append((m["type"], tuple(sorted((k, v["state"], v["value"]) for k, v in data["nodes"].items()))))
        elif m["type"] == "executed":
            out.append((m["type"], data["node"], sorted(data["output"])))
        else:
            out.append((m["type"], data.get("node"), data.get("value"), data.get("max")))
    return out


async def _one_run(client: TestClient, prompt: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    ws = await client.ws_connect("/ws?clientId=tester")
    await receive(ws)
    pid = await post(client, prompt)
    messages = await follow(ws, pid)
    await ws.close()
    return messages, (await until_done(client, [pid]))[pid]


async def test_websocket_sees_the_same_messages_as_in_process_and_files_come_back(cluster: None,
                                                                                   tmp_path: Path) -> None:
    prompt = {**slow_prompt(steps=3, delay=0.01, tag=5),
              **{k + "0": v for k, v in image_prompt(value=40, prefix="remote").items()}}
    prompt["20"]["inputs"]["value"] = ["10", 0]
    local_app = create_app(make_settings(tmp_path / "local"), registry=make_registry())
    async with TestClient(TestServer(local_app, host="127.0.0.1")) as local:
        local_messages, local_entry = await _one_run(local, prompt)
    remote = await ray_client(tmp_path / "remote", 1, shared=False)     # files travel back over Ray
    try:
        remote_messages, remote_entry = await _one_run(remote, prompt)
        assert _shape(remote_messages) == _shape(local_messages)
        assert remote_entry["status"] == {**local_entry["status"], "messages": remote_entry["status"]["messages"]}
        image = remote_entry["outputs"]["20"]["images"][0]
        resp = await remote.get("/view", params={"filename": image["filename"], "type": "output"})
        assert resp.status == 200
        body = await resp.read()
        assert body[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "remote" / "output" / image["filename"]).read_bytes() == body
    finally:
        await remote.close()


async def _running_slot(client: TestClient, prompt_id: str, timeout: float = 20.0) -> Any:
    worker = client.app[STATE].worker
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for slot in worker.slots:
            if slot.job is not None and slot.job.prompt_id == prompt_id and slot.current_node is not None:
                return slot
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not start")


async def test_worker_killed_mid_prompt_and_the_prompt_finishes_on_another(two_workers: TestClient) -> None:
    client = two_workers
    worker = client.app[STATE].worker
    pid = await post(client, model_prompt("a.safetensors", 1, steps=40, delay=0.05))
    slot = await _running_slot(client, pid)
    killed = slot.backend.info["pid"]
    ray.kill(slot.backend.actor, no_restart=True)
    entry = (await until_done(client, [pid]))[pid]
    assert entry["status"]["status_str"] == "success"
    ran_on = int(entry["outputs"]["2"]["text"][0].rsplit(":", 1)[1])
    assert ran_on != killed
    await until(lambda: worker.replaced == 1 and all(s.ready for s in worker.slots))   # a new actor took its slot
    again = await post(client, model_prompt("b.safetensors", 2))        # the pool has two workers again
    assert (await until_done(client, [again]))[again]["status"]["status_str"] == "success"
    assert all(s.ready for s in worker.slots)


async def test_poison_prompt_fails_after_two_workers(two_workers: TestClient) -> None:
    client = two_workers
    worker = client.app[STATE].worker
    ws = await client.ws_connect("/ws?clientId=tester")
    await receive(ws)
    pid = await post(client, {"1": {"class_type": "KillProcess", "inputs": {"value": 0}}})
    messages = await follow(ws, pid)
    entry = (await until_done(client, [pid]))[pid]
    assert entry["status"]["status_str"] == "error"
    name, payload = entry["status"]["messages"][-1]
    assert name == "execution_error" and payload["exception_type"] == "WorkerLost"
    assert "2 workers" in payload["exception_message"]
    assert [m["type"] for m in messages if isinstance(m, dict)].count("execution_error") == 1
    await until(lambda: worker.replaced == 2 and all(s.ready for s in worker.slots))
    after = await post(client, model_prompt("a.safetensors", 3))       # the server goes on
    assert (await until_done(client, [after]))[after]["status"]["status_str"] == "success"
    await ws.close()


async def test_hung_worker_misses_its_heartbeat_and_the_prompt_is_requeued(cluster: None, tmp_path: Path) -> None:
    client = await ray_client(tmp_path, 2, heartbeat=1.5)
    try:
        marker = tmp_path / "hung-once"
        pid = await post(client, {"1": {"class_type": "HangOnce", "inputs": {"marker": str(marker)}}})
        entry = (await until_done(client, [pid]))[pid]
        assert entry["status"]["status_str"] == "success"
        assert entry["outputs"]["1"] == {"text": ["went through"]}
        worker = client.app[STATE].worker
        assert marker.exists()
        await until(lambda: worker.replaced == 1 and all(s.ready for s in worker.slots))
    finally:
        await client.close()


async def test_interrupt_reaches_the_actor(two_workers: TestClient) -> None:
    client = two_workers
    ws = await client.ws_connect("/ws?clientId=tester")
    await receive(ws)
    pid = await post(client, model_prompt("a.safetensors", 9, steps=400, delay=0.02))
    await _running_slot(client, pid)
    resp = await client.post("/interrupt", json={"prompt_id": pid})
    assert resp.status == 200
    messages = await follow(ws, pid)
    entry = (await until_done(client, [pid]))[pid]
    assert entry["status"]["status_str"] == "error"
    assert [name for name, _ in entry["status"]["messages"]][-1] == "execution_interrupted"
    steps = [m["data"]["value"] for m in messages if isinstance(m, dict) and m["type"] == "progress"]
    assert steps and max(steps) < 400
    await ws.close()


def test_files_from_two_workers_never_overwrite_each_other(tmp_path: Path) -> None:
    from nodes.folders import ModelFolders
    folders = ModelFolders(tmp_path)
    names = [ray_backend.place_file(folders, "output", "", "ComfyUI_00001_.png", bytes([i])) for i in range(3)]
    assert names == ["ComfyUI_00001_.png", "ComfyUI_00002_.png", "ComfyUI_00003_.png"]
    assert [(tmp_path / "output" / n).read_bytes() for n in names] == [b"\x00", b"\x01", b"\x02"]
    assert ray_backend.place_file(folders, "temp", "sub", "x.png", b"a") == "x.png"
    assert ray_backend.place_file(folders, "temp", "sub", "x.png", b"b") == "x_1.png"
    with pytest.raises(ValueError, match="leaves the temp folder"):
        ray_backend.place_file(folders, "temp", "../..", "evil.png", b"c")
    ui = {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}], "text": ["t"]}
    renamed = ray_backend.rename_ui(ui, {("output", "", "ComfyUI_00001_.png"): "ComfyUI_00004_.png"})
    assert renamed == {"images": [{"filename": "ComfyUI_00004_.png", "subfolder": "", "type": "output"}], "text": ["t"]}
