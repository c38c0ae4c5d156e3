"""The ComfyUI web frontend: `comfyui-frontend-package` (optional extra `easel[ui]`) served at `/`.

The wheel's `static/` folder is the web root (protocol.md 1): `GET /` answers its `index.html`
with no-cache headers, everything else is served as static files after the API routes, plugin
web folders at `/extensions/<name>/`.
"""
from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger("easel.server")

NO_CACHE = {"Cache-Control": "no-store, must-revalidate", "Pragma": "no-cache", "Expires": "0"}


def find_web_root(override: Path | None = None) -> Path | None:
    """The web root: `override` when given, else the installed frontend package's `static/`."""
    if override is not None:
        return override if (override / "index.html").is_file() else None
    try:
        import comfyui_frontend_package  # type: ignore[import-not-found]
    except ImportError:
        return None
    root = Path(str(importlib.resources.files(comfyui_frontend_package) / "static"))
    return root if (root / "index.html").is_file() else None


def frontend_version() -> str | None:
    try:
        import comfyui_frontend_package  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(getattr(comfyui_frontend_package, "__version__", "unknown"))


def add_frontend(app: web.Application, web_root: Path | None, plugin_web_dirs: dict[str, Path]) -> None:
    """Plugin web folders, then `/` and the web root (last, so API routes win)."""
    for name, folder in sorted(plugin_web_dirs.items()):
        if Path(folder).is_dir():
            app.router.add_static(f"/extensions/{name}", folder, follow_symlinks=False)
    if web_root is None:
        async def no_frontend(request: web.Request) -> web.Response:
            return web.Response(text="Easel is running. The web frontend is not installed: "
                                     "pip install 'easel[ui]' (comfyui-frontend-package).\n")
        app.router.add_get("/", no_frontend)
        return
    index = web_root / "index.html"

    async def root(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index, headers=NO_CACHE)

    app.router.add_get("/", root)
    app.router.add_static("/", web_root, follow_symlinks=False)
    log.info("serving the web frontend from %s", web_root)
