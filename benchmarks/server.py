"""Server figures: cached prompts per second end to end, websocket fan-out latency, memory.

Starts `easel serve --cpu` as its own process (the real node registry) on a fresh base directory
and drives it over real sockets from this process:

1. throughput: C concurrent keep-alive connections POST the same prompt N times; "accepted/s" counts the
   200 answers (each one sent after its queue row is committed to SQLite), "executed/s" runs until
   the queue is empty again (every prompt validated, queued, run by the worker from the cache,
   its history entry written and its events routed); the server's CPU time per prompt comes
   from /proc, which other load on the machine does not inflate. Two prompts: a pure four-node graph and the
   demo txt2img graph (64x64, 2 steps) after one warm-up run, so that every node comes from the cache.
2. fan-out: 50 websocket clients connected; a prompt without client_id is posted; the time from
   the POST until each client has the broadcast `status` message.
3. memory: VmRSS of the server process when idle, after the model is loaded, after the runs.

Reference measured here: the executor alone (validation + cached run of the pure graph, in this
process, no server), to show what the HTTP / queue / SQLite / websocket path adds.

    python benchmarks/server.py [--prompts 5000] [--clients 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PURE = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "easel"}},
        "2": {"class_type": "StringConcatenate", "inputs": {"string_a": ["1", 0], "string_b": "bench", "delimiter": " "}},
        "3": {"class_type": "StringReplace", "inputs": {"string": ["2", 0], "find": "e", "replace": "E"}},
        "4": {"class_type": "ShowText", "inputs": {"text": ["3", 0]}}}


def txt2img() -> dict[str, Any]:
    prompt = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(steps=2, seed=1)
    return prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(base: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--cpu", "--port", str(port),
                             "--base-dir", str(base)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(base / "server.log", "wb"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/queue", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {(base / 'server.log').read_text()[-2000:]}") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


async def wait_empty(session: aiohttp.ClientSession, url: str) -> None:
    while True:
        async with session.get(f"{url}/prompt") as r:
            if (await r.json())["exec_info"]["queue_remaining"] == 0:
                return
        await asyncio.sleep(0.002)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _post_loop(port: int, body: bytes, remaining: Any) -> None:
    """One keep-alive connection POSTing `body` to /prompt until `remaining` runs out. A bare
    HTTP/1.1 client: the load generator shares the two cores with the server, so it must be cheap."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        for _ in remaining:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            start = head.lower().index(b"content-length:") + 15
            payload = await reader.readexactly(int(head[start:head.index(b"\r\n", start)]))
            if head[9:12] != b"200":
                raise SystemExit(f"POST /prompt answered {head[9:12].decode()}: {payload[:300]!r}")
    finally:
        writer.close()


async def throughput(url: str, port: int, pid: int, prompt: dict[str, Any], total: int,
                     clients: int) -> tuple[float, float, float]:
    """(accepted/s, executed/s, server CPU µs per prompt)."""
    body = json.dumps({"prompt": prompt}).encode()
    async with aiohttp.ClientSession() as session:
        await wait_empty(session, url)
        remaining = iter(range(total))
        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(_post_loop(port, body, remaining) for _ in range(clients)))
        accepted = time.perf_counter() - t0
        await wait_empty(session, url)
        done = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
    return total / accepted, total / done, cpu / total * 1e6


async def fanout(url: str, n_clients: int, rounds: int) -> tuple[float, float]:
    """Median over rounds of (median, slowest) client latency in ms for one broadcast status."""
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"{url}/ws?clientId=fan{i}") for i in range(n_clients)]
        for ws in sockets:
            await ws.receive()          # the connect-time status
        medians, slowest = [], []
        body = json.dumps({"prompt": PURE}).encode()
        for _ in range(rounds):
            arrivals: list[float] = []

            async def listen(ws: aiohttp.ClientWebSocketResponse, arrivals: list[float] = arrivals) -> None:
                while True:
                    msg = await ws.receive()
                    data = json.loads(msg.data)
                    if data["type"] == "status" and data["data"]["status"]["exec_info"]["queue_remaining"] > 0:
                        arrivals.append(time.perf_counter())
                        return

            listeners = [asyncio.create_task(listen(ws)) for ws in sockets]
            t0 = time.perf_counter()
            async with session.post(f"{url}/prompt", data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
            await asyncio.gather(*listeners)
            lat = sorted((t - t0) * 1000 for t in arrivals)
            medians.append(statistics.median(lat))
            slowest.append(lat[-1])
            await wait_empty(session, url)
            for ws in sockets:          # drain the status(0) of this round
                while True:
                    try:
                        await asyncio.wait_for(ws.receive(), 0.05)
                    except asyncio.TimeoutError:
                        break
        for ws in sockets:
            await ws.close()
    return statistics.median(medians), statistics.median(slowest)


def executor_reference(repeats: int) -> float:
    """µs per cached validate+run of PURE with the executor alone (no server)."""
    from graph.cache import OutputCache
    from graph.executor import Executor
    from nodes.builtin import primitives
    from nodes.registry import Registry
    registry = Registry()
    registry.register_module(primitives, builtin=True)
    ex = Executor(registry, OutputCache())
    ex.run(PURE)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            ex.run(PURE)
        times.append((time.perf_counter() - t0) / repeats * 1e6)
    return statistics.median(times)


async def main_async(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other work on the machine skews wall-clock figures; CPU µs per prompt does not)")
    t0 = time.perf_counter()
    proc = start_server(base, port)
    print(f"server started in {time.perf_counter() - t0:.1f} s (pid {proc.pid}); idle RSS {rss_mib(proc.pid):.0f} MiB")
    try:
        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            async with session.post(f"{url}/prompt", json={"prompt": txt2img()}) as r:
                assert r.status == 200, await r.text()
            await wait_empty(session, url)
            print(f"txt2img warm-up (demo checkpoint made and loaded, 64x64, 2 steps): {time.perf_counter() - t0:.1f} s; "
                  f"RSS {rss_mib(proc.pid):.0f} MiB")
        ref_us = executor_reference(2000)
        print(f"reference: executor alone, validate + cached run of the pure graph: {ref_us:.0f} µs "
              f"({1e6 / ref_us:.0f}/s)")
        for name, prompt in (("pure 4-node graph", PURE), ("txt2img (all cached)", txt2img())):
            runs = [await throughput(url, port, proc.pid, prompt, args.prompts, args.clients) for _ in range(args.rounds)]
            a, d, cpu = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{name}: {args.prompts} prompts, {args.clients} clients, median of {args.rounds}: "
                  f"accepted {a:.0f}/s, executed end to end {d:.0f}/s; server CPU {cpu:.0f} µs per prompt "
                  f"(= {1e6 / cpu:.0f} prompts/s per core; {cpu / ref_us:.1f}x the bare executor)")
        one = [await throughput(url, port, proc.pid, PURE, 500, 1) for _ in range(3)]
        rt = statistics.median(r[0] for r in one)
        print(f"one client, sequential POST /prompt round trips (pure graph): {rt:.0f}/s ({1e3 / rt:.2f} ms each)")
        med, slow = await fanout(url, 50, args.fanout_rounds)
        print(f"websocket fan-out, 50 clients, one broadcast status after POST /prompt: "
              f"median client {med:.2f} ms, slowest client {slow:.2f} ms (median of {args.fanout_rounds} rounds)")
        db_mib = os.path.getsize(base / "user" / "easel_queue.sqlite3") / 2**20
        print(f"server RSS after the runs (history of {min(args.prompts * args.rounds * 2, 10000)} entries kept): "
              f"{rss_mib(proc.pid):.0f} MiB; SQLite file {db_mib:.1f} MiB")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fanout-rounds", type=int, default=30)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
