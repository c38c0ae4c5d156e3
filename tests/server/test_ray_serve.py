"""`easel serve --ray local --workers 2` as a real process: the demo txt2img runs on Ray workers
(the real node registry in the actors), its image is served by /view, both workers take prompts,
and stopping the server leaves no Ray process behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'easel[ray]'); the scale-out tests need it")

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _ray_processes(session_root: Path) -> list[int]:
    """Processes whose command line names the Ray temp folder of this test."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(session_root).encode() in cmdline:
            out.append(int(proc.name))
    return out


def test_serve_with_ray_workers_runs_the_demo_and_cleans_up(tmp_path: Path) -> None:
    if not (ROOT / "workflows" / "txt2img.json").is_file():
        pytest.skip("workflows/txt2img.json is not there")
    base = tmp_path / "base"
    ray_tmp = Path(tempfile.mkdtemp(prefix="er", dir="/tmp"))    # Ray's socket paths must stay short
    port = _free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--base-dir",
                                 str(base), "--cpu", "--ray", "local", "--workers", "2"],
                                cwd=ROOT, stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"easel serve --ray exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get(url + "/queue")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"easel serve --ray did not answer within 150 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        prompt = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
        prompt["5"]["inputs"].update(width=64, height=64)
        ids = []
        for seed in range(4):
            prompt["3"]["inputs"].update(steps=2, seed=seed)
            ids.append(_post(url + "/prompt", {"prompt": prompt})["prompt_id"])
        deadline = time.monotonic() + 180
        while True:
            history = _get(url + "/history")
            if all(pid in history for pid in ids):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"prompts did not finish:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        for pid in ids:
            entry = history[pid]
            assert entry["status"]["status_str"] == "success", entry["status"]
            image = entry["outputs"]["9"]["images"][0]
            with urllib.request.urlopen(f"{url}/view?filename={image['filename']}&type=output") as resp:
                assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len({h["outputs"]["9"]["images"][0]["filename"] for h in history.values()}) == 4
        assert _ray_processes(ray_tmp)                      # the cluster was this test's own
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 20
    while _ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _ray_processes(ray_tmp)
    for pid in left:                                        # do not leave them to the next test run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes left after easel serve stopped: {left}"
    assert proc.returncode == 0, log.read_text()[-3000:]
