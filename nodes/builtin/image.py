"""Image nodes: SaveImage, PreviewImage, LoadImage, ImageScale (ComfyUI names, inputs and order).

IMAGE = Tensor[B, H, W, C] float32 in 0..1; MASK = Tensor[B, H, W]. Files go to the folders of the
current run (`nodes.folders.current_folders()`): SaveImage to `output_dir` as
`<prefix>_<counter:05>_.png` (PNG level 4), PreviewImage to `temp_dir` with a random `_temp_xxxxx`
prefix (level 1); both embed the `prompt` / extra_pnginfo (`workflow`) / A1111 `parameters` chunks
and return the ComfyUI ui dict `{"images": [{"filename", "subfolder", "type"}]}`.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffusion.images import image_io, latent_ops
from graph.runtime import current
from nodes.folders import IMAGE_EXTENSIONS, current_folders

MAX_RESOLUTION = 16384
_ANNOTATIONS = {"[input]": "input", "[output]": "output", "[temp]": "temp"}


class SaveImage:
    """Save images to the output folder with the workflow inside."""

    def __init__(self) -> None:
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = image_io.PNG_COMPRESS_SAVE

    def _root(self) -> Path:
        return Path(current_folders().output_dir)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
                    "images": ("IMAGE", {"tooltip": "The images to save."}),
                    "filename_prefix": ("STRING", {"default": "ComfyUI",
                                                   "tooltip": "The prefix for the file to save. May contain "
                                                              "folders and %width%, %height%, %year% ... ."}),
                },
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your output directory."

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI",
                    prompt: dict[str, Any] | None = None,
                    extra_pnginfo: dict[str, Any] | None = None) -> dict[str, Any]:
        if images.ndim != 4:
            raise ValueError(f"{type(self).__name__}: input 'images' must be an IMAGE [B, H, W, C], "
                             f"found shape {tuple(images.shape)}")
        height, width = int(images.shape[1]), int(images.shape[2])
        target = image_io.save_target(self._root(), filename_prefix + self.prefix_append, width, height)
        parameters = _parameters(prompt, width, height)
        results = []
        for batch_number, image in enumerate(images):
            name = target.file_name(batch_number, batch_number)
            image_io.save_png(image, target.folder / name, prompt=prompt, extra_pnginfo=extra_pnginfo,
                              parameters=parameters, compress_level=self.compress_level)
            results.append({"filename": name, "subfolder": target.subfolder, "type": self.type})
        return {"ui": {"images": results}}


def _parameters(prompt: dict[str, Any] | None, width: int, height: int) -> str | None:
    """The A1111 `parameters` text; best effort: a graph it cannot read gives a warning, not a failed save."""
    if not prompt:
        return None
    rt = current()
    try:
        return image_io.a1111_parameters(prompt, width, height, save_node=rt.node_id)
    except Exception as exc:  # noqa: BLE001 - metadata must never cost the user the picture
        rt.warn(f"A1111 parameters not written: {exc}", {"class_type": "SaveImage"})
        return None


class PreviewImage(SaveImage):
    """Save images to the temp folder (shown in the UI, cleared on restart)."""

    def __init__(self) -> None:
        super().__init__()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.Random().choice("abcdefghijklmnopqrstupvxyz")
                                                for _ in range(5))
        self.compress_level = image_io.PNG_COMPRESS_PREVIEW

    def _root(self) -> Path:
        return Path(current_folders().temp_dir)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    DESCRIPTION = "Preview the images in the UI (temp folder)."


def annotated_path(name: str) -> Path:
    """`x.png`, `sub/x.png`, `x.png [output]` / `[input]` / `[temp]` -> a path inside that folder.

    Raises ValueError for names that would leave the folder.
    """
    folders = current_folders()
    kind = "input"
    for suffix, folder_kind in _ANNOTATIONS.items():
        if name.endswith(" " + suffix):
            name, kind = name[: -len(suffix) - 1], folder_kind
            break
    root = Path({"input": folders.input_dir, "output": folders.output_dir, "temp": folders.temp_dir}[kind]).resolve()
    if not name or "\x00" in name or os.path.isabs(name):
        raise ValueError(f"LoadImage: {name!r} is not a file name inside the {kind} folder")
    path = (root / name).resolve()
    if os.path.commonpath([root, path]) != str(root):
        raise ValueError(f"LoadImage: {name!r} leaves the {kind} folder {root}")
    return path


def list_input_images() -> list[str]:
    """Image files of the input folder (sub-folders included, `/` separators), sorted."""
    root = Path(current_folders().input_dir)
    if not root.is_dir():
        return []
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        names += [(rel / f).as_posix() if rel.parts else f for f in filenames
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(names)


class LoadImage:
    """An image from the input folder: IMAGE (RGB) and MASK (1 - alpha)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": (list_input_images(), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return image_io.load_image(annotated_path(image))

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        digest = hashlib.sha256()
        with open(annotated_path(image), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        try:
            path = annotated_path(image)
        except ValueError as e:
            return f"Invalid image file: {image} ({e})"
        if not path.is_file():
            return f"Invalid image file: {image}"
        return True


class ImageScale:
    """Resize images to width x height (0 for one side keeps the aspect ratio)."""

    upscale_methods: ClassVar[list[str]] = list(latent_ops.IMAGE_METHODS)
    crop_methods: ClassVar[list[str]] = list(latent_ops.CROP_METHODS)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (cls.upscale_methods,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (cls.crop_methods,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image: torch.Tensor, upscale_method: str, width: int, height: int,
                crop: str) -> tuple[torch.Tensor]:
        if width == 0 and height == 0:
            return (image,)
        h, w = image.shape[1], image.shape[2]
        if width == 0:
            width = max(1, round(w * height / h))
        elif height == 0:
            height = max(1, round(h * width / w))
        # [B, H, W, C] -> [B, C, H, W] for the resize, and back
        out = latent_ops.upscale(image.movedim(-1, 1), width, height, upscale_method, crop).movedim(1, -1)
        return (out,)


NODE_CLASS_MAPPINGS = {
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "LoadImage": LoadImage,
    "ImageScale": ImageScale,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "LoadImage": "Load Image",
    "ImageScale": "Upscale Image",
}
