"""Catalogue and frontend-support routes: object_info, models, features, users, settings, userdata."""
from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient

from server.settings import STATE


async def test_object_info_all_and_one(client: TestClient) -> None:
    info = await (await client.get("/api/object_info")).json()
    assert {"PrimitiveInt", "SolidImage", "SlowCount"} <= set(info)
    solid = info["SolidImage"]
    assert solid["name"] == "SolidImage" and solid["output_node"] is True
    assert solid["input_order"]["required"] == ["value", "filename_prefix"]
    assert solid["input"]["required"]["value"] == ["INT", {"default": 0, "min": 0, "max": 255}]
    one = await (await client.get("/object_info/SlowCount")).json()
    assert list(one) == ["SlowCount"] and one["SlowCount"]["output"] == ["INT"]
    assert await (await client.get("/object_info/Nope")).json() == {}


async def test_models_embeddings_and_folder_paths(client: TestClient) -> None:
    base: Path = client.app[STATE].settings.base_dir
    (base / "models" / "embeddings" / "sub").mkdir(parents=True)
    (base / "models" / "embeddings" / "sub" / "easyneg.safetensors").write_bytes(b"x")
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "loras" / "a.safetensors").write_bytes(b"x")
    assert await (await client.get("/embeddings")).json() == ["sub/easyneg"]
    kinds = await (await client.get("/models")).json()
    assert "checkpoints" in kinds and "loras" in kinds
    assert await (await client.get("/api/models/loras")).json() == ["a.safetensors"]
    assert (await client.get("/models/nope")).status == 404
    listed = await (await client.get("/api/experiment/models/loras")).json()
    assert listed[0]["name"] == "a.safetensors" and listed[0]["pathIndex"] == 0 and listed[0]["size"] == 1
    paths = await (await client.get("/internal/folder_paths")).json()
    assert paths["loras"][0] == str(base / "models" / "loras")
    assert (await client.get("/api/internal/folder_paths")).status == 404      # no /api twin for /internal


async def test_system_stats_features_extensions_and_empty_answers(client: TestClient) -> None:
    stats = await (await client.get("/system_stats")).json()
    assert stats["system"]["ram_total"] > 0 and stats["devices"][-1]["type"] == "cpu"
    assert isinstance(stats["system"]["comfyui_version"], str)
    flags = await (await client.get("/api/features")).json()
    assert flags["supports_preview_metadata"] is True and flags["max_upload_size"] == 100 * 2**20
    assert await (await client.get("/api/extensions")).json() == []
    assert await (await client.get("/api/i18n")).json() == {}
    assert await (await client.get("/api/global_subgraphs")).json() == {}
    r = await client.get("/templates/index.json")
    assert r.status == 200 and r.content_type == "application/json" and await r.json() == []


async def test_users_settings_and_userdata(client: TestClient) -> None:
    assert await (await client.get("/api/users")).json() == {"storage": "server", "migrated": True}
    assert await (await client.get("/api/settings")).json() == {}
    assert (await client.post("/api/settings/Comfy.TutorialCompleted", json=True)).status == 200
    assert (await client.post("/api/settings", json={"Comfy.Locale": "en"})).status == 200
    assert await (await client.get("/api/settings")).json() == {"Comfy.TutorialCompleted": True, "Comfy.Locale": "en"}
    assert await (await client.get("/api/settings/Comfy.Locale")).json() == "en"

    assert (await client.get("/api/userdata?dir=workflows")).status == 404
    r = await client.post("/api/userdata/workflows%2Fa.json?overwrite=false&full_info=true", data=b'{"nodes": []}')
    info = await r.json()
    assert r.status == 200 and info["path"] == "workflows/a.json" and info["size"] == 13
    r = await client.post("/api/userdata/workflows%2Fa.json?overwrite=false", data=b"{}")
    assert r.status == 409
    assert await (await client.get("/api/userdata/workflows%2Fa.json")).read() == b'{"nodes": []}'
    listing = await (await client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")).json()
    assert [item["path"] for item in listing] == ["a.json"]
    r = await client.post("/api/userdata/workflows%2Fa.json/move/workflows%2Fb.json")
    assert r.status == 200 and await r.json() == "workflows/b.json"
    assert (await client.delete("/api/userdata/workflows%2Fb.json")).status == 204
    assert (await client.get("/api/userdata/workflows%2Fb.json")).status == 404
    for bad in ["..%2F..%2Fescape.json", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2Fx.json"]:
        r = await client.post(f"/api/userdata/{bad}", data=b"x")
        assert r.status in (400, 403, 404), bad
    base: Path = client.app[STATE].settings.base_dir
    assert not (base / "escape.json").exists() and not (base / "user" / "x.json").exists()
