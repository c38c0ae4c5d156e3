"""Fixtures for the server tests: an Easel app on a real socket with the pure test registry."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import Settings

from .servernodes import make_registry


def make_settings(base: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"base_dir": base, "demo_files": False, "frontend": False, "plugins": False}
    values.update(overrides)
    return Settings(**values)


@pytest_asyncio.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    app = create_app(make_settings(tmp_path), registry=make_registry())
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def receive(ws: ClientWebSocketResponse, timeout: float = 10.0) -> tuple[str, Any]:
    """The next message: ("json", {...}) for text frames, ("binary", bytes) otherwise."""
    msg = await asyncio.wait_for(ws.receive(), timeout)
    if msg.type == WSMsgType.TEXT:
        return "json", json.loads(msg.data)
    if msg.type == WSMsgType.BINARY:
        return "binary", msg.data
    raise AssertionError(f"websocket closed or failed: {msg.type} {msg.data!r}")


async def follow(ws: ClientWebSocketResponse, prompt_id: str, timeout: float = 20.0) -> list[Any]:
    """Messages until `executing` with node None for `prompt_id` (inclusive)."""
    out: list[Any] = []
    while True:
        kind, data = await receive(ws, timeout)
        out.append(data if kind == "json" else ("binary", data))
        if kind == "json" and data["type"] == "executing" and data["data"].get("node") is None \
                and data["data"].get("prompt_id") == prompt_id:
            return out
