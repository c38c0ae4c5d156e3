"""`server.PromptServer` for ComfyUI plugins (`from server import PromptServer`).

Plugins use the singleton `PromptServer.instance`:
- `send_sync(event, data, sid=None)` / `await send(...)`: a websocket message of their own type.
  While Easel's server runs, it has called `PromptServer.instance.attach(sink)` and messages go to
  `sink(event, data, sid)` (thread-safe on the server's side); otherwise (CLI runs, tests) they go to
  the running node's event stream, `graph.runtime.current().emit(event, data)`.
- `routes`: an aiohttp `RouteTableDef` that plugins decorate at import time; the server adds them
  to its app (with the `/api` twin) through `take_routes()`.
- `client_id`, `last_node_id`, `last_prompt_id`, `supports`, `app`, `add_on_prompt_handler(fn)`,
  `trigger_on_prompt(json_data)`, `send_progress_text(text, node_id, sid=None)`.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from aiohttp import web

from graph.runtime import current

log = logging.getLogger("easel.plugins")

EventSink = Callable[[str, Any, "str | None"], None]
OnPromptHandler = Callable[[dict[str, Any]], dict[str, Any]]


class PromptServer:
    instance: ClassVar[PromptServer]

    def __init__(self) -> None:
        self.routes = web.RouteTableDef()
        self.app: web.Application | None = None
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.supports = ["custom_nodes_from_web"]
        self.on_prompt_handlers: list[OnPromptHandler] = []
        self._sink: EventSink | None = None
        self._lock = threading.Lock()

    # -- the running server plugs itself in ----------------------------------------------------

    def attach(self, sink: EventSink, app: web.Application | None = None) -> None:
        """Called by Easel's server at start-up: where plugin messages go from now on."""
        with self._lock:
            self._sink = sink
            self.app = app

    def detach(self) -> None:
        with self._lock:
            self._sink = None
            self.app = None

    def take_routes(self) -> list[web.AbstractRouteDef]:
        """The routes plugins declared so far (the server adds them to its app once)."""
        return list(self.routes)

    # -- what plugins call ---------------------------------------------------------------------

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        with self._lock:
            sink = self._sink
        if sink is not None:
            sink(event, data, sid)
        else:
            current().emit(event, data if isinstance(data, dict) else {"data": data})

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        self.send_sync("progress_text", {"text": text, "node_id": node_id}, sid)

    def add_on_prompt_handler(self, handler: OnPromptHandler) -> None:
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data: dict[str, Any]) -> dict[str, Any]:
        """Run the plugins' on-prompt handlers over a `/prompt` body (a failing one is logged)."""
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:
                log.exception("on_prompt handler %r failed", handler)
        return json_data


PromptServer.instance = PromptServer()
