"""Textual-inversion embeddings: find a file by name, read its vectors (formats.md §3).

    path = find_embedding("easyneg", [models/embeddings])         # ComfyUI's `embedding:NAME` lookup
    emb = load_embedding(path)            # Embedding(name, vectors={"l": Tensor[n, 768]}, path)
    index = list_embeddings([models/embeddings])                  # A1111's bare names: stem -> path

Layouts read (each to `vectors: {encoder key: Tensor[n, d]}`, float32, CPU):
- A1111 `.pt`: `{"string_to_param": {"*": Tensor[n, d]}, "name", "step", ...}` (one entry);
- kohya `.safetensors`: `{"emb_params": Tensor[n, d]}`, or any file with a single tensor;
- diffusers `.bin` / `learned_embeds.safetensors`: `{"<token>": Tensor[d] or [n, d]}`;
- SDXL: `{"clip_l": Tensor[n, 768], "clip_g": Tensor[n, 1280]}` (also `clip_h` for SD2 files).
A single-encoder file is keyed by width (768 "l", 1024 "h", 1280 "g"; other widths "l": the text
encoder uses a single-entry file wherever its width fits). `.pt`/`.bin` files are opened only with
`torch.load(weights_only=True)`; A1111 files from torch 1.11 that keep a `ParameterDict` (which the
safe unpickler refuses) are read from the zip's raw float32 storage instead (ComfyUI's fallback:
the last storage of at least 768 floats, width 768 if it divides the count, else 1024).
A width that does not fit the text encoder is reported by the caller, naming this file.
"""
from __future__ import annotations

import os
import pickle
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import file_kind

EXTENSIONS = (".safetensors", ".pt", ".bin")
WIDTH_TO_KEY = {768: "l", 1024: "h", 1280: "g"}
SDXL_KEYS = {"clip_l": "l", "clip_g": "g", "clip_h": "h"}


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding (contracts: frozen `name`, `vectors` keyed by encoder)."""
    name: str
    vectors: dict[str, torch.Tensor] = field(hash=False)     # encoder key -> Tensor[n, d]
    path: str = ""

    @property
    def count(self) -> int:
        """n, the number of token positions the embedding takes."""
        return next(iter(self.vectors.values())).shape[0]

    def vectors_for(self, key: str, width: int) -> torch.Tensor:
        """Rows for encoder `key` of width `width` (Tensor[n, width]); a width mismatch is an error
        naming the file and both sizes."""
        vec = self.vectors.get(key)
        if vec is None and len(self.vectors) == 1:
            vec = next(iter(self.vectors.values()))
        if vec is None:
            raise ModelFileError(self.path or self.name,
                                 f"embedding {self.name!r} has no vectors for text encoder {key!r} of width "
                                 f"{width} (it has {', '.join(f'{k}: {v.shape[-1]}' for k, v in self.vectors.items())})")
        if vec.shape[-1] != width:
            raise ModelFileError(self.path or self.name,
                                 f"embedding {self.name!r} has vectors of width {vec.shape[-1]}, text encoder "
                                 f"{key!r} expects width {width}")
        return vec


# ---------------------------------------------------------------------------------------------
# finding files
# ---------------------------------------------------------------------------------------------

def _walk_dirs(root: Path) -> list[Path]:
    """`root` and all its subdirectories (links followed, hidden ones skipped), in a stable order."""
    out: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.append(Path(dirpath))
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def find_embedding(name: str, dirs: Sequence[str | os.PathLike[str]]) -> Path | None:
    """ComfyUI's lookup of `embedding:NAME`: in every directory and all its subdirectories try
    `NAME` as written, then with `.safetensors`, `.pt`, `.bin` appended; never outside a directory."""
    if not name or "\x00" in name or os.path.isabs(name):
        return None
    for root in (Path(d) for d in dirs):
        if not root.is_dir():
            continue
        for folder in _walk_dirs(root):
            for cand in (name, *(name + ext for ext in EXTENSIONS)):
                path = folder / cand
                if path.is_file() and _inside(path, root):
                    return path
    return None


def list_embeddings(dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    """A1111's registry: every embedding file in the directory trees by file stem (first one wins);
    empty files and `*.preview.*` images are skipped."""
    found: dict[str, Path] = {}
    for root in (Path(d) for d in dirs):
        if not root.is_dir():
            continue
        for folder in _walk_dirs(root):
            for path in sorted(folder.iterdir()):
                if not path.is_file() or path.suffix.lower() not in EXTENSIONS or ".preview." in path.name:
                    continue
                if path.stat().st_size == 0:
                    continue
                found.setdefault(path.stem, path)
    return found


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------

def _raw_zip_vectors(path: Path) -> torch.Tensor:
    """Vectors of a torch zip file without unpickling: the last data storage of >= 768 floats."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if "/data/" in m and not m.endswith("/")]
            for member in reversed(members):
                raw = zf.read(member)
                count = len(raw) // 4
                if count < 768:
                    continue
                width = 768 if count % 768 == 0 else 1024
                if count % width:
                    continue
                return torch.frombuffer(bytearray(raw[: count * 4]), dtype=torch.float32).reshape(-1, width).clone()
    except zipfile.BadZipFile:
        pass
    raise ModelFileError(path, "not readable as an embedding: the safe loader refused it and no raw "
                               "float32 storage of at least 768 values was found")


def _read(path: Path) -> Mapping[str, object]:
    if file_kind(path) == "safetensors":         # by content; empty and text files are refused there
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file; reported with its path
            raise ModelFileError(path, f"not a readable safetensors file ({exc})") from None
    try:
        with open(path, "rb") as f:               # (a file object: torch.load goes by content, not name)
            data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return {"string_to_param": {"*": _raw_zip_vectors(path)}}
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file; reported with its path
        raise ModelFileError(path, f"not a readable torch file ({type(exc).__name__}: {exc})") from None
    if isinstance(data, torch.Tensor):
        return {"emb_params": data}
    if not isinstance(data, Mapping):
        raise ModelFileError(path, f"expected a dict of tensors, found {type(data).__name__}")
    return data


def _as_rows(path: Path, what: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2):
        found = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ModelFileError(path, f"{what}: expected a float tensor [n, d] or [d], found {found}")
    rows = value.detach().to(device="cpu", dtype=torch.float32)
    return (rows.unsqueeze(0) if rows.dim() == 1 else rows).contiguous()


def vectors_from_dict(path: Path, data: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The layouts of formats.md §3.1 -> {encoder key: Tensor[n, d]}."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            n = len(params) if isinstance(params, Mapping) else type(params).__name__
            raise ModelFileError(path, f"string_to_param must hold exactly one tensor, found {n}")
        rows = _as_rows(path, "string_to_param", next(iter(params.values())))
        return {WIDTH_TO_KEY.get(rows.shape[1], "l"): rows}
    per_encoder = {SDXL_KEYS[k]: _as_rows(path, k, v) for k, v in data.items() if k in SDXL_KEYS}
    if per_encoder:
        counts = {k: v.shape[0] for k, v in per_encoder.items()}
        if len(set(counts.values())) != 1:
            raise ModelFileError(path, f"per-encoder vectors have different counts: {counts}")
        return per_encoder
    if "emb_params" in data:
        rows = _as_rows(path, "emb_params", data["emb_params"])
        return {WIDTH_TO_KEY.get(rows.shape[1], "l"): rows}
    tensors = [(k, v) for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:                 # diffusers {token: tensor}, or any single tensor
        key, value = tensors[0]
        rows = _as_rows(path, repr(key), value)
        return {WIDTH_TO_KEY.get(rows.shape[1], "l"): rows}
    keys = ", ".join(repr(k) for k in list(data)[:6])
    raise ModelFileError(path, f"not a textual-inversion embedding: expected string_to_param, emb_params, "
                               f"clip_l/clip_g or a single tensor; found keys {keys}")


_CACHE: OrderedDict[tuple[str, int, int], Embedding] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def load_embedding(path: str | os.PathLike[str]) -> Embedding:
    """Read an embedding file; name = file stem. Cached by (path, mtime, size); the tensors are
    shared between callers and must not be modified."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelFileError(p, f"cannot open embedding file ({exc.strerror or exc})") from None
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    if st.st_size == 0:
        raise ModelFileError(p, "the embedding file is empty")
    emb = Embedding(name=p.stem if p.suffix.lower() in EXTENSIONS else p.name,
                    vectors=vectors_from_dict(p, _read(p)), path=str(p))
    with _CACHE_LOCK:
        _CACHE[key] = emb
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return emb


__all__ = [
    "EXTENSIONS",
    "Embedding",
    "find_embedding",
    "list_embeddings",
    "load_embedding",
    "vectors_from_dict",
]
