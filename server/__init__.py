"""Easel's server package: the ComfyUI-compatible HTTP + websocket API (app.py), the CLI (cli.py).

`from server import PromptServer` is what ComfyUI plugins write; it resolves to the shim in
prompt_server_compat.py.
"""
from __future__ import annotations

try:
    from .prompt_server_compat import PromptServer
except ImportError:  # the shim is optional for the server itself
    PromptServer = None  # type: ignore[assignment,misc]

__all__ = ["PromptServer"]
