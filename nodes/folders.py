"""Model, input and output folders: `models/<kind>/` under a base directory plus extra folders.

Node classes read the folders of the current run through `current_folders()`, because ComfyUI's
`INPUT_TYPES()` takes no arguments; whoever runs the registry (CLI, server worker, tests) installs
them with `use_folders()`.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
KIND_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "checkpoints": MODEL_EXTENSIONS,
    "vae": MODEL_EXTENSIONS,
    "loras": MODEL_EXTENSIONS,
    "embeddings": MODEL_EXTENSIONS,
    "hypernetworks": MODEL_EXTENSIONS,
    "vae_approx": MODEL_EXTENSIONS,
    "upscale_models": MODEL_EXTENSIONS,
    "clip": MODEL_EXTENSIONS,
    "unet": MODEL_EXTENSIONS,
    "controlnet": MODEL_EXTENSIONS,
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class ModelFolders:
    """Where each kind of file lives: `<base>/models/<kind>` first, then configured extras."""

    def __init__(self, base_dir: str | os.PathLike[str],
                 extra: Mapping[str, Sequence[str | os.PathLike[str]]] | None = None,
                 output_dir: str | os.PathLike[str] | None = None,
                 input_dir: str | os.PathLike[str] | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.output_dir = Path(output_dir) if output_dir else self.base_dir / "output"
        self.input_dir = Path(input_dir) if input_dir else self.base_dir / "input"
        self.temp_dir = self.base_dir / "temp"
        self._extra = {kind: [Path(p) for p in paths] for kind, paths in (extra or {}).items()}

    def kinds(self) -> list[str]:
        return sorted(set(KIND_EXTENSIONS) | set(self._extra))

    def dirs(self, kind: str) -> list[Path]:
        return [self.base_dir / "models" / kind, *self._extra.get(kind, [])]

    def add(self, kind: str, path: str | os.PathLike[str]) -> None:
        self._extra.setdefault(kind, []).append(Path(path))

    def list_files(self, kind: str) -> list[str]:
        """Relative file names (with `/`, subfolders included) of this kind, sorted, de-duplicated."""
        exts = KIND_EXTENSIONS.get(kind, MODEL_EXTENSIONS)
        names: set[str] = set()
        for root in self.dirs(kind):
            if not root.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(root)
                for fn in filenames:
                    if fn.lower().endswith(exts):
                        names.add((rel / fn).as_posix() if rel.parts else fn)
        return sorted(names)

    def resolve(self, kind: str, name: str) -> Path:
        """The file `name` of this kind; never a path outside the kind's folders."""
        if not name or "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise FileNotFoundError(f"{kind} file name {name!r} is not a relative name inside the {kind} folders")
        searched = self.dirs(kind)
        for root in searched:
            candidate = (root / name)
            if candidate.is_file():
                return candidate
        where = ", ".join(str(p) for p in searched)
        raise FileNotFoundError(f"{kind} file {name!r} not found (searched: {where})")


_current: contextvars.ContextVar[ModelFolders] = contextvars.ContextVar("easel_model_folders")


def current_folders() -> ModelFolders:
    """The folders of the current run; `./` as base when nobody installed any."""
    folders = _current.get(None)
    if folders is None:
        folders = ModelFolders(Path.cwd())
        _current.set(folders)
    return folders


@contextlib.contextmanager
def use_folders(folders: ModelFolders) -> Iterator[ModelFolders]:
    token = _current.set(folders)
    try:
        yield folders
    finally:
        _current.reset(token)
