"""Scale-out figures: demo-model throughput with 1 and 2 Ray workers, and what the Ray path adds per prompt.

1. throughput: a local Ray cluster (127.0.0.1 only) and the Easel app with a pool of N workers
   (N = 1, 2; each worker gets --threads torch threads (default 1: on a shared machine more threads
   per process mostly spin) on a CPU machine, or a 1/N share of the one GPU with --gpu-share). After
   one warm-up prompt per worker (each loads the demo checkpoint), P txt2img prompts (--size,
   --steps; a new seed each) are posted at once; prompts per minute = P over the time until the last
   history entry; the median of --rounds rounds. The ratio 2-worker/1-worker is the scale-out gain.
2. scheduling overhead: the same pure four-node prompt (a new value each time, so every node runs)
   posted R times one after the other, POST until the client's `executing {node: null}`, in-process
   (the default server) and on one Ray worker; the difference of the medians is what the Ray path
   (dispatch, actor call, event polling, result) adds per prompt.

    python benchmarks/scaleout.py [--prompts 16] [--rounds 3] [--runs 30] [--threads 1] [--size 64] [--steps 3]
                                  [--gpu-share]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray
from aiohttp.test_utils import TestClient, TestServer

from server import ray_backend
from server.app import create_app
from server.settings import STATE, Settings

SIZE, STEPS = 64, 3     # set from --size / --steps


def txt2img(seed: int) -> dict[str, Any]:
    prompt = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    prompt["5"]["inputs"].update(width=SIZE, height=SIZE)
    prompt["3"]["inputs"].update(steps=STEPS, seed=seed)
    return prompt


def pure(value: int) -> dict[str, Any]:
    return {"1": {"class_type": "PrimitiveInt", "inputs": {"value": value}},
            "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": 3, "operation": "add"}},
            "3": {"class_type": "IntToFloat", "inputs": {"value": ["2", 0]}},
            "4": {"class_type": "PrimitiveString", "inputs": {"value": f"v{value}"}},
            "5": {"class_type": "ShowText", "inputs": {"text": ["4", 0]}}}


def settings(base: Path) -> Settings:
    # the demo files are made here: the server remembers the names it made them for per process,
    # not per base directory, and every app of this script has a fresh one
    from nodes.environment import ensure_demo_files
    from nodes.folders import ModelFolders
    ensure_demo_files(txt2img(0), ModelFolders(base))
    return Settings(base_dir=base, demo_files=True, frontend=False, plugins=False)


def ray_pool(st: Settings, workers: int, gpu_share: bool, threads: int = 1, shared: bool = False) -> Any:
    plan = ray_backend.PoolPlan(workers, 1.0 / workers if gpu_share else 0.0, 0.0 if gpu_share else 1.0)

    def factory(folders: Any) -> Any:
        config = ray_backend.worker_config(st, folders, shared_output=shared, threads=None if gpu_share else threads)
        pool = ray_backend.RayPool(config, plan, folders)
        return pool.start_all(), pool.make
    return factory


async def post(client: TestClient, prompt: dict[str, Any]) -> str:
    resp = await client.post("/prompt", json={"prompt": prompt, "client_id": "bench"})
    body = await resp.json()
    if resp.status != 200:
        raise RuntimeError(f"POST /prompt answered {resp.status}: {body}")
    return str(body["prompt_id"])


async def wait_all(client: TestClient, ids: list[str], timeout: float = 1800.0) -> None:
    st = client.app[STATE]
    deadline = time.monotonic() + timeout
    while True:
        entries = [st.history.get(pid) for pid in ids]
        if all(entries):
            bad = [e["status"]["messages"][-1] for e in entries if e["status"]["status_str"] != "success"]
            if bad:
                raise RuntimeError(f"{len(bad)} prompts failed: {bad[0]}")
            return
        if time.monotonic() > deadline:
            raise RuntimeError("prompts did not finish")
        await asyncio.sleep(0.02)


async def throughput(workers: int, args: argparse.Namespace) -> list[float]:
    """Prompts per minute of each round."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        st = settings(Path(tmp))
        app = create_app(st, pool=ray_pool(st, workers, args.gpu_share, args.threads, args.shared))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await wait_all(client, [await post(client, txt2img(10_000 + i)) for i in range(workers)])
            for r in range(args.rounds):
                start = time.perf_counter()
                ids = [await post(client, txt2img(r * args.prompts + i)) for i in range(args.prompts)]
                await wait_all(client, ids)
                out.append(args.prompts / (time.perf_counter() - start) * 60.0)
            split = [slot.jobs_done for slot in client.app[STATE].worker.slots]
    print(f"  prompts run per worker: {split}")
    return out


async def latencies(app: Any, runs: int) -> list[float]:
    out = []
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        ws = await client.ws_connect("/ws?clientId=bench")
        await ws.receive()
        for i in range(runs + 3):
            start = time.perf_counter()
            pid = await post(client, pure(i))
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg["type"] == "executing" and msg["data"]["node"] is None and msg["data"]["prompt_id"] == pid:
                    break
            if i >= 3:                                  # the first runs warm caches and imports
                out.append(time.perf_counter() - start)
        await ws.close()
    return out


async def main_async(args: argparse.Namespace) -> None:
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; ray {ray.__version__}; "
          f"{'one GPU shared by the workers' if args.gpu_share else f'CPU workers, {args.threads} thread(s) each'}")
    ppm = {}
    for workers in (1, 2):
        rounds = await throughput(workers, args)
        ppm[workers] = statistics.median(rounds)
        print(f"throughput, {workers} worker(s): {ppm[workers]:.1f} prompts/min (median of {args.rounds} rounds of "
              f"{args.prompts} demo prompts, {SIZE}x{SIZE}, {STEPS} steps; rounds {', '.join(f'{x:.0f}' for x in rounds)})")
    print(f"ratio 2 workers / 1 worker: {ppm[2] / ppm[1]:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        local = await latencies(create_app(settings(Path(tmp) / "local")), args.runs)
        st = settings(Path(tmp) / "ray")
        remote = await latencies(create_app(st, pool=ray_pool(st, 1, args.gpu_share, args.threads)), args.runs)
    ml, mr = statistics.median(local), statistics.median(remote)
    print(f"pure prompt POST -> executing null, median of {args.runs}: in-process {ml * 1000:.1f} ms, "
          f"Ray worker {mr * 1000:.1f} ms")
    print(f"scheduling overhead of the Ray path: {(mr - ml) * 1000:.1f} ms per prompt (target < 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps")
    parser.add_argument("--shared", action="store_true",
                        help="workers write into the server's output folder (else files come back over Ray)")
    parser.add_argument("--gpu-share", action="store_true", help="workers share the machine's one GPU")
    args = parser.parse_args()
    global SIZE, STEPS
    SIZE, STEPS = args.size, args.steps
    ray_backend.connect("local", num_cpus=os.cpu_count() or 1)
    try:
        asyncio.run(main_async(args))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
