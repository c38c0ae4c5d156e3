"""/view and the upload routes: path containment, size limits, image validation, clash naming, masks."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image, PngImagePlugin

from server.app import create_app
from server.settings import STATE

from .conftest import make_settings
from .servernodes import make_registry


def png(color: tuple[int, ...] = (1, 2, 3), mode: str = "RGB", size: tuple[int, int] = (4, 4),
        text: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    Image.new(mode, size, color).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def form(data: bytes, filename: str = "a.png", **fields: str) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    fd.add_field("image", data, filename=filename, content_type="image/png")
    for key, value in fields.items():
        fd.add_field(key, value)
    return fd


@pytest.fixture
def base(client: TestClient) -> Path:
    return client.app[STATE].settings.base_dir


async def test_view_serves_files_by_type_subfolder_and_annotation(client: TestClient, base: Path) -> None:
    (base / "output" / "sub").mkdir(parents=True, exist_ok=True)
    (base / "output" / "sub" / "o.png").write_bytes(png((9, 9, 9)))
    (base / "input" / "i.png").write_bytes(png((8, 8, 8)))
    r = await client.get("/view", params={"filename": "o.png", "subfolder": "sub", "type": "output"})
    assert r.status == 200 and 'filename="o.png"' in r.headers["Content-Disposition"]
    r = await client.get("/api/view", params={"filename": "i.png [input]"})
    assert r.status == 200 and Image.open(io.BytesIO(await r.read())).getpixel((0, 0)) == (8, 8, 8)
    r = await client.get("/view", params={"filename": "o.png", "subfolder": "sub", "preview": "webp;50", "rand": "0.3"})
    assert r.status == 200 and r.headers["Content-Type"] == "image/webp"
    r = await client.get("/view", params={"filename": "o.png", "subfolder": "sub", "channel": "rgb"})
    assert r.status == 200 and Image.open(io.BytesIO(await r.read())).mode == "RGB"
    assert (await client.get("/view", params={"filename": "none.png"})).status == 404
    assert (await client.get("/view", params={"filename": "o.png", "type": "secret"})).status == 400
    assert (await client.get("/view")).status == 400


async def test_view_refuses_every_way_out_of_its_folder(client: TestClient, base: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png())
    (base / "secret.txt").write_text("base secret")
    os.symlink(outside, base / "output" / "link_dir")
    os.symlink(outside / "secret.png", base / "output" / "link_file.png")
    attempts = [
        {"filename": "../secret.txt"},
        {"filename": "/etc/passwd"},
        {"filename": "secret.txt", "subfolder": ".."},
        {"filename": "secret.txt", "subfolder": "../"},
        {"filename": "passwd", "subfolder": "/etc"},
        {"filename": "secret.png", "subfolder": "link_dir"},
        {"filename": "link_file.png"},
        {"filename": "..\\secret.txt"},
        {"filename": "secret.txt", "subfolder": "\uff0e\uff0e"},        # fullwidth dots
        {"filename": "\uff0e\uff0e\uff0fsecret.txt"},
        {"filename": "secret.txt\x00.png"},
        {"filename": "secret.txt", "subfolder": "a/../../"},
    ]
    for params in attempts:
        r = await client.get("/view", params=params)
        body = await r.read()
        assert r.status in (400, 403), (params, r.status)
        assert b"base secret" not in body and body[:4] != b"\x89PNG", params
    # percent-encoded dots and slashes arrive decoded and are refused too
    r = await client.get("/view?filename=%2e%2e%2fsecret.txt&type=output")
    assert r.status in (400, 403)
    r = await client.get("/view?filename=secret.txt&subfolder=%2e%2e")
    assert r.status in (400, 403)


async def test_upload_image_names_clashes_and_refuses_escapes(client: TestClient, base: Path) -> None:
    r = await client.post("/upload/image", data=form(png((1, 1, 1))))
    assert r.status == 200 and await r.json() == {"name": "a.png", "subfolder": "", "type": "input"}
    r = await client.post("/upload/image", data=form(png((1, 1, 1))))       # same bytes: reused
    assert (await r.json())["name"] == "a.png"
    r = await client.post("/api/upload/image", data=form(png((2, 2, 2))))   # different: renamed
    assert (await r.json())["name"] == "a (1).png"
    r = await client.post("/upload/image", data=form(png((3, 3, 3)), overwrite="true"))
    assert (await r.json())["name"] == "a.png"
    assert Image.open(base / "input" / "a.png").getpixel((0, 0)) == (3, 3, 3)
    r = await client.post("/upload/image", data=form(png(), "b.png", subfolder="masks", type="temp"))
    assert await r.json() == {"name": "b.png", "subfolder": "masks", "type": "temp"}
    assert (base / "temp" / "masks" / "b.png").is_file()
    for filename, fields in [("../evil.png", {}), ("/tmp/evil.png", {}), ("evil.png", {"subfolder": "../.."}),
                             ("evil.png", {"subfolder": "/tmp"}), ("..", {}), ("ev\\il.png", {}),
                             ("evil.png", {"type": "models"})]:
        r = await client.post("/upload/image", data=form(png(), filename, **fields))
        assert r.status in (400, 403), (filename, fields, r.status)
    assert not (base.parent / "evil.png").exists() and not Path("/tmp/evil.png").exists()


async def test_upload_refuses_symlink_escape(client: TestClient, base: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside_up")
    os.symlink(outside, base / "input" / "out")
    r = await client.post("/upload/image", data=form(png(), "x.png", subfolder="out"))
    assert r.status == 403 or r.status == 400
    assert not (outside / "x.png").exists()
    os.symlink(outside / "target.png", base / "input" / "dangling.png")
    r = await client.post("/upload/image", data=form(png(), "dangling.png", overwrite="true"))
    assert r.status == 400 and not (outside / "target.png").exists()


async def test_upload_validates_images(client: TestClient) -> None:
    r = await client.post("/upload/image", data=form(b"<html>not an image</html>", "x.png"))
    assert r.status == 400 and "not an image" in (await r.json())["error"]
    r = await client.post("/upload/image", data=form(png()[:40], "cut.png"))
    assert r.status == 400
    fd = aiohttp.FormData()
    fd.add_field("other", "x")
    r = await client.post("/upload/image", data=fd)
    assert r.status == 400 and "image" in (await r.json())["error"]
    r = await client.post("/upload/image", data=b"plain body", headers={"Content-Type": "text/plain"})
    assert r.status == 400


async def test_oversize_uploads_and_bodies_get_413(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, max_upload_size=64 * 1024), registry=make_registry())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        big = png((5, 5, 5), size=(512, 512)) + b"\0" * (128 * 1024)
        r = await client.post("/upload/image", data=form(big, "big.png"))
        assert r.status == 413 and "too large" in (await r.json())["error"]
        assert not (tmp_path / "input" / "big.png").exists()

        async def chunks():   # no Content-Length: the streaming limit has to catch it
            for _ in range(40):
                yield b"x" * 4096
        r = await client.post("/prompt", data=chunks(), headers={"Content-Type": "application/json"})
        assert r.status == 413
        r = await client.post("/prompt", data=b"{" + b" " * (100 * 1024) + b"}",
                              headers={"Content-Type": "application/json"})
        assert r.status == 413
        assert (await client.post("/upload/image", data=form(png(), "ok.png"))).status == 200


async def test_mask_upload_replaces_alpha_and_keeps_text(client: TestClient, base: Path) -> None:
    (base / "input" / "orig.png").write_bytes(png((10, 20, 30), size=(4, 4), text={"prompt": "kept"}))
    mask = png((0, 0, 0, 77), mode="RGBA", size=(4, 4))
    r = await client.post("/upload/mask", data=form(mask, "orig_mask.png",
                                                    original_ref=json.dumps({"filename": "orig.png", "type": "input"})))
    assert r.status == 200, await r.text()
    name = (await r.json())["name"]
    out = Image.open(base / "input" / name)
    assert out.getpixel((1, 1)) == (10, 20, 30, 77) and out.text.get("prompt") == "kept"
    r = await client.post("/upload/mask", data=form(mask, "m.png", original_ref=json.dumps({"filename": "../x.png"})))
    assert r.status in (400, 403)


async def test_view_metadata_reads_the_safetensors_header(client: TestClient, base: Path) -> None:
    import struct
    folder = base / "models" / "loras"
    folder.mkdir(parents=True)
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}, "w": {"dtype": "F32", "shape": [1],
                                                                        "data_offsets": [0, 4]}}).encode()
    (folder / "l.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    r = await client.get("/view_metadata/loras", params={"filename": "l.safetensors"})
    assert r.status == 200 and await r.json() == {"ss_network_dim": "4"}
    assert (await client.get("/api/view_metadata/loras", params={"filename": "none.safetensors"})).status == 404
    assert (await client.get("/view_metadata/nope", params={"filename": "l.safetensors"})).status == 404
    r = await client.get("/view_metadata/loras", params={"filename": "../../user/x.safetensors"})
    assert r.status in (400, 403, 404)
