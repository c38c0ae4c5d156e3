"""What keeps the server safe to run on a workstation.

- `safe_join(root, *parts)`: a user-supplied relative path inside `root`, or `UnsafePath`:
  `..`, absolute paths, drive letters, backslashes, NUL and control characters, invalid UTF-8
  (U+FFFD after decoding), percent-encoded separators or dots, names that NFKC-normalise to
  something dangerous (fullwidth dots and slashes), and symlinks out of `root` are all refused.
- `token_middleware`: with `--token`, every route and the websocket need it, as
  `Authorization: Bearer T`, `?token=T` (the first page load; it then sets a SameSite=Strict
  cookie so the frontend's own requests carry it) or that cookie.
- `origin_middleware`: a browser request whose `Origin` names another host than `Host` is refused
  (403) for state-changing methods and the websocket, so a web page the user visits cannot queue
  prompts or upload files; with the server on loopback, a `Host` that is not a loopback name is
  refused too (DNS rebinding).
- `errors_middleware`: bodies too large -> 413, bad JSON -> 400, every refusal a JSON body with a
  clear message; an unexpected exception -> 500 with its text, and the server goes on.
- `read_json(request, kind)`: the JSON body, checked to be of the expected type.
- `check_image(data)`: Pillow must recognise an image of a known format and sane size.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

log = logging.getLogger("easel.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
MAX_IMAGE_PIXELS = 16384 * 16384
TOKEN_COOKIE = "easel_token"


class UnsafePath(ValueError):
    """A user-supplied path that would leave its folder, or a name we refuse to handle."""


def check_name_part(part: str, what: str) -> None:
    """One path component (or a whole relative path when '/' is allowed by the caller)."""
    if "\x00" in part or any(unicodedata.category(ch) == "Cc" for ch in part):
        raise UnsafePath(f"{what} {part!r} contains control characters")
    if "\ufffd" in part or any(0xD800 <= ord(ch) <= 0xDFFF for ch in part):
        raise UnsafePath(f"{what} {part!r} is not valid UTF-8")
    if "\\" in part:
        raise UnsafePath(f"{what} {part!r} contains a backslash")
    decoded = urllib.parse.unquote(part)
    if decoded != part and any(bad in decoded for bad in ("/", "\\", "..", "\x00")):
        raise UnsafePath(f"{what} {part!r} hides path characters in percent-encoding")
    normal = unicodedata.normalize("NFKC", part)
    if normal != part and ("/" in normal or "\\" in normal or ".." in normal or ":" in normal):
        raise UnsafePath(f"{what} {part!r} uses look-alike characters for path separators or dots")


def relative_parts(path: str, what: str, allow_empty: bool = False) -> list[str]:
    """Split a user-supplied relative path into components, refusing every escape."""
    if path is None or path == "":
        if allow_empty:
            return []
        raise UnsafePath(f"{what} is empty")
    check_name_part(path, what)
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UnsafePath(f"{what} {path!r} is an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(f"{what} {path!r} goes up with '..'")
    if not parts and not allow_empty:
        raise UnsafePath(f"{what} {path!r} names no file")
    return parts


def safe_join(root: Path, *paths: tuple[str, str] | str) -> Path:
    """`root / path...` where each path is `(text, what)` or text; never outside `root`, even via symlinks."""
    parts: list[str] = []
    for item in paths:
        text, what = item if isinstance(item, tuple) else (item, "path")
        parts.extend(relative_parts(text, what, allow_empty=True))
    base = root.resolve()
    target = base.joinpath(*parts)
    resolved = target.resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise UnsafePath(f"{'/'.join(parts)!r} leads outside its folder")
    return resolved


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def read_json(request: web.Request, kind: type | tuple[type, ...] = dict, empty: Any = None) -> Any:
    """The request's JSON body of type `kind`; `empty` for an empty body (None: refuse it)."""
    raw = await request.read()
    if not raw.strip():
        if empty is not None:
            return empty
        raise web.HTTPBadRequest(text=json.dumps({"error": "the request body is empty; a JSON value was expected"}),
                                 content_type="application/json")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the request body is not valid JSON: {exc}"}),
                                 content_type="application/json") from exc
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        expected = {"dict": "a JSON object", "list": "a JSON array"}.get(names, names)
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the request body must be {expected}, "
                                                           f"got {type(value).__name__}"}),
                                 content_type="application/json")
    return value


def check_image(data: bytes) -> tuple[str, tuple[int, int]]:
    """(format, size) of an image file's bytes; ValueError naming what is wrong."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise ValueError("the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format or "", img.size
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise ValueError(f"the image is {size[0]}x{size[1]} pixels, more than {MAX_IMAGE_PIXELS} allowed")
            img.verify()
    except UnidentifiedImageError as exc:
        raise ValueError("the uploaded file is not an image Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the image is too large: {exc}") from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"the uploaded image is damaged: {exc}") from exc
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt or 'unknown'} is not accepted (accepted: {', '.join(IMAGE_FORMATS)})")
    return fmt, size


# -- middlewares --------------------------------------------------------------------------------
def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def origin_middleware(loopback_only: bool, cors_origin: str | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if cors_origin:
            if request.method == "OPTIONS":
                response: web.StreamResponse = web.Response()
            else:
                response = await handler(request)
            response.headers["Access-Control-Allow-Origin"] = cors_origin
            response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS, PATCH"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
            response.headers["Access-Control-Allow-Credentials"] = "true"
            return response
        host = request.headers.get("Host", "")
        if loopback_only and host and _host_name(host) not in LOOPBACK_NAMES:
            return json_error(403, f"Host {host!r} is not this server's loopback address "
                                   "(start the server with --listen to serve other names)")
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if request.method not in SAFE_METHODS or is_ws:
            origin = request.headers.get("Origin")
            if origin is not None:
                parsed = urlsplit(origin)
                if origin == "null" or not parsed.netloc or parsed.netloc.lower() != host.lower():
                    return json_error(403, f"cross-origin request refused: Origin {origin!r} is not this "
                                           f"server ({host!r})")
            elif request.headers.get("Sec-Fetch-Site", "") == "cross-site":
                return json_error(403, "cross-site request refused")
        return await handler(request)

    return middleware


def token_middleware(token: str | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token:
            return await handler(request)
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        from_query = request.query.get("token", "")
        given = given or from_query or request.cookies.get(TOKEN_COOKIE, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return json_error(401, "this server requires a token: send 'Authorization: Bearer <token>' "
                                   "or open /?token=<token> once")
        response = await handler(request)
        if from_query and not getattr(response, "prepared", False):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    return middleware


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(413, f"the request body is too large ({exc.text})")
    except web.HTTPException:
        raise
    except UnsafePath as exc:
        return json_error(400, str(exc))
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, f"internal error: {type(exc).__name__}: {exc}")
