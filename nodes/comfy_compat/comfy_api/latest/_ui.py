"""`comfy_api.latest.ui`: what a V3 node may put in `NodeOutput(ui=...)` (Easel's own code).

Offered: `PreviewText`, `SavedResult`, `SavedImages`, `PreviewImage`, `PreviewMask` and
`ImageSaveHelper.save_images` / `get_save_images_ui` (PNG files with the prompt / extra_pnginfo
chunks, written through Easel's image saving). A plain dict works too. Audio, video and 3-D
previews are not offered.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ._io import FolderType
from ._nodes import ComfyNode, _UIOutput

__all__ = ["ImageSaveHelper", "PreviewImage", "PreviewMask", "PreviewText", "SavedImages", "SavedResult"]


class SavedResult(dict[str, str]):
    """One saved file as the UI dict lists it: filename, subfolder, type."""

    def __init__(self, filename: str, subfolder: str, type: FolderType | str) -> None:
        super().__init__(filename=filename, subfolder=subfolder, type=FolderType(type).value)

    @property
    def filename(self) -> str:
        return self["filename"]

    @property
    def subfolder(self) -> str:
        return self["subfolder"]

    @property
    def type(self) -> FolderType:
        return FolderType(self["type"])


class SavedImages(_UIOutput):
    def __init__(self, results: Sequence[SavedResult | dict[str, str]], is_animated: bool = False) -> None:
        self.results, self.is_animated = list(results), is_animated

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"images": self.results}
        if self.is_animated:
            data["animated"] = [True]
        return data


class PreviewText(_UIOutput):
    """Text shown on the node."""

    def __init__(self, value: str, **_unused: Any) -> None:
        self.value = value

    def as_dict(self) -> dict[str, Any]:
        return {"text": [self.value]}


def _root(folder_type: FolderType) -> str:
    import folder_paths
    if folder_type == FolderType.input:
        return folder_paths.get_input_directory()
    if folder_type == FolderType.output:
        return folder_paths.get_output_directory()
    return folder_paths.get_temp_directory()


class ImageSaveHelper:
    """Save IMAGE batches as PNG files (prompt and extra_pnginfo from `cls.hidden` when given)."""

    @staticmethod
    def save_images(images: Any, filename_prefix: str, folder_type: FolderType | str,
                    cls: type[ComfyNode] | None, compress_level: int = 4) -> list[SavedResult]:
        from diffusion.images import image_io
        if getattr(images, "ndim", None) != 4:
            raise ValueError(f"save_images: images must be an IMAGE [B, H, W, C], found shape "
                             f"{tuple(getattr(images, 'shape', ()))}")
        folder_type = FolderType(folder_type)
        height, width = int(images.shape[1]), int(images.shape[2])
        target = image_io.save_target(_root(folder_type), filename_prefix, width, height)
        hidden = cls.hidden if cls is not None else None
        prompt = hidden.prompt if hidden is not None else None
        extra = hidden.extra_pnginfo if hidden is not None else None
        results = []
        for batch_number, image in enumerate(images):
            name = target.file_name(batch_number, batch_number)
            image_io.save_png(image, target.folder / name, prompt=prompt, extra_pnginfo=extra,
                              compress_level=compress_level)
            results.append(SavedResult(name, target.subfolder, folder_type))
        return results

    @staticmethod
    def get_save_images_ui(images: Any, filename_prefix: str, cls: type[ComfyNode] | None,
                           compress_level: int = 4) -> SavedImages:
        return SavedImages(ImageSaveHelper.save_images(images, filename_prefix, FolderType.output, cls,
                                                       compress_level))


class PreviewImage(_UIOutput):
    """Save an IMAGE batch to the temp folder and show it on the node."""

    def __init__(self, image: Any, animated: bool = False, cls: type[ComfyNode] | None = None,
                 **_unused: Any) -> None:
        letters = "abcdefghijklmnopqrstupvxyz"
        prefix = "ComfyUI_temp_" + "".join(random.choice(letters) for _ in range(5))
        self.values = ImageSaveHelper.save_images(image, prefix, FolderType.temp, cls, compress_level=1)
        self.animated = animated

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.values, "animated": [self.animated]}


class PreviewMask(PreviewImage):
    """A MASK [B, H, W] shown as a grey image."""

    def __init__(self, mask: Any, animated: bool = False, cls: type[ComfyNode] | None = None,
                 **_unused: Any) -> None:
        image = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        super().__init__(image, animated, cls)
