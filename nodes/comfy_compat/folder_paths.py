"""ComfyUI's `folder_paths` for plugins, forwarding to Easel's model folders.

Everything reads `nodes.folders.current_folders()` at call time, so a plugin sees the folders of
the run (or server) it is part of. ComfyUI's kind names `text_encoders`, `diffusion_models` and
`custom_nodes` map to Easel's `clip`, `unet` and the plugin folders. Module attributes such as
`models_dir` and `folder_names_and_paths` are computed on access (PEP 562 `__getattr__`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nodes.folders import KIND_EXTENSIONS, MODEL_EXTENSIONS, current_folders

supported_pt_extensions: set[str] = set(MODEL_EXTENSIONS)
KIND_ALIASES = {"text_encoders": "clip", "diffusion_models": "unet", "t2i_adapter": "controlnet"}
_ANNOTATIONS = {"[output]": "output", "[input]": "input", "[temp]": "temp"}


def _kind(folder_name: str) -> str:
    return KIND_ALIASES.get(folder_name, folder_name)


def _plugin_dirs() -> list[str]:
    from nodes.plugins import PLUGIN_DIRS
    return [str(p) for p in PLUGIN_DIRS]


def __getattr__(name: str) -> Any:
    folders = current_folders()
    if name == "base_path":
        return str(folders.base_dir)
    if name == "models_dir":
        return str(folders.base_dir / "models")
    if name == "output_directory":
        return str(folders.output_dir)
    if name == "input_directory":
        return str(folders.input_dir)
    if name == "temp_directory":
        return str(folders.temp_dir)
    if name == "folder_names_and_paths":
        # A snapshot: changing it does not change Easel's folders; use add_model_folder_path.
        return {kind: ([str(p) for p in folders.dirs(kind)], set(KIND_EXTENSIONS.get(kind, MODEL_EXTENSIONS)))
                for kind in folders.kinds()}
    raise AttributeError(f"module 'folder_paths' (Easel compatibility shim) has no attribute {name!r}")


def get_folder_paths(folder_name: str) -> list[str]:
    """The folders searched for this kind, Easel's own `<base>/models/<kind>` first."""
    if folder_name == "custom_nodes":
        return _plugin_dirs()
    return [str(p) for p in current_folders().dirs(_kind(folder_name))]


def get_filename_list(folder_name: str) -> list[str]:
    """Relative file names of this kind (what a combo input lists)."""
    return current_folders().list_files(_kind(folder_name))


def get_full_path(folder_name: str, filename: str) -> str | None:
    """The file's full path, or None when it is not in the kind's folders."""
    try:
        return str(current_folders().resolve(_kind(folder_name), filename))
    except FileNotFoundError:
        return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    return str(current_folders().resolve(_kind(folder_name), filename))


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Add a folder to a kind (`is_default` is accepted; Easel's own folder stays first)."""
    folders = current_folders()
    path = Path(full_folder_path)
    if path not in folders.dirs(_kind(folder_name)):
        folders.add(_kind(folder_name), path)


def get_output_directory() -> str:
    return str(current_folders().output_dir)


def get_input_directory() -> str:
    return str(current_folders().input_dir)


def get_temp_directory() -> str:
    return str(current_folders().temp_dir)


def get_user_directory() -> str:
    return str(current_folders().base_dir / "user")


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": get_output_directory, "input": get_input_directory,
            "temp": get_temp_directory}.get(type_name, lambda: None)()


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """`"x.png [output]"` -> ("x.png", output folder); no annotation -> (name, None)."""
    for suffix, kind in _ANNOTATIONS.items():
        if name.endswith(" " + suffix) or name.endswith(suffix):
            return name[:-len(suffix)].rstrip(), get_directory_by_type(kind)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base = annotated_filepath(name)
    base = base or default_dir or get_input_directory()
    return os.path.join(base, name)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))


def filter_files_extensions(files: Iterable[str], extensions: Iterable[str]) -> list[str]:
    exts = {e.lower() for e in extensions}
    return sorted(f for f in files if not exts or os.path.splitext(f)[1].lower() in exts)


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """(full_output_folder, filename, counter, subfolder, filename_prefix), as ComfyUI returns it."""
    from diffusion.images.image_io import save_target
    target = save_target(output_dir, filename_prefix, image_width, image_height)
    return str(target.folder), target.filename, target.counter, target.subfolder, filename_prefix
