"""`node_helpers` for plugins: conditioning_set_values and pillow."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def conditioning_set_values(conditioning: list[list[Any]], values: Mapping[str, Any] | None = None,
                            append: bool = False) -> list[list[Any]]:
    """A copy of a CONDITIONING list with `values` set in each entry's dict (lists extended when append)."""
    out = []
    for tensor, options in conditioning:
        new = dict(options)
        for key, value in (values or {}).items():
            if append and isinstance(new.get(key), list):
                new[key] = new[key] + list(value)
            else:
                new[key] = value
        out.append([tensor, new])
    return out


def pillow(fn: Callable[..., T], arg: Any) -> T:
    """Call a PIL function, retrying once with truncated images allowed (as ComfyUI does)."""
    from PIL import ImageFile
    try:
        return fn(arg)
    except (OSError, SyntaxError):
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
