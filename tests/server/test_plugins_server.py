"""A ComfyUI-style plugin against the running server: its routes (with the /api twin), its web
folder under /extensions, and `PromptServer.instance.send_sync` reaching the job's websocket."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodes.plugins import load_plugins
from server.app import create_app

from .conftest import follow, make_settings
from .servernodes import make_registry

PLUGIN = textwrap.dedent('''
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/easel_test_plugin/hello")
    async def hello(request):
        return web.json_response({"hello": "plugin"})

    class Shout:
        CATEGORY = "test"
        FUNCTION = "run"
        RETURN_TYPES = ()
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"default": "hi"})}}

        def run(self, text):
            server = PromptServer.instance
            server.send_sync("easel_test_plugin.shout", {"text": text}, server.client_id)
            return {"ui": {"text": [text]}}

    NODE_CLASS_MAPPINGS = {"EaselTestShout": Shout}
    WEB_DIRECTORY = "./web"
''')


async def test_plugin_routes_web_folder_and_send_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))   # the plugin loader puts its shims first; undo after
    plugin = tmp_path / "custom_nodes" / "easel_test_plugin"
    (plugin / "web").mkdir(parents=True)
    (plugin / "__init__.py").write_text(PLUGIN)
    (plugin / "web" / "main.js").write_text("export const x = 1;\n")
    registry = make_registry()
    report = load_plugins([tmp_path / "custom_nodes"], registry)
    assert [r.ok for r in report.results] == [True]
    app = create_app(make_settings(tmp_path), registry=registry)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for path in ("/easel_test_plugin/hello", "/api/easel_test_plugin/hello"):
            r = await client.get(path)
            assert r.status == 200 and await r.json() == {"hello": "plugin"}
        extensions = await (await client.get("/api/extensions")).json()
        assert extensions == ["/extensions/easel_test_plugin/main.js"]
        r = await client.get(extensions[0])
        assert r.status == 200 and "export const x" in await r.text()
        info = await (await client.get("/object_info/EaselTestShout")).json()
        assert info["EaselTestShout"]["python_module"].startswith("custom_nodes.")

        ws = await client.ws_connect("/ws?clientId=plug")
        r = await client.post("/prompt", json={"prompt": {"1": {"class_type": "EaselTestShout",
                                                                "inputs": {"text": "loud"}}},
                                               "client_id": "plug"})
        prompt_id = (await r.json())["prompt_id"]
        messages = await follow(ws, prompt_id)
        shout = [m for m in messages if isinstance(m, dict) and m["type"] == "easel_test_plugin.shout"]
        assert shout and shout[0]["data"] == {"text": "loud"}
        names = [m["type"] for m in messages if isinstance(m, dict)]
        assert names.index("execution_start") < names.index("easel_test_plugin.shout") < names.index("executed")
