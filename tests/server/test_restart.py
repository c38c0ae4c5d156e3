"""The queue survives a hard kill: a started server process, SIGKILLed while a prompt runs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .servernodes import image_prompt, slow_prompt

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.server.run_test_server", "--base-dir",
                                      str(self.base), "--port", str(self.port)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self       # died at start (the crash tests look at that)
            try:
                self.get("/queue")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        raise AssertionError("the server process did not start")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post_prompt(self, prompt: dict[str, Any]) -> str:
        return self.call("POST", "/prompt", {"prompt": prompt})["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}")
            if entry:
                return entry[prompt_id]
            time.sleep(0.05)
        raise AssertionError(f"{prompt_id} did not finish")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait_dead(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


@pytest.fixture
def server_dir(tmp_path: Path):
    procs: list[ServerProcess] = []

    def make() -> ServerProcess:
        p = ServerProcess(tmp_path)
        procs.append(p)
        return p.start()

    yield make
    for p in procs:
        p.kill()


def test_sigkill_while_running_keeps_queue_and_history(server_dir) -> None:
    first = server_dir()
    done = first.post_prompt(image_prompt(1))
    assert first.wait_history(done)["status"]["status_str"] == "success"
    running = first.post_prompt(slow_prompt(steps=40, delay=0.025, tag=1))
    waiting = [first.post_prompt(image_prompt(v)) for v in (2, 3, 4)]
    deadline = time.monotonic() + 10
    while True:     # wait until it is the running job (and has made progress)
        jobs = first.get(f"/api/jobs/{running}")
        if jobs["status"] == "in_progress":
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    first.kill()

    second = server_dir()
    history = second.get("/history")
    assert done in history and history[done]["outputs"]["2"]["images"]       # finished work is kept
    retried = second.wait_history(running)
    assert retried["status"]["status_str"] == "success" and retried["outputs"]["4"]["text"] == ["1"]
    for prompt_id in waiting:
        assert second.wait_history(prompt_id)["status"]["status_str"] == "success"
    order = list(second.get("/history"))
    assert order == [done, running, *waiting]
    assert second.get("/queue") == {"queue_running": [], "queue_pending": []}
    # numbering continues after the restart
    before = max(h["prompt"][0] for h in second.get("/history").values())
    new = second.call("POST", "/prompt", {"prompt": image_prompt(5)})
    assert new["number"] > before


def test_a_prompt_that_kills_the_server_twice_is_marked_failed(server_dir) -> None:
    first = server_dir()
    killer = first.post_prompt({"1": {"class_type": "KillProcess", "inputs": {"value": 5}}})
    after = first.post_prompt(image_prompt(6))
    assert first.wait_dead() == -signal.SIGKILL
    second = server_dir()                         # retried once: dies again
    assert second.wait_dead() == -signal.SIGKILL
    third = server_dir()
    entry = third.wait_history(killer)
    assert entry["status"]["status_str"] == "error"
    name, payload = entry["status"]["messages"][-1]
    assert name == "execution_error" and payload["exception_type"] == "ServerCrashed"
    assert "2 attempts" in payload["exception_message"]
    assert third.wait_history(after)["status"]["status_str"] == "success"
    jobs = third.get("/api/jobs?status=failed")["jobs"]
    assert [j["id"] for j in jobs] == [killer]


def test_graceful_stop_keeps_the_running_prompt_queued(server_dir) -> None:
    first = server_dir()
    running = first.post_prompt(slow_prompt(steps=100000, delay=0.002, tag=2))
    deadline = time.monotonic() + 10
    while first.get(f"/api/jobs/{running}")["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGTERM)          # what `easel serve` gets from a service manager
    assert first.wait_dead() == 0
    second = server_dir()
    pending = second.get(f"/api/jobs/{running}")
    assert pending["status"] in ("pending", "in_progress")   # queued again, not failed
    second.call("POST", "/interrupt")
    deadline = time.monotonic() + 10
    while second.get(f"/api/jobs/{running}")["status"] != "cancelled":
        assert time.monotonic() < deadline
        second.call("POST", "/interrupt")
        time.sleep(0.05)
