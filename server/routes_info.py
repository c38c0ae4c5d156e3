"""Catalogue and frontend-support routes (protocol.md 3.5-3.8): node definitions, models, system
stats, feature flags, extensions, users, settings, user files and the `/internal` helpers.

Routes the frontend reads but Easel has nothing for answer with valid empty JSON (`{}` / `[]`),
because the frontend parses most replies without checking the status.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from aiohttp import web

from nodes.folders import use_folders

from .security import UnsafePath, json_error, read_json, safe_join
from .settings import ServerState, state

routes = web.RouteTableDef()           # also served under /api
internal_routes = web.RouteTableDef()  # /internal/..., no /api twin
EASEL_VERSION = "0.1.0"
COMFYUI_VERSION = "0.38.1"             # the protocol version Easel speaks (protocol.md sources)
DEFAULT_USER = "default"


# -- nodes -------------------------------------------------------------------------------------------
@routes.get("/object_info")
async def object_info(request: web.Request) -> web.Response:
    st = state(request)
    with use_folders(st.folders):
        return web.json_response(st.registry.definitions())


@routes.get("/object_info/{node_class}")
async def object_info_one(request: web.Request) -> web.Response:
    st = state(request)
    name = request.match_info["node_class"]
    if name not in st.registry:
        return web.json_response({})
    with use_folders(st.folders):
        return web.json_response({name: st.registry.definition(name)})


# -- models ------------------------------------------------------------------------------------------
@routes.get("/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    names = state(request).folders.list_files("embeddings")
    return web.json_response([os.path.splitext(n)[0] for n in names])


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    return web.json_response(state(request).folders.kinds())


@routes.get("/models/{folder}")
async def models_in(request: web.Request) -> web.Response:
    st = state(request)
    kind = request.match_info["folder"]
    if kind not in st.folders.kinds():
        return json_error(404, f"unknown model folder {kind!r}")
    return web.json_response(st.folders.list_files(kind))


@routes.get("/experiment/models")
async def experiment_models(request: web.Request) -> web.Response:
    st = state(request)
    return web.json_response([{"name": kind, "folders": [str(p) for p in st.folders.dirs(kind)]}
                              for kind in st.folders.kinds()])


@routes.get("/experiment/models/{folder}")
async def experiment_models_in(request: web.Request) -> web.Response:
    st = state(request)
    kind = request.match_info["folder"]
    if kind not in st.folders.kinds():
        return json_error(404, f"unknown model folder {kind!r}")
    out = []
    for name in st.folders.list_files(kind):
        for index, root in enumerate(st.folders.dirs(kind)):
            path = root / name
            if path.is_file():
                info = path.stat()
                out.append({"name": name, "pathIndex": index, "modified": info.st_mtime,
                            "created": info.st_ctime, "size": info.st_size})
                break
    return web.json_response(out)


# -- system ------------------------------------------------------------------------------------------
def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _devices() -> list[dict[str, Any]]:
    """Torch devices when the model layer has loaded torch (the server never imports it itself)."""
    torch = sys.modules.get("torch")
    out: list[dict[str, Any]] = []
    if torch is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            out.append({"name": f"cuda:{index} {torch.cuda.get_device_name(index)}", "type": "cuda", "index": index,
                        "vram_total": total, "vram_free": free, "torch_vram_total": torch.cuda.memory_reserved(index),
                        "torch_vram_free": torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)})
    total, free = _memory()
    out.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
                "torch_vram_total": 0, "torch_vram_free": 0})
    return out


@routes.get("/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    total, free = _memory()
    torch = sys.modules.get("torch")
    return web.json_response({
        "system": {"os": sys.platform, "ram_total": total, "ram_free": free,
                   "comfyui_version": COMFYUI_VERSION, "easel_version": EASEL_VERSION,
                   "required_frontend_version": "1.58.1", "installed_templates_version": "",
                   "required_templates_version": "", "python_version": sys.version,
                   "pytorch_version": getattr(torch, "__version__", "") if torch else "",
                   "embedded_python": False, "argv": sys.argv, "comfy_package_versions": [],
                   "deploy_environment": "local", "platform": platform.platform()},
        "devices": _devices()})


@routes.get("/features")
async def features(request: web.Request) -> web.Response:
    return web.json_response(state(request).server_flags)


@routes.get("/extensions")
async def extensions(request: web.Request) -> web.Response:
    st = state(request)
    out: list[str] = []
    if st.web_root is not None and (st.web_root / "extensions").is_dir():
        for path in sorted((st.web_root / "extensions").rglob("*.js")):
            out.append("/" + path.relative_to(st.web_root).as_posix())
    for name, folder in sorted(getattr(st.registry, "web_dirs", {}).items()):
        for path in sorted(Path(folder).rglob("*.js")):
            out.append(f"/extensions/{urllib.parse.quote(name)}/{path.relative_to(folder).as_posix()}")
    return web.json_response(out)


@routes.get("/i18n")
async def i18n(request: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/workflow_templates")
async def workflow_templates(request: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/global_subgraphs")
async def global_subgraphs(request: web.Request) -> web.Response:
    return web.json_response({})


# -- users and settings (single user) -----------------------------------------------------------------
def user_root(st: ServerState) -> Path:
    root = st.settings.user_dir / DEFAULT_USER
    root.mkdir(parents=True, exist_ok=True)
    return root


@routes.get("/users")
async def users(request: web.Request) -> web.Response:
    return web.json_response({"storage": "server", "migrated": True})


@routes.post("/users")
async def add_user(request: web.Request) -> web.Response:
    return json_error(400, "Easel runs in single-user mode; users cannot be added")


def _settings_path(st: ServerState) -> Path:
    return user_root(st) / "comfy.settings.json"


def _read_settings(st: ServerState) -> dict[str, Any]:
    path = _settings_path(st)
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_settings(st: ServerState, values: dict[str, Any]) -> None:
    path = _settings_path(st)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=1), "utf-8")
    os.replace(tmp, path)


@routes.get("/settings")
async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(_read_settings(state(request)))


@routes.get("/settings/{id}")
async def get_setting(request: web.Request) -> web.Response:
    return web.json_response(_read_settings(state(request)).get(request.match_info["id"]))


@routes.post("/settings")
async def post_settings(request: web.Request) -> web.Response:
    st = state(request)
    values = _read_settings(st)
    values.update(await read_json(request, dict))
    _write_settings(st, values)
    return web.Response(status=200)


@routes.post("/settings/{id}")
async def post_setting(request: web.Request) -> web.Response:
    st = state(request)
    values = _read_settings(st)
    values[request.match_info["id"]] = await read_json(request, (dict, list, str, int, float, bool, type(None)), empty="")
    _write_settings(st, values)
    return web.Response(status=200)


# -- user files ----------------------------------------------------------------------------------------
def _user_path(st: ServerState, relative: str) -> Path:
    try:
        return safe_join(user_root(st), (relative, "user file"))
    except UnsafePath as exc:
        raise web.HTTPForbidden(text=json.dumps({"error": str(exc)}), content_type="application/json") from exc


def _file_info(path: Path, relative: str) -> dict[str, Any]:
    info = path.stat()
    return {"path": relative, "size": info.st_size, "modified": info.st_mtime, "created": info.st_ctime}


@routes.get("/userdata")
async def list_userdata(request: web.Request) -> web.Response:
    st = state(request)
    directory = request.query.get("dir")
    if not directory:
        return json_error(400, "dir is required")
    root = _user_path(st, directory)
    if not root.is_dir():
        return json_error(404, f"{directory} does not exist")
    recurse = request.query.get("recurse", "").lower() == "true"
    split = request.query.get("split", "").lower() == "true"
    full = request.query.get("full_info", "").lower() == "true"
    paths = sorted(p for p in (root.rglob("*") if recurse else root.iterdir()) if p.is_file())
    out: list[Any] = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if full:
            out.append(_file_info(path, rel))
        elif split:
            out.append([rel, *rel.split("/")])
        else:
            out.append(rel)
    return web.json_response(out)


@routes.get("/v2/userdata")
async def list_userdata_v2(request: web.Request) -> web.Response:
    st = state(request)
    rel = request.query.get("path", "")
    root = _user_path(st, rel) if rel else user_root(st)
    if not root.is_dir():
        return json_error(404, f"{rel} does not exist")
    out = []
    for path in sorted(root.iterdir()):
        item: dict[str, Any] = {"name": path.name, "path": path.relative_to(user_root(st)).as_posix(),
                                "type": "directory" if path.is_dir() else "file"}
        if path.is_file():
            item.update(size=path.stat().st_size, modified=path.stat().st_mtime)
        out.append(item)
    return web.json_response(out)


@routes.get("/userdata/{file}")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _user_path(state(request), request.match_info["file"])
    if not path.is_file():
        return json_error(404, "not found")
    return web.FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})


@routes.post("/userdata/{file}")
async def post_userdata(request: web.Request) -> web.Response:
    st = state(request)
    rel = request.match_info["file"]
    path = _user_path(st, rel)
    if request.query.get("overwrite", "true").lower() == "false" and path.exists():
        return json_error(409, f"{rel} already exists")
    data = await request.read()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    rel_out = path.relative_to(user_root(st)).as_posix()
    if request.query.get("full_info", "").lower() == "true":
        return web.json_response(_file_info(path, rel_out))
    return web.json_response(rel_out)


@routes.delete("/userdata/{file}")
async def delete_userdata(request: web.Request) -> web.Response:
    path = _user_path(state(request), request.match_info["file"])
    if not path.is_file():
        return json_error(404, "not found")
    path.unlink()
    return web.Response(status=204)


@routes.post("/userdata/{file}/move/{dest}")
async def move_userdata(request: web.Request) -> web.Response:
    st = state(request)
    source = _user_path(st, request.match_info["file"])
    dest = _user_path(st, request.match_info["dest"])
    if not source.is_file():
        return json_error(404, "not found")
    if request.query.get("overwrite", "true").lower() == "false" and dest.exists():
        return json_error(409, "destination exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, dest)
    rel = dest.relative_to(user_root(st)).as_posix()
    if request.query.get("full_info", "").lower() == "true":
        return web.json_response(_file_info(dest, rel))
    return web.json_response(rel)


# -- /internal ---------------------------------------------------------------------------------------
@internal_routes.get("/logs")
async def logs(request: web.Request) -> web.Response:
    return web.json_response("")


@internal_routes.get("/logs/raw")
async def logs_raw(request: web.Request) -> web.Response:
    return web.json_response({"entries": [], "size": {"cols": 80, "rows": 24}})


@internal_routes.patch("/logs/subscribe")
async def logs_subscribe(request: web.Request) -> web.Response:
    return web.Response(status=200)


@internal_routes.get("/folder_paths")
async def folder_paths(request: web.Request) -> web.Response:
    st = state(request)
    return web.json_response({kind: [str(p) for p in st.folders.dirs(kind)] for kind in st.folders.kinds()})


@internal_routes.get("/files/{directory_type}")
async def internal_files(request: web.Request) -> web.Response:
    st = state(request)
    kind = request.match_info["directory_type"]
    roots = {"output": st.folders.output_dir, "input": st.folders.input_dir, "temp": st.folders.temp_dir}
    if kind not in roots:
        return json_error(400, f"unknown directory type {kind!r}")
    root = Path(roots[kind])
    files = [p for p in root.iterdir() if p.is_file()] if root.is_dir() else []
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return web.json_response([p.name for p in files])


def templates_index(request: web.Request) -> web.Response:
    """`/templates/index.json`: no templates package, so an empty list (as JSON, the FE checks)."""
    return web.json_response([])

