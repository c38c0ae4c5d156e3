"""Reading tensors from model files without ever running code from them.

- `.safetensors` / `.sft`: the safetensors library (a JSON header + raw tensors; nothing executable).
- `.ckpt` / `.pt` / `.pth` / `.bin`: `torch.load(weights_only=True)` only, with the few harmless globals
  that original SD training checkpoints pickle allow-listed (formats.md 1.1). A pickle that asks for
  anything else (e.g. `os.system`) is refused with a ModelFileError naming that global; there is no
  unsafe fallback.
Every failure -- missing, truncated, random bytes, no tensors -- is a ModelFileError naming the file.
"""
from __future__ import annotations

import codecs
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy
import torch
from safetensors import SafetensorError, safe_open

from diffusion.models.errors import ModelFileError

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


class _LightningModelCheckpoint:
    """Stand-in for pytorch_lightning's ModelCheckpoint callback pickled into old SD .ckpt files."""


_LightningModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
_LightningModelCheckpoint.__name__ = _LightningModelCheckpoint.__qualname__ = "ModelCheckpoint"


def _numpy_scalar(*args: Any) -> Any:
    from numpy._core.multiarray import (
        scalar,  # numpy 2 location of numpy.core.multiarray.scalar
    )
    return scalar(*args)


def _safe_globals() -> list[Any]:
    items: list[Any] = [(_LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
                        (_numpy_scalar, "numpy.core.multiarray.scalar"), numpy.dtype, codecs.encode]
    f64 = getattr(getattr(numpy, "dtypes", None), "Float64DType", None)
    if f64 is not None:
        items.append(f64)
    return items


def _describe_file(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    return f"{size} bytes starting with {head[:8]!r}"


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the `__metadata__` of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ModelFileError(path, f"not a valid safetensors file or truncated ({e}); found "
                                   f"{_describe_file(path)}") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(path, f"unreadable safetensors file: {e}") from None
    return tensors, meta


def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"global[s]? `?([\w.]+)`? ", message)
    return m.group(1) if m else None


def pickle_globals(path: Path, limit: int = 1 << 20) -> list[str]:
    """Globals a pickle names (`module.name`), found by reading opcodes, never by unpickling."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member)[:limit] if member else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        found: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:                 # a broken stream: report what was found up to there
        return found if "found" in locals() else []


_TORCH_GLOBAL = re.compile(r"^(torch\.|collections\.OrderedDict$|builtins\.(set|frozenset|slice)$)")


def read_pickle(path: Path) -> Any:
    """torch.load with weights_only=True (and mmap for zip files); refusals become ModelFileError."""
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch's notes about pickle protocols
            if path.suffix.lower() in SAFETENSORS_EXTENSIONS:      # torch.load would hand the name to safetensors
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        bad = _refused_global(text) or next(
            (g for g in pickle_globals(path) if not _TORCH_GLOBAL.match(g)), None)
        if bad is not None:
            raise ModelFileError(path, f"refused: the pickle asks for the global {bad!r}, which could run code; only "
                                       "plain tensor files are loaded (torch.load weights_only=True)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise ModelFileError(path, f"not a torch checkpoint or truncated "
                                   f"({detail.group(1).strip() if detail else text.splitlines()[0]}); found "
                                   f"{_describe_file(path)}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise ModelFileError(path, f"not a torch checkpoint or truncated ({first}); found "
                                   f"{_describe_file(path)}") from None


def unwrap(obj: Any) -> Any:
    """Lightning-style nesting: `state_dict` (repeatedly), or a dict whose single value is a dict."""
    while isinstance(obj, Mapping):
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        elif len(obj) == 1 and isinstance(next(iter(obj.values())), Mapping):
            obj = next(iter(obj.values()))
        else:
            break
    return obj


def _sniff(path: Path) -> str:
    """What the first bytes say a file is: "safetensors", "pickle" (torch zip or raw pickle), "empty",
    "text" (e.g. a web page saved by a failed download) or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    # safetensors first: its header length (little-endian) may begin with the pickle marker 0x80;
    # a pickle or a zip read as such a length is far larger than the file
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"               # a torch zip, or a raw pickle (PROTO opcode with protocol 2-5)
    if b"\x00" not in head:          # weights files have zero bytes early (lengths, opcodes, headers)
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:  # valid UTF-8 up to a character cut at the end, or not text
            text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
        if text and sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.9 * len(text):
            return "text"
    return "unknown"


def file_kind(path: Path) -> str:
    """The reader a file needs: by its content when that is clear, else by its extension; empty and
    text files are refused here with what they are."""
    kind = _sniff(path)
    if kind == "empty":
        raise ModelFileError(path, "the file is empty (0 bytes): the download or copy did not finish")
    if kind == "text":
        with open(path, "rb") as f:
            begin = f.read(60).decode("utf-8", errors="replace").strip()
        raise ModelFileError(path, f"a text file, not model weights (it begins {begin!r}): often a web page or "
                                   "error message saved in place of the model by a failed download")
    if kind == "unknown":
        ext = path.suffix.lower()
        kind = "safetensors" if ext in SAFETENSORS_EXTENSIONS else "pickle" if ext in PICKLE_EXTENSIONS else kind
    return kind


def load_state_dict(path: str | os.PathLike[str], with_metadata: bool = False
                    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a model file (CPU, stored dtype), optionally with its safetensors metadata."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "file not found")
    if not p.is_file():
        raise ModelFileError(p, "not a file")
    ext = p.suffix.lower()
    kind = file_kind(p)
    meta: dict[str, str] = {}
    if kind == "safetensors":
        tensors, meta = read_safetensors(p)
    elif kind == "pickle":
        obj = unwrap(read_pickle(p))
        if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
            raise ModelFileError(p, f"expected a dict of tensors, found {type(obj).__name__}")
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            kinds = sorted({type(v).__name__ for v in obj.values()})
            raise ModelFileError(p, f"no tensors in it; found keys {list(obj)[:5]} of types {kinds}")
    else:
        raise ModelFileError(p, f"unknown file type {ext!r}: neither safetensors nor a torch file; found "
                                f"{_describe_file(p)}")
    if not tensors and kind == "safetensors":
        raise ModelFileError(p, "the safetensors file holds no tensors")
    return (tensors, meta) if with_metadata else tensors


# --- lazy reading: one tensor at a time, optionally cast on read ----------------------------------

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-on-access mapping: `sd[key]` reads that tensor into its own
    memory (no mmap, so a converted model does not keep the file's pages resident), cast to `dtype`
    when one is set (floating tensors only). Shapes come from the header without reading."""

    def __init__(self, path: Path, header: dict[str, dict], data_start: int, metadata: dict[str, str],
                 dtype: torch.dtype | None = None) -> None:
        self.path, self._header, self._start, self.metadata, self.dtype = path, header, data_start, metadata, dtype

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SafetensorsFile:
        p = Path(path)
        if not p.is_file():
            raise ModelFileError(p, "file not found" if not p.exists() else "not a file")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:    # validates header and sizes
                metadata = dict(f.metadata() or {})
        except SafetensorError as e:
            raise ModelFileError(p, f"not a valid safetensors file or truncated ({e}); found "
                                    f"{_describe_file(p)}") from None
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        if not header:
            raise ModelFileError(p, "the safetensors file holds no tensors")
        unknown = {v["dtype"] for v in header.values()} - set(SAFETENSORS_DTYPES)
        if unknown:
            raise ModelFileError(p, f"unsupported tensor dtypes {sorted(unknown)}")
        return cls(p, header, 8 + n, metadata)

    def cast(self, dtype: torch.dtype | None) -> SafetensorsFile:
        """The same file, floating tensors cast to `dtype` as they are read."""
        return SafetensorsFile(self.path, self._header, self._start, self.metadata, dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def __contains__(self, key: object) -> bool:
        return key in self._header

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._header[key]
        begin, end = info["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            got = f.readinto(memoryview(raw.numpy()))
        if got != end - begin:
            raise ModelFileError(self.path, f"truncated: tensor {key!r} needs {end - begin} bytes, found {got}")
        t = raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t


class CastView(Mapping[str, torch.Tensor]):
    """An in-memory state dict seen with floating tensors cast to `dtype` on access."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        self._t, self.dtype = tensors, dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def __contains__(self, key: object) -> bool:
        return key in self._t

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._t[key]
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t


def open_state_dict(path: str | os.PathLike[str]) -> SafetensorsFile | CastView:
    """A model file as a mapping with `.shape(key)` and `.cast(dtype)`-style views: safetensors lazily
    (read per tensor), torch files loaded (safely) up front."""
    p = Path(path)
    if p.is_file() and file_kind(p) == "safetensors":
        return SafetensorsFile.open(p)
    sd = load_state_dict(p)
    assert isinstance(sd, dict)
    return CastView(sd, None)


def with_dtype(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> Mapping[str, torch.Tensor]:
    """`sd` with floating tensors cast to dtype on access."""
    if isinstance(sd, SafetensorsFile):
        return sd.cast(dtype)
    if isinstance(sd, CastView):
        return CastView(sd._t, dtype)
    return CastView(sd, dtype)


def shape_of(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it when the mapping knows shapes."""
    getter = getattr(sd, "shape", None)
    return tuple(getter(key)) if callable(getter) else tuple(sd[key].shape)
