"""Detect and read a workflow file: API JSON, UI JSON, or an image that carries one in its metadata.

A PNG written by ComfyUI or Easel holds `tEXt` chunks `prompt` (the API prompt that ran) and
`workflow` (the UI workflow); an AUTOMATIC1111 PNG holds `parameters` (plain text, read by
`server.a1111_import`). PNG chunks are parsed here with the standard library (graph/ stays free of
torch and imaging code): 8-byte signature, then chunks `length:u32be | type:4 | data | crc:u32`.
`tEXt` = keyword NUL latin-1 text; `zTXt` = keyword NUL method zlib-data; `iTXt` = keyword NUL
compressed-flag method language NUL translated-keyword NUL utf-8 text (zlib when flagged).

JPEG and WebP files carry the same in EXIF: ComfyUI writes strings `prompt:{json}` and
`workflow:{json}` into IFD0 entries, A1111 writes `parameters` as the Exif UserComment (0x9286).

Every problem raises `WorkflowFileError` naming the file and what was wrong with it.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from graph.ui_format import UIWorkflowError, is_ui_workflow, ui_to_api

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
WorkflowKind = Literal["api", "ui", "a1111"]


class WorkflowFileError(ValueError):
    """A workflow file that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class WorkflowSource:
    """What a workflow file holds. `kind` says which of prompt / ui / parameters is the one to run."""

    path: Path
    container: Literal["json", "png", "exif"]       # exif: a JPEG or WebP
    prompt: dict[str, Any] | None = None          # API prompt (JSON file or PNG `prompt` chunk)
    ui: dict[str, Any] | None = None              # UI workflow (JSON file or PNG `workflow` chunk)
    parameters: str | None = None                 # A1111 `parameters` text
    text_chunks: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> WorkflowKind:
        if self.prompt is not None:
            return "api"
        if self.ui is not None:
            return "ui"
        return "a1111"

    @property
    def extra_pnginfo(self) -> dict[str, Any]:
        """What to pass on as `extra_data.extra_pnginfo` so a re-saved image keeps the UI graph."""
        return {"workflow": self.ui} if self.ui is not None else {}

    def api_prompt(self, definitions: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The API prompt to run: the stored one, else the UI workflow converted with `definitions`.

        An A1111 file has no graph of its own: build it with `server.a1111_import`.
        """
        if self.prompt is not None:
            return self.prompt
        if self.ui is not None:
            try:
                return ui_to_api(self.ui, definitions)
            except UIWorkflowError as err:
                raise WorkflowFileError(f"{self.path}: {err}") from err
        raise WorkflowFileError(f"{self.path} holds AUTOMATIC1111 parameters, not a node graph; "
                                "convert it with server.a1111_import.a1111_to_api")


# ---------------------------------------------------------------------------------------------
# PNG text chunks


def read_png_text(data: bytes, name: str = "<png>") -> dict[str, str]:
    """All text chunks (tEXt, zTXt, iTXt) of a PNG file, keyword -> text (first wins)."""
    if not data.startswith(PNG_SIGNATURE):
        raise WorkflowFileError(f"{name} is not a PNG file (bad signature)")
    out: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise WorkflowFileError(f"{name}: PNG is truncated (chunk header at byte {pos})")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise WorkflowFileError(f"{name}: PNG is truncated inside chunk {ctype.decode('latin-1')!r} "
                                    f"at byte {pos}")
        pos += 12 + length
        try:
            if ctype == b"tEXt":
                key, _, text = body.partition(b"\0")
                out.setdefault(key.decode("latin-1"), text.decode("latin-1"))
            elif ctype == b"zTXt":
                key, _, rest = body.partition(b"\0")
                out.setdefault(key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1"))
            elif ctype == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, _method = rest[0], rest[1]
                _lang, _, rest = rest[2:].partition(b"\0")
                _tkey, _, text = rest.partition(b"\0")
                if compressed:
                    text = zlib.decompress(text)
                out.setdefault(key.decode("latin-1"), text.decode("utf-8"))
            elif ctype == b"IEND":
                break
        except (zlib.error, UnicodeDecodeError, IndexError) as err:
            raise WorkflowFileError(f"{name}: text chunk {ctype.decode('latin-1')} cannot be read: {err}") from err
    return out


# ---------------------------------------------------------------------------------------------
# JSON


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (the file looks truncated)" if err.pos >= len(text.rstrip()) else ""
        raise WorkflowFileError(f"{where} is not valid JSON: {err.msg} at line {err.lineno} "
                                f"column {err.colno}{hint}") from None


def looks_like_api_prompt(data: object) -> bool:
    """A non-empty object whose every value is an object with a string `class_type`."""
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and isinstance(v.get("class_type"), str) for v in data.values()))


def classify_json(data: object, where: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(api prompt, ui workflow) of a parsed JSON document; also takes a `POST /prompt` body."""
    if looks_like_api_prompt(data):
        return dict(data), None  # type: ignore[arg-type]
    if is_ui_workflow(data):
        return None, dict(data)  # type: ignore[arg-type]
    if isinstance(data, dict) and looks_like_api_prompt(data.get("prompt")):
        ui = (data.get("extra_data") or {}).get("extra_pnginfo", {}).get("workflow")
        return dict(data["prompt"]), ui if is_ui_workflow(ui) else None
    if isinstance(data, dict):
        bad = next((k for k, v in data.items()
                    if not (isinstance(v, dict) and isinstance(v.get("class_type"), str))), None)
        if bad is not None and not {"nodes", "links"} & set(data):
            raise WorkflowFileError(f"{where} is neither an API-format workflow (node {bad!r} has no "
                                    "'class_type') nor a UI-format workflow (no 'nodes' and 'links')")
    raise WorkflowFileError(f"{where} is neither an API-format workflow ({{id: {{class_type, inputs}}}}) "
                            f"nor a UI-format workflow ({{nodes, links, ...}}); found {type(data).__name__}")


# ---------------------------------------------------------------------------------------------
# Files


def load_workflow_file(path: str | Path) -> WorkflowSource:
    """Read a `.json` workflow (API or UI) or a `.png` with `prompt` / `workflow` / `parameters`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise WorkflowFileError(f"cannot read workflow file {path}: {err.strerror or err}") from None
    if raw.startswith(PNG_SIGNATURE):
        return load_png(raw, path)
    if raw.startswith(JPEG_SIGNATURE) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"):
        return load_exif_image(raw, path)
    if not raw.strip():
        raise WorkflowFileError(f"{path} is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise WorkflowFileError(f"{path} is neither a PNG image nor UTF-8 JSON text") from None
    prompt, ui = classify_json(_parse_json(text, str(path)), str(path))
    return WorkflowSource(path, "json", prompt=prompt, ui=ui)


def load_png(data: bytes, path: Path) -> WorkflowSource:
    """A PNG's workflow: `prompt` (API) and/or `workflow` (UI), else A1111 `parameters`."""
    return _from_text(read_png_text(data, str(path)), path, "png")


def decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: an 8-byte charset header (`UNICODE\\0` -> UTF-16, `ASCII`), then the text."""
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        # UTF-16 without a byte-order mark; ASCII-range text tells the byte order by its zero bytes
        big = len(body) < 2 or body[0] == 0 or body[1] != 0
        return body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    if head.startswith(b"ASCII") or head == b"\0" * 8:
        return body.decode("latin-1")
    return raw.decode("utf-8", errors="replace")


def read_exif_text(data: bytes, name: str = "<image>") -> dict[str, str]:
    """Workflow text from a JPEG/WebP's EXIF: ComfyUI's `prompt:`/`workflow:` strings and A1111's
    UserComment (`parameters`)."""
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            exif = img.getexif()
            comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise WorkflowFileError(f"{name}: image cannot be read: {err}") from None
    out: dict[str, str] = {}
    for value in exif.values():
        if isinstance(value, str):
            key, sep, text = value.partition(":")
            if sep and key.lower() in ("prompt", "workflow"):
                out.setdefault(key.lower(), text)
    if comment:
        text = decode_user_comment(comment).rstrip("\0")
        if text.strip():
            out["parameters"] = text
    return out


def load_exif_image(data: bytes, path: Path) -> WorkflowSource:
    """A JPEG or WebP: ComfyUI EXIF strings, else A1111's UserComment."""
    return _from_text(read_exif_text(data, str(path)), path, "exif")


def _from_text(chunks: dict[str, str], path: Path, container: Literal["png", "exif"]) -> WorkflowSource:
    what = "text chunk" if container == "png" else "EXIF entry"
    prompt = ui = None
    if "prompt" in chunks:
        prompt = _parse_json(chunks["prompt"], f"{path} ({what} 'prompt')")
        if not looks_like_api_prompt(prompt):
            raise WorkflowFileError(f"{path}: {what} 'prompt' is not an API-format workflow")
    if "workflow" in chunks:
        ui = _parse_json(chunks["workflow"], f"{path} ({what} 'workflow')")
        if not is_ui_workflow(ui):
            if prompt is None:
                raise WorkflowFileError(f"{path}: {what} 'workflow' is not a UI-format workflow")
            ui = None
    parameters = chunks.get("parameters")
    if prompt is None and ui is None and not (parameters and parameters.strip()):
        found = ", ".join(sorted(chunks)) or "none"
        raise WorkflowFileError(f"{path} has no workflow metadata: no 'prompt', 'workflow' or "
                                f"'parameters' {what} ({what}s found: {found})")
    return WorkflowSource(path, container, prompt=prompt, ui=ui, parameters=parameters, text_chunks=chunks)
