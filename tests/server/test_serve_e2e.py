"""`easel serve` as a real process with the real node registry and the demo txt2img workflow:
over HTTP + websocket, then in headless Chromium with the ComfyUI web frontend.

The browser test needs the Debian packages `chromium` (and `chromium-driver`), the Python package
`playwright` (its own browsers are never downloaded: it drives /usr/bin/chromium) and
`comfyui-frontend-package`; it skips, saying which one is missing, otherwise.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
CHROMIUM = "/usr/bin/chromium"
SIZE, STEPS = 64, 2          # tiny picture, two steps: the demo model is random anyway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.base, self.port, self.proc, self.log = base, port, proc, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if not (WORKFLOWS / "txt2img.json").is_file():
        pytest.skip("workflows/txt2img.json is not there")
    base = tmp_path_factory.mktemp("serve")
    settings_file = base / "user" / "default" / "comfy.settings.json"
    settings_file.parent.mkdir(parents=True)
    # skip the frontend's first-run template browser
    settings_file.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = _free_port()
    log = base / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                                 "--base-dir", str(base), "--cpu"], cwd=ROOT, stdout=out, stderr=out, env=env)
    served = Served(base, port, proc, log)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"easel serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            served.get("/queue")
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("easel serve did not answer within 120 s")
            time.sleep(0.1)
    yield served
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def small_txt2img(seed: int) -> dict[str, Any]:
    prompt = json.loads((WORKFLOWS / "txt2img.json").read_text())
    prompt["5"]["inputs"].update(width=SIZE, height=SIZE)
    prompt["3"]["inputs"].update(steps=STEPS, seed=seed)
    return prompt


async def _run_over_api(served: Served, prompt: dict[str, Any], client_id: str) -> tuple[list[str], dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{served.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{served.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                body = await r.json()
                assert r.status == 200, body
            prompt_id = body["prompt_id"]
            seen: list[str] = []
            executed: dict[str, Any] = {}
            while True:
                msg = await asyncio.wait_for(ws.receive(), 300)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                seen.append(data["type"])
                if data["type"] == "executed":
                    executed = data["data"]
                if data["type"] == "execution_error":
                    raise AssertionError(data["data"]["exception_message"])
                if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
                    return seen, executed


def test_serve_runs_txt2img_end_to_end(served: Served) -> None:
    seen, executed = asyncio.run(_run_over_api(served, small_txt2img(1), "e2e"))
    assert seen.index("execution_start") < seen.index("executed") < seen.index("execution_success")
    assert "progress" in seen                      # the sampler reported its steps
    image = executed["output"]["images"][0]
    assert executed["node"] == "9" and image["type"] == "output"
    with urllib.request.urlopen(f"{served.url}/view?filename={image['filename']}&type=output") as resp:
        data = resp.read()
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(data)).size == (SIZE, SIZE)
    info = served.get("/object_info/KSampler")
    assert "euler" in info["KSampler"]["input"]["required"]["sampler_name"][0]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return "Chromium is not installed (apt-get install -y chromium chromium-driver)"
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        return "comfyui-frontend-package is not installed (pip install 'easel[ui]')"
    return None


def test_browser_queues_the_demo_workflow_and_shows_the_image(served: Served) -> None:
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    ui = json.loads((WORKFLOWS / "txt2img.ui.json").read_text())
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [SIZE, SIZE]
        if node["type"] == "KSampler":
            node["widgets_values"][0] = 7     # seed
            node["widgets_values"][2] = STEPS
    views: list[tuple[int, str]] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                     headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("response", lambda r: views.append((r.status, r.headers.get("content-type", "")))
                    if "/api/view" in r.url else None)
            page.goto(served.url + "/", timeout=60_000)
            page.wait_for_function(
                "() => window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app"
                " && window.LiteGraph && window.LiteGraph.registered_node_types"
                " && window.LiteGraph.registered_node_types['KSampler']", timeout=60_000)
            page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", ui)
            page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
            page.wait_for_function(
                "() => { const n = window.comfyAPI.app.app.graph.getNodeById(9);"
                " return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }",
                timeout=240_000)
            width = page.evaluate("() => window.comfyAPI.app.app.graph.getNodeById(9).imgs[0].naturalWidth")
        finally:
            browser.close()
    assert width == SIZE
    assert any(status == 200 and ctype.startswith("image/") for status, ctype in views), views
    history = served.get("/history")
    assert any(entry["outputs"].get("9") for entry in history.values())
