"""`/ws`: the websocket hub (protocol.md 4).

Every socket has a client id (`/ws?clientId=ID`, else a fresh uuid hex) and its own send queue
drained by one task, so messages reach each client in the order they were produced. The worker
thread hands messages over with `post_threadsafe` (a deque plus one `call_soon_threadsafe` per
burst); the event loop routes them:

- `sid` given: only that client; `sid` None: every client (status, execution_interrupted,
  progress of jobs without a client).
- binary previews (type 4 with metadata JSON for sockets that announced
  `supports_preview_metadata`, type 1 otherwise) go only to sockets that can take them: type 1 only
  to the job's own client when the job asked for previews itself (naive clients keep any binary
  frame as a result image).

Encodings: JSON text frames by default. A client asks for msgpack with `/ws?encoding=msgpack`, or
with `"encoding": "msgpack"` in its first `feature_flags` message (then the reply and everything
after it is msgpack). A msgpack message is a binary frame holding the map `{"type": T, "data": D}`;
its first byte is 0x82 (a two-entry map), while preview frames start with the 32-bit big-endian
event type (0x00 first), so the two never mix up.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

log = logging.getLogger("easel.server")

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
IMAGE_FORMATS = {"JPEG": 1, "PNG": 2}
MAX_CLIENT_BACKLOG = 20_000    # messages queued for one socket before it is dropped as stuck


def _plain(value: Any) -> Any:
    """msgpack/JSON fallback for values that are neither (sets, tuples inside dicts, objects)."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def encode_json(event: str, data: Any) -> str:
    return json.dumps({"type": event, "data": data}, default=_plain)


def encode_msgpack(event: str, data: Any) -> bytes:
    return msgpack.packb({"type": event, "data": data}, default=_plain, use_bin_type=True)


@dataclass(frozen=True)
class Preview:
    """One preview image for the job's client (or everyone that takes metadata previews)."""
    sid: str | None
    image: bytes
    image_format: str          # "JPEG" | "PNG"
    meta: dict[str, Any]       # node_id, prompt_id, display_node_id, parent_node_id, real_node_id
    requested: bool            # the job itself asked for previews (extra_data.preview_method)

    def frame(self, with_metadata: bool) -> bytes:
        if with_metadata:
            meta = dict(self.meta, image_type="image/jpeg" if self.image_format == "JPEG" else "image/png")
            blob = json.dumps(meta).encode()
            return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(blob)) + blob + self.image
        return struct.pack(">II", PREVIEW_IMAGE, IMAGE_FORMATS[self.image_format]) + self.image


@dataclass
class Client:
    sid: str
    ws: web.WebSocketResponse
    msgpack: bool = False
    flags: dict[str, Any] = field(default_factory=dict)
    queue: asyncio.Queue[str | bytes | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    @property
    def takes_metadata_previews(self) -> bool:
        return bool(self.flags.get("supports_preview_metadata"))

    def push(self, frame: str | bytes) -> bool:
        if self.queue.qsize() > MAX_CLIENT_BACKLOG:
            return False
        self.queue.put_nowait(frame)
        return True

    async def pump(self) -> None:
        while True:
            frame = await self.queue.get()
            if frame is None or self.ws.closed:
                return
            try:
                if isinstance(frame, str):
                    await self.ws.send_str(frame)
                else:
                    await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                return


class Hub:
    """The connected sockets and the routing of messages to them."""

    def __init__(self, server_flags: dict[str, Any], status: Callable[[], dict[str, Any]],
                 on_connect: Callable[[str], list[tuple[str, dict[str, Any]]]] | None = None) -> None:
        self.server_flags = server_flags
        self.status = status                   # -> {"exec_info": {"queue_remaining": N}}
        self.on_connect = on_connect           # sid -> messages to replay (the running node)
        self.clients: dict[str, Client] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[tuple[str, Any, str | None] | Preview] = deque()
        self._scheduled = False
        self._lock = threading.Lock()

    # -- sending ----------------------------------------------------------------------------------
    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """Loop thread only: one text message to `sid`, or to everyone when sid is None."""
        targets = [self.clients[sid]] if sid is not None and sid in self.clients else (
            list(self.clients.values()) if sid is None else [])
        if not targets:
            return
        text: str | None = None
        packed: bytes | None = None
        for client in targets:
            if client.msgpack:
                packed = packed if packed is not None else encode_msgpack(event, data)
                ok = client.push(packed)
            else:
                text = text if text is not None else encode_json(event, data)
                ok = client.push(text)
            if not ok:
                self._drop(client, "too many unsent messages")

    def send_preview(self, preview: Preview) -> None:
        if preview.sid is not None:
            client = self.clients.get(preview.sid)
            targets = [client] if client is not None else []
        else:
            targets = [c for c in self.clients.values() if c.takes_metadata_previews]
        for client in targets:
            if client.takes_metadata_previews:
                client.push(preview.frame(True))
            elif preview.requested:
                client.push(preview.frame(False))

    def send_status(self) -> None:
        self.send("status", {"status": self.status()})

    def wants_previews(self, sid: str | None, requested: bool) -> bool:
        """Whether a preview for a job of client `sid` would reach anyone (worker thread may ask)."""
        clients = list(self.clients.values())
        if sid is not None:
            return any(c.sid == sid and (c.takes_metadata_previews or requested) for c in clients)
        return any(c.takes_metadata_previews for c in clients)

    def post_threadsafe(self, item: tuple[str, Any, str | None] | Preview) -> None:
        """Any thread: queue a message `(event, data, sid)` or a `Preview` for the loop."""
        self._inbox.append(item)
        with self._lock:
            if self._scheduled or self.loop is None:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:      # the loop is closed: the server is going away
            pass

    def _drain(self) -> None:
        with self._lock:
            self._scheduled = False
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, Preview):
                self.send_preview(item)
            else:
                self.send(*item)

    def _drop(self, client: Client, why: str) -> None:
        log.warning("websocket %s dropped: %s", client.sid, why)
        if self.clients.get(client.sid) is client:
            del self.clients[client.sid]
        if client.task is not None:
            client.task.cancel()
        asyncio.ensure_future(client.ws.close())

    async def close_all(self) -> None:
        for client in list(self.clients.values()):
            client.queue.put_nowait(None)
            await client.ws.close()
        self.clients.clear()

    # -- the route --------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        client = Client(sid, ws, msgpack=request.query.get("encoding", "").lower() == "msgpack")
        old = self.clients.get(sid)
        if old is not None:   # a reconnecting tab replaces its previous socket
            old.queue.put_nowait(None)
            asyncio.ensure_future(old.ws.close())
        self.clients[sid] = client
        client.task = asyncio.create_task(client.pump())
        self.send("status", {"status": self.status(), "sid": sid}, sid)
        for event, data in (self.on_connect(sid) if self.on_connect else []):
            self.send(event, data, sid)
        first = True
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) and first:
                    first = False
                    self._first_message(client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if self.clients.get(sid) is client:
                del self.clients[sid]
            client.queue.put_nowait(None)
        return ws

    def _first_message(self, client: Client, raw: str | bytes) -> None:
        try:
            message = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return
        if not isinstance(message, dict) or message.get("type") != "feature_flags":
            return
        data = message.get("data")
        client.flags = dict(data) if isinstance(data, dict) else {}
        if str(client.flags.get("encoding", "")).lower() == "msgpack":
            client.msgpack = True
        self.send("feature_flags", self.server_flags, client.sid)
