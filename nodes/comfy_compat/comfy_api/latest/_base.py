"""The building blocks of `comfy_api.latest.io`: inputs, outputs, socket types (Easel's own code).

`Input.as_dict()` gives the option dict ComfyUI puts into `/object_info` for that input (None values
left out); unknown keyword options of an Input (newer ComfyUI options) are passed on in it.
Re-exported by `_io`; plugins reach these as `io.Input`, `io.comfytype`, `io.Custom`, ...
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, ClassVar, TypeVar


def _pruned(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class RemoteOptions:
    """A combo whose choices the browser fetches from `route`."""

    def __init__(self, route: str, refresh_button: bool, control_after_refresh: str = "first",
                 timeout: int | None = None, max_retries: int | None = None, refresh: int | None = None) -> None:
        self.route, self.refresh_button, self.control_after_refresh = route, refresh_button, control_after_refresh
        self.timeout, self.max_retries, self.refresh = timeout, max_retries, refresh

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"route": self.route, "refresh_button": self.refresh_button,
                        "control_after_refresh": self.control_after_refresh, "timeout": self.timeout,
                        "max_retries": self.max_retries, "refresh": self.refresh})


# -- inputs and outputs ----------------------------------------------------------------------------
class _Socket:
    Parent: ClassVar[type[ComfyType]]      # the ComfyType this Input/Output class belongs to

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    def validate(self) -> None:
        """Checks of a schema's inputs and outputs (nothing beyond the constructor's for these types)."""


class Input(_Socket):
    """One input socket; `optional` puts it in the "optional" section of INPUT_TYPES."""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, *,
                 extra_dict: Mapping[str, Any] | None = None, raw_link: bool | None = None, **options: Any) -> None:
        if not isinstance(id, str) or not id:
            raise TypeError(f"{type(self).__qualname__}: the input id must be a non-empty str, got {id!r}")
        self.id, self.display_name, self.optional = id, display_name, bool(optional)
        self.tooltip, self.lazy, self.raw_link = tooltip, lazy, raw_link
        self.extra_dict: dict[str, Any] = {**(extra_dict or {}), **options}

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                        "lazy": self.lazy, "rawLink": self.raw_link}) | _pruned(self.extra_dict)

    def get_io_type(self) -> str:
        return self.io_type

    def get_all(self) -> list[Input]:
        return [self]


class WidgetInput(Input):
    """An input that the browser can show as a widget (a literal value instead of a link)."""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, *, default: Any = None,
                 socketless: bool | None = None, widget_type: str | None = None, force_input: bool | None = None,
                 extra_dict: Mapping[str, Any] | None = None, raw_link: bool | None = None, **options: Any) -> None:
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict=extra_dict, raw_link=raw_link,
                         **options)
        self.default, self.socketless, self.widget_type, self.force_input = default, socketless, widget_type, force_input

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | _pruned({"default": _plain(self.default), "socketless": self.socketless,
                                            "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self) -> str:
        return self.widget_type if self.widget_type is not None else self.io_type


class Output(_Socket):
    """One output socket; `is_output_list` makes its items fan out downstream (OUTPUT_IS_LIST)."""

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False) -> None:
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, bool(is_output_list)

    def as_dict(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip,
                        "is_output_list": self.is_output_list})

    def get_io_type(self) -> str:
        return self.io_type


class ComfyType:
    """A socket type: `io_type` is its name in RETURN_TYPES / INPUT_TYPES."""

    io_type: ClassVar[str] = "*"
    Type: ClassVar[Any] = Any


class ComfyTypeI(ComfyType):
    """A type with an Input class only."""

    class Input(Input):
        pass


class ComfyTypeIO(ComfyTypeI):
    """A type with Input and Output classes."""

    class Output(Output):
        pass


_T = TypeVar("_T", bound=type)


def comfytype(io_type: str, **_unused: Any) -> Callable[[_T], _T]:
    """Class decorator: bind `io_type` to a ComfyType and give it Input/Output classes of its own."""
    if not isinstance(io_type, str) or not io_type:
        raise TypeError(f"comfytype: io_type must be a non-empty str, got {io_type!r}")

    def decorate(cls: _T) -> _T:
        if not issubclass(cls, ComfyType):
            cls = type(cls.__name__, (cls, ComfyTypeIO),                      # type: ignore[assignment]
                       {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        cls.io_type = io_type                                                 # type: ignore[attr-defined]
        for slot in ("Input", "Output"):
            base = getattr(cls, slot, None)
            if isinstance(base, type):
                setattr(cls, slot, type(base.__name__, (base,), {
                    "Parent": cls, "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}.{slot}",
                    "__doc__": base.__doc__}))
        return cls
    return decorate


_CUSTOM: dict[str, type[ComfyTypeIO]] = {}


def Custom(io_type: str) -> type[ComfyTypeIO]:
    """A ComfyType for a plugin's own type name, e.g. `Custom("MY_TYPE").Output()`."""
    made = _CUSTOM.get(io_type)
    if made is None:
        made = comfytype(io_type)(type(f"Custom_{io_type}", (ComfyTypeIO,), {"__module__": __name__}))
        _CUSTOM[io_type] = made
    return made
