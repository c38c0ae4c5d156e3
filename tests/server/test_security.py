"""Token, Origin/Host checks, bad bodies, and the path helpers of server/security.py."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from server.app import create_app
from server.security import UnsafePath, check_image, safe_join

from .conftest import make_settings
from .servernodes import image_prompt, make_registry


async def test_token_is_required_by_every_route_and_the_websocket(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, token="s3cret"), registry=make_registry())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for method, path in [("GET", "/"), ("GET", "/object_info"), ("GET", "/api/queue"), ("POST", "/prompt"),
                             ("GET", "/view?filename=x.png"), ("GET", "/api/jobs"), ("GET", "/internal/folder_paths")]:
            r = await client.request(method, path)
            assert r.status == 401, (method, path)
            assert "token" in (await r.json())["error"]
        with pytest.raises(WSServerHandshakeError) as err:
            await client.ws_connect("/ws")
        assert err.value.status == 401
        r = await client.get("/queue", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401
        r = await client.post("/prompt", json={"prompt": image_prompt()}, headers={"Authorization": "Bearer s3cret"})
        assert r.status == 200
        # the browser path: ?token= once sets a cookie that later requests (and the socket) carry
        r = await client.get("/?token=s3cret")
        assert r.status == 200 and "easel_token" in r.cookies
        assert (await client.get("/api/queue")).status == 200
        ws = await client.ws_connect("/ws?clientId=t")
        assert (await ws.receive_json())["type"] == "status"
        await ws.close()


async def test_cross_origin_state_changes_are_refused(client: TestClient) -> None:
    port = client.port
    evil = {"Origin": "http://evil.example"}
    r = await client.post("/prompt", json={"prompt": image_prompt()}, headers=evil)
    assert r.status == 403 and "cross-origin" in (await r.json())["error"]
    assert (await client.post("/upload/image", data=b"x", headers=evil)).status == 403
    assert (await client.post("/interrupt", headers={"Origin": "null"})).status == 403
    assert (await client.post("/queue", json={"clear": True}, headers={"Sec-Fetch-Site": "cross-site"})).status == 403
    with pytest.raises(WSServerHandshakeError) as err:
        await client.ws_connect("/ws", headers=evil)
    assert err.value.status == 403
    # reading is allowed (the browser's same-origin policy keeps the answer from the page)
    assert (await client.get("/object_info", headers=evil)).status == 200
    # the page served by this server may post
    same = {"Origin": f"http://127.0.0.1:{port}"}
    assert (await client.post("/prompt", json={"prompt": image_prompt()}, headers=same)).status == 200
    # DNS rebinding: a foreign Host name on a loopback-only server is refused
    r = await client.get("/queue", headers={"Host": "attacker.example"})
    assert r.status == 403 and "Host" in (await r.json())["error"]
    assert (await client.get("/queue", headers={"Host": f"localhost:{port}"})).status == 200


async def test_bad_bodies_get_clear_400s_and_the_server_goes_on(client: TestClient) -> None:
    cases = [("/queue", b"[1, 2]", "JSON object"), ("/queue", b"{oops", "not valid JSON"),
             ("/history", b"", "empty"), ("/queue", b'{"delete": "abc"}', "list"),
             ("/settings", b"3", "JSON object"), ("/interrupt", b'{"prompt_id": 5}', "string")]
    for path, body, words in cases:
        r = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        assert r.status == 400, (path, body)
        assert words in (await r.json())["error"], (path, body)
    r = await client.get("/history?max_items=lots")
    assert r.status == 400
    assert (await client.post("/prompt", json={"prompt": image_prompt()})).status == 200


def test_safe_join_and_check_image(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert safe_join(tmp_path, "a", "b.png") == (tmp_path / "a" / "b.png").resolve()
    assert safe_join(tmp_path, "", "b.png") == (tmp_path / "b.png").resolve()
    for bad in ["../x", "a/../../x", "/abs", "C:/x", "a\\b", "x\x00y", "x\x07", "\ufffd", "%2e%2e%2fx",
                "\uff0e\uff0e", "a\uff0fb"]:
        with pytest.raises(UnsafePath):
            safe_join(tmp_path, bad)
    buf = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buf, format="PNG")
    assert check_image(buf.getvalue()) == ("PNG", (3, 2))
    for bad_bytes in [b"", b"GIF89a-not-really", buf.getvalue()[:30]]:
        with pytest.raises(ValueError):
            check_image(bad_bytes)
