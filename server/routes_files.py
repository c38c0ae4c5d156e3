"""File routes: /view, /upload/image, /upload/mask, /view_metadata (protocol.md 3.4).

Every path from a request goes through `security.safe_join`, so nothing is read or written outside
the output / input / temp folders (or the model folders for /view_metadata).
"""
from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from .security import UnsafePath, check_image, json_error, relative_parts, safe_join
from .settings import ServerState, state

routes = web.RouteTableDef()

FOLDER_TYPES = ("output", "input", "temp")
UNSAFE_TYPES = ("text/html", "text/javascript", "application/javascript", "text/css", "image/svg+xml",
                "application/xml", "text/xml", "application/xhtml+xml")


def type_folder(st: ServerState, kind: str) -> Path:
    folders = st.folders
    if kind == "output":
        return Path(folders.output_dir)
    if kind == "input":
        return Path(folders.input_dir)
    if kind == "temp":
        return Path(folders.temp_dir)
    raise web.HTTPBadRequest(text=json.dumps({"error": f"type must be one of {', '.join(FOLDER_TYPES)}, got {kind!r}"}),
                             content_type="application/json")


def split_annotation(name: str, default: str) -> tuple[str, str]:
    """`x.png [output]` -> ("x.png", "output")."""
    for kind in FOLDER_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, default


# -- /view ------------------------------------------------------------------------------------------
@routes.get("/view")
async def view(request: web.Request) -> web.StreamResponse:
    st = state(request)
    q = request.query
    raw_name = q.get("filename", "")
    if not raw_name:
        return json_error(400, "filename is required")
    filename, kind = split_annotation(raw_name, q.get("type", "output") or "output")
    if filename.startswith("/") or ".." in filename.split("/") or "/" in filename:
        return json_error(400, f"filename {filename!r} must be a plain file name (use subfolder for folders)")
    root = type_folder(st, kind)
    try:
        relative_parts(filename, "filename")
        path = safe_join(root, (q.get("subfolder", ""), "subfolder"), (filename, "filename"))
    except UnsafePath as exc:
        return json_error(403 if "outside" in str(exc) else 400, str(exc))
    if not path.is_file():
        return json_error(404, f"{kind}/{q.get('subfolder', '')}{'/' if q.get('subfolder') else ''}{filename} not found")
    preview = q.get("preview")
    channel = q.get("channel", "rgba")
    if preview or channel in ("rgb", "a"):
        return _reencoded(path, preview, channel)
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    disposition = f'filename="{_header_name(path.name)}"'
    if ctype in UNSAFE_TYPES:
        ctype, disposition = "application/octet-stream", "attachment; " + disposition
    return web.FileResponse(path, headers={"Content-Type": ctype, "Content-Disposition": disposition,
                                           "X-Content-Type-Options": "nosniff"})


def _header_name(name: str) -> str:
    return name.replace('"', "").replace("\r", "").replace("\n", "")


def _reencoded(path: Path, preview: str | None, channel: str) -> web.Response:
    from PIL import Image
    try:
        img: Image.Image = Image.open(path)
        img.load()
    except Exception:
        return json_error(400, f"{path.name} is not an image that can be re-encoded")
    if channel == "rgb":
        img = img.convert("RGB")
    elif channel == "a":
        alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
        img = Image.new("RGBA", img.size, (0, 0, 0, 0))
        img.putalpha(alpha)
    fmt, quality = "png", 90
    if preview:
        parts = preview.split(";")
        fmt = parts[0].lower() if parts[0].lower() in ("webp", "jpeg") else "webp"
        if len(parts) > 1 and parts[1].isdigit():
            quality = max(1, min(100, int(parts[1])))
    if channel == "a" or (fmt == "jpeg" and "A" in img.getbands()):
        fmt = "webp" if preview else "png"
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        img.save(buf, format="PNG")
    return web.Response(body=buf.getvalue(), content_type=f"image/{fmt}",
                        headers={"Content-Disposition": f'filename="{_header_name(path.stem)}.{fmt}"'})


# -- uploads ----------------------------------------------------------------------------------------
async def read_upload(request: web.Request, limit: int) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """The multipart form: text fields and the `image` file (name, bytes), with a size limit."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"expected a multipart/form-data body with an 'image' file: {exc}"}),
                                 content_type="application/json") from exc
    fields: dict[str, str] = {}
    image: tuple[str, bytes] | None = None
    total = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            continue
        chunks = []
        while True:
            chunk = await part.read_chunk(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
            chunks.append(chunk)
        data = b"".join(chunks)
        if part.name == "image" and part.filename is not None:
            image = (part.filename, data)
        elif part.name:
            fields[part.name] = data.decode("utf-8", "replace")
    return fields, image


def _target(st: ServerState, fields: dict[str, str], filename: str) -> tuple[Path, str, str, str]:
    kind = fields.get("type") or "input"
    root = type_folder(st, kind)
    subfolder = fields.get("subfolder", "")
    if not filename or "/" in filename:
        raise UnsafePath(f"upload file name {filename!r} must be a plain, non-empty file name")
    relative_parts(filename, "file name")
    if filename in (".", "..") or filename.startswith("."):
        raise UnsafePath(f"upload file name {filename!r} is not allowed")
    folder = safe_join(root, (subfolder, "subfolder"))
    return folder, filename, subfolder, kind


def _free_name(folder: Path, filename: str, data: bytes, overwrite: bool) -> tuple[str, bool]:
    """The name to write under (`name (1).ext` on a clash) and whether writing is needed."""
    if overwrite:
        return filename, True
    stem, ext = os.path.splitext(filename)
    name, i = filename, 1
    digest = hashlib.sha256(data).digest()
    while (folder / name).exists():
        existing = folder / name
        if existing.is_file() and not existing.is_symlink() and hashlib.sha256(existing.read_bytes()).digest() == digest:
            return name, False
        name = f"{stem} ({i}){ext}"
        i += 1
    return name, True


def _write_atomic(folder: Path, name: str, data: bytes) -> None:
    target = folder / name
    if target.is_symlink():
        raise UnsafePath(f"{name!r} is a symbolic link; refusing to write through it")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


async def _upload(request: web.Request, mask: bool) -> web.Response:
    st = state(request)
    fields, image = await read_upload(request, st.settings.max_upload_size)
    if image is None:
        return json_error(400, "no file in the 'image' field")
    filename, data = image
    folder, filename, subfolder, kind = _target(st, fields, filename)
    try:
        check_image(data)
    except ValueError as exc:
        return json_error(400, f"{filename}: {exc}")
    if mask:
        try:
            data = _apply_mask(st, fields.get("original_ref", ""), data)
        except ValueError as exc:
            return json_error(400, str(exc))
    name, write = _free_name(folder, filename, data, fields.get("overwrite", "").lower() in ("true", "1"))
    if write:
        _write_atomic(folder, name, data)
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


def _apply_mask(st: ServerState, original_ref: str, data: bytes) -> bytes:
    """The referenced original with the uploaded image's alpha as its alpha (text chunks kept)."""
    from PIL import Image, PngImagePlugin
    try:
        ref = json.loads(original_ref)
    except ValueError as exc:
        raise ValueError(f"original_ref must be a JSON object: {exc}") from exc
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise ValueError("original_ref must be a JSON object with a 'filename'")
    name, kind = split_annotation(ref["filename"], ref.get("type") or "input")
    relative_parts(name, "original_ref filename")
    path = safe_join(type_folder(st, kind), (ref.get("subfolder") or "", "original_ref subfolder"),
                     (name, "original_ref filename"))
    if not path.is_file():
        raise ValueError(f"original_ref {kind}/{name} not found")
    with Image.open(path) as original:
        info = PngImagePlugin.PngInfo()
        for key, value in (getattr(original, "text", None) or {}).items():
            info.add_text(key, value)
        out = original.convert("RGBA")
    with Image.open(io.BytesIO(data)) as uploaded:
        alpha = uploaded.convert("RGBA").getchannel("A")
    if alpha.size != out.size:
        alpha = alpha.resize(out.size)
    out.putalpha(alpha)
    buf = io.BytesIO()
    out.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    return await _upload(request, mask=False)


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    return await _upload(request, mask=True)


# -- /view_metadata -----------------------------------------------------------------------------------
@routes.get("/view_metadata/{folder}")
async def view_metadata(request: web.Request) -> web.Response:
    st = state(request)
    kind = request.match_info["folder"]
    filename = request.query.get("filename", "")
    if kind not in st.folders.kinds():
        return json_error(404, f"unknown model folder {kind!r}")
    if not filename.endswith(".safetensors"):
        return json_error(404, "only .safetensors files carry metadata")
    relative_parts(filename, "filename")
    try:
        path = st.folders.resolve(kind, filename)
    except FileNotFoundError as exc:
        return json_error(404, str(exc))
    meta = read_safetensors_metadata(path)
    if meta is None:
        return json_error(404, f"{filename} has no metadata")
    return web.json_response(meta)


def read_safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """The `__metadata__` dict of a safetensors header (8-byte little-endian length, JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            return None
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            return None
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None
