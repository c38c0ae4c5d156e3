"""The scale-out scheduler without Ray: the affinity policy, the several-running queue, and a
pool of two in-process backends behind the real server (the same PoolWorker the Ray path uses)."""
from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from graph.executor import Executor
from server.app import create_app
from server.backends import InProcessBackend, model_keys, prompt_models
from server.queue_store import Job
from server.scheduler import PendingView, PoolQueue, WorkerView, assign
from server.settings import STATE

from .conftest import make_settings, receive
from .test_ray_nodes import make_registry, model_prompt

A, B, C = "checkpoints:a.safetensors", "checkpoints:b.safetensors", "checkpoints:c.safetensors"


def w(index: int, free: bool, *held: str, load: int = 0) -> WorkerView:
    return WorkerView(index, free, frozenset(held), load)


def p(pid: str, *models: str, waited: float = 0.0, avoid: tuple[int, ...] = ()) -> PendingView:
    return PendingView(pid, frozenset(models), waited, frozenset(avoid))


def test_model_keys_name_checkpoints_and_loras() -> None:
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
              "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors", "model": ["4", 0]}},
              "3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    assert model_keys(prompt) == {"4": frozenset({"checkpoints:sd15.safetensors"}),
                                  "10": frozenset({"loras:style.safetensors"})}
    assert prompt_models(prompt) == {"checkpoints:sd15.safetensors", "loras:style.safetensors"}


def test_a_free_worker_holding_the_checkpoint_wins() -> None:
    assert assign([p("x", A)], [w(0, True, B), w(1, True, A, load=5)], wait=3.0) == [("x", 1)]


def test_the_job_waits_for_the_busy_holder_then_takes_any_free_worker() -> None:
    workers = [w(0, False, A), w(1, True, B)]
    assert assign([p("x", A, waited=1.0)], workers, wait=3.0) == []
    assert assign([p("x", A, waited=3.5)], workers, wait=3.0) == [("x", 1)]


def test_a_waiting_job_does_not_block_the_next_one() -> None:
    workers = [w(0, False, A), w(1, True, B)]
    assert assign([p("x", A), p("y", B)], workers, wait=3.0) == [("y", 1)]


def test_new_checkpoint_goes_to_the_worker_nobody_else_wants() -> None:
    workers = [w(0, True, A), w(1, True, B)]
    # c is new: it takes worker 1 (b is wanted by nobody pending), leaving worker 0 for the a prompt
    assert assign([p("c", C), p("a", A)], workers, wait=3.0) == [("a", 0), ("c", 1)]
    # without model wishes the least loaded worker (fewest models held, fewest jobs)
    assert assign([p("plain")], [w(0, True, A, load=1), w(1, True)], wait=3.0) == [("plain", 1)]


def test_a_requeued_job_avoids_the_worker_it_was_lost_on() -> None:
    assert assign([p("x", A, avoid=(0,))], [w(0, True, A), w(1, True)], wait=3.0) == [("x", 1)]
    assert assign([p("x", avoid=(0,))], [w(0, True), w(1, False)], wait=3.0) == []
    assert assign([p("x", avoid=(0,), waited=4.0)], [w(0, True), w(1, False)], wait=3.0) == [("x", 0)]


def test_pool_queue_runs_several_jobs_and_requeues_in_place() -> None:
    queue = PoolQueue()
    jobs = [Job(f"j{i}", float(i + 1), {}, {}, []) for i in range(3)]
    queue.put(jobs)
    assert [job.prompt_id for job, _ in queue.head(10)] == ["j0", "j1", "j2"]
    assert queue.start("j0") is jobs[0] and queue.start("j1") is jobs[1]
    assert queue.remaining() == 3 and queue.running is jobs[0]
    assert {j.prompt_id for j in queue.running_jobs()} == {"j0", "j1"}
    assert queue.get("j1") is jobs[1]
    queue.requeue(jobs[0])
    assert [job.prompt_id for job, _ in queue.head(10)] == ["j0", "j2"]
    queue.done(jobs[1])
    assert queue.remaining() == 2 and queue.running is None


async def test_in_process_pool_spreads_checkpoints_with_one_load_each(tmp_path: Path) -> None:
    registry = make_registry()

    def pool(folders: Any) -> Any:
        return [InProcessBackend(Executor(registry, folders=folders)) for _ in range(2)], None

    app = create_app(make_settings(tmp_path), registry=registry, pool=pool, affinity_wait=5.0)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        ws = await client.ws_connect("/ws?clientId=tester")
        await receive(ws)
        ids = []
        for seed, ckpt in enumerate(["a.safetensors", "b.safetensors"] * 3):
            resp = await client.post("/prompt", json={"prompt": model_prompt(ckpt, seed, steps=3, delay=0.03),
                                                      "client_id": "tester"})
            ids.append((await resp.json())["prompt_id"])
        left, messages = set(ids), []
        while left:
            _kind, data = await receive(ws)
            messages.append(data)
            if data["type"] == "executing" and data["data"]["node"] is None:
                left.discard(data["data"]["prompt_id"])
        loads = collections.Counter(m["data"]["data"]["ckpt_name"] for m in messages
                                    if m["type"] == "node_record" and m["data"]["name"] == "checkpoint_load")
        assert loads == {"a.safetensors": 1, "b.safetensors": 1}
        st = client.app[STATE]
        assert all(st.history.get(pid)["status"]["status_str"] == "success" for pid in ids)
        assert sorted(slot.jobs_done for slot in st.worker.slots) == [3, 3]
        assert {slot.held for slot in st.worker.slots} == {frozenset({A}), frozenset({B})}
        resp = await client.get("/queue")
        assert await resp.json() == {"queue_running": [], "queue_pending": []}
        await ws.close()
        await asyncio.sleep(0)
