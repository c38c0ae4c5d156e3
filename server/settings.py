"""What one server instance is configured with: where it lives, what it binds, its limits.

`Settings.from_args` reads the `easel serve` namespace (server/cli.py); options the CLI does not
declare yet are read with defaults, so the server can grow options before the CLI does.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

DEFAULT_MAX_UPLOAD = 100 * 2**20       # bytes; ComfyUI's --max-upload-size default (100 MB)
DEFAULT_MAX_HISTORY = 10_000            # ComfyUI keeps at most this many history entries
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Settings:
    base_dir: Path
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None                   # required on every route and the websocket when set
    max_upload_size: int = DEFAULT_MAX_UPLOAD  # bytes, for every request body
    max_history: int = DEFAULT_MAX_HISTORY
    preview_method: str = "none"               # server default; a job may ask with extra_data.preview_method
    demo_files: bool = True                    # create demo model files a prompt names (nodes.environment)
    frontend: bool = True                      # serve comfyui-frontend-package at / when installed
    frontend_root: Path | None = None          # --front-end-root: a web root folder instead of the package
    enable_cors_header: str | None = None      # ComfyUI's --enable-cors-header: permissive CORS for ORIGIN
    extra_model_paths: tuple[Path, ...] = ()   # extra_model_paths.yaml-style configs
    plugins: bool = True                       # load custom_nodes/ under the base directory
    cpu: bool = False
    lowvram: bool = False
    feature_flags: dict[str, Any] = field(default_factory=dict)   # extra server flags (--feature-flag k=v)

    @property
    def db_path(self) -> Path:
        return self.base_dir / "user" / "easel_queue.sqlite3"

    @property
    def user_dir(self) -> Path:
        return self.base_dir / "user"

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        listen = getattr(args, "listen", False)
        host = getattr(args, "host", "127.0.0.1") or "127.0.0.1"
        if listen is True:
            host = "0.0.0.0"
        elif isinstance(listen, str) and listen:   # `--listen ADDR` form, if the CLI grows it
            host = listen
        flags: dict[str, Any] = {}
        for item in getattr(args, "feature_flag", None) or []:
            key, _, value = str(item).partition("=")
            flags[key] = {"true": True, "false": False}.get(value.lower(), value)
        upload_mb = getattr(args, "max_upload_size", None)
        root = getattr(args, "front_end_root", None)
        return cls(
            base_dir=Path(getattr(args, "base_dir", ".") or ".").resolve(),
            host=host,
            port=int(getattr(args, "port", 8188)),
            token=getattr(args, "token", None) or None,
            max_upload_size=int(float(upload_mb) * 2**20) if upload_mb else DEFAULT_MAX_UPLOAD,
            preview_method=getattr(args, "preview_method", None) or "none",
            frontend_root=Path(root) if root else None,
            enable_cors_header=getattr(args, "enable_cors_header", None),
            extra_model_paths=tuple(Path(p) for p in getattr(args, "extra_model_paths_config", None) or ()),
            cpu=bool(getattr(args, "cpu", False)),
            lowvram=bool(getattr(args, "lowvram", False)),
            feature_flags=flags,
        )


@dataclass
class ServerState:
    """Everything the route handlers share, kept on the app as `app[STATE]`."""
    settings: Settings
    registry: Any            # nodes.registry.Registry
    folders: Any             # nodes.folders.ModelFolders
    executor: Any            # graph.executor.Executor (run by the worker thread only)
    queue: Any               # server.queue_store.JobQueue
    history: Any             # server.queue_store.HistoryBook
    store: Any               # server.queue_store.QueueStore
    batcher: Any             # server.queue_store.AcceptBatcher
    hub: Any                 # server.websocket.Hub
    worker: Any              # server.worker.Worker
    server_flags: dict[str, Any]
    compat: Any = None       # PromptServer.instance
    web_root: Path | None = None
    spec_table: tuple[float, Any] | None = None   # (monotonic time, graph.nodespec.SpecTable) for validation


STATE = web.AppKey("easel_state", ServerState)


def state(request: web.Request) -> ServerState:
    return request.app[STATE]
