"""`comfy_api.latest.io`: the common subset of ComfyUI's V3 node schema (Easel's own code).

A V3 node derives `ComfyNode` and defines the classmethods `define_schema() -> Schema` and
`execute(**inputs) -> NodeOutput`; optionally `validate_inputs`, `fingerprint_inputs` (IS_CHANGED)
and `check_lazy_status`. Inputs and outputs are declared with the types below, e.g.
`Int.Input("seed", min=0, control_after_generate=True)`, `Image.Output()`, `Custom("MY_TYPE")`.
Nothing here runs a node: `nodes/v3_adapter.py` turns a class into a classic node class.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

from ._base import (ComfyType, ComfyTypeI, ComfyTypeIO, Custom, FolderType, Input, NumberDisplay, Output,
                    RemoteOptions, UploadType, WidgetInput, _plain, _pruned, comfytype)
from ._nodes import ComfyNode, Hidden, HiddenHolder, NodeOutput, Schema, _UIOutput, first_real_override

__all__ = ["FolderType", "UploadType", "NumberDisplay", "RemoteOptions", "comfytype", "Custom", "Input",
           "WidgetInput", "Output", "ComfyType", "ComfyTypeI", "ComfyTypeIO", "Boolean", "Int", "Float", "String",
           "Combo", "MultiCombo", "MultiType", "Hidden", "HiddenHolder", "Schema", "ComfyNode", "NodeOutput",
           "first_real_override", "_UIOutput"]
_Output = Output            # the base, for nested `Output` classes


# -- widget types ----------------------------------------------------------------------------------
@comfytype("BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, *, label_on: str | None = None,
                     label_off: str | None = None, **options: Any) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, **options)
            self.label_on, self.label_off = label_on, label_off

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"label_on": self.label_on, "label_off": self.label_off})


@comfytype("INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, *, min: int | None = None,
                     max: int | None = None, step: int | None = None, control_after_generate: bool | None = None,
                     display_mode: NumberDisplay | str | None = None, **options: Any) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, **options)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate, self.display_mode = control_after_generate, display_mode

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"min": self.min, "max": self.max, "step": self.step,
                                                "control_after_generate": self.control_after_generate,
                                                "display": _plain(self.display_mode)})


@comfytype("FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, *, min: float | None = None,
                     max: float | None = None, step: float | None = None, round: float | bool | None = None,
                     display_mode: NumberDisplay | str | None = None, **options: Any) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, **options)
            self.min, self.max, self.step, self.round, self.display_mode = min, max, step, round, display_mode

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"min": self.min, "max": self.max, "step": self.step,
                                                "round": self.round, "display": _plain(self.display_mode)})


@comfytype("STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, *, multiline: bool = False,
                     placeholder: str | None = None, dynamic_prompts: bool | None = None, **options: Any) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, **options)
            self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"multiline": self.multiline, "placeholder": self.placeholder,
                                                "dynamicPrompts": self.dynamic_prompts})


@comfytype("COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        """A drop-down; `options` is a list or an Enum class (its values are the choices)."""

        def __init__(self, id: str, options: list[Any] | type[Enum] | None = None, display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None, lazy: bool | None = None, *,
                     control_after_generate: bool | None = None, upload: UploadType | None = None,
                     image_folder: FolderType | None = None, remote: RemoteOptions | None = None,
                     **more: Any) -> None:
            if isinstance(options, type) and issubclass(options, Enum):
                options = [member.value for member in options]
            elif options is not None and not isinstance(options, (list, tuple)):
                raise TypeError(f"Combo.Input {id!r}: options must be a list or an Enum class, "
                                f"got {type(options).__name__}")
            super().__init__(id, display_name, optional, tooltip, lazy, **more)
            self.multiselect = False
            self.options = list(options) if options is not None else None
            self.control_after_generate, self.upload = control_after_generate, upload
            self.image_folder, self.remote = image_folder, remote

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({
                "multiselect": self.multiselect, "options": self.options,
                "control_after_generate": self.control_after_generate,
                **({_plain(self.upload): True} if self.upload is not None else {}),
                "image_folder": _plain(self.image_folder),
                "remote": self.remote.as_dict() if self.remote is not None else None})

    class Output(_Output):
        def __init__(self, id: str | None = None, display_name: str | None = None, options: list[Any] | None = None,
                     tooltip: str | None = None, is_output_list: bool = False) -> None:
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = list(options) if options is not None else []


@comfytype("COMBO")
class MultiCombo(ComfyTypeI):
    Type = list

    class Input(Combo.Input):
        def __init__(self, id: str, options: list[Any], display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, lazy: bool | None = None, *, placeholder: str | None = None,
                     chip: bool | None = None, **more: Any) -> None:
            super().__init__(id, options, display_name, optional, tooltip, lazy, **more)
            self.multiselect, self.placeholder, self.chip = True, placeholder, chip

        def as_dict(self) -> dict[str, Any]:
            return super().as_dict() | _pruned({"multi_select": True, "placeholder": self.placeholder,
                                                "chip": self.chip})


@comfytype("COMFY_MULTITYPED_V3")
class MultiType(ComfyTypeI):
    class Input(Input):
        """An input accepting several types ("A,B" in INPUT_TYPES); `id` may be an Input whose widget is used."""

        def __init__(self, id: str | Input, types: list[Any], display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None, lazy: bool | None = None,
                     **more: Any) -> None:
            self.input_override: Input | None = None
            if isinstance(id, Input):
                self.input_override = id
                optional = optional or id.optional
                tooltip = tooltip if id.tooltip is None else id.tooltip
                display_name = display_name if id.display_name is None else id.display_name
                lazy = lazy if id.lazy is None else id.lazy
                id = id.id
            super().__init__(id, display_name, optional, tooltip, lazy, **more)
            self.types = list(types)

        def get_io_type(self) -> str:
            names = [t.io_type for t in self.types]
            if self.input_override is not None:
                names.insert(0, self.input_override.get_io_type())
            return ",".join(dict.fromkeys(names))

        def as_dict(self) -> dict[str, Any]:
            base = self.input_override.as_dict() if self.input_override is not None else {}
            if isinstance(self.input_override, WidgetInput):
                base["widgetType"] = self.input_override.get_io_type()
            return base | super().as_dict()


# -- socket types without widget options -------------------------------------------------------------
def _socket_type(name: str, io_type: str) -> type[ComfyTypeIO]:
    return comfytype(io_type)(type(name, (ComfyTypeIO,), {"__module__": __name__, "__qualname__": name}))


Image = _socket_type("Image", "IMAGE")
Mask = _socket_type("Mask", "MASK")
Latent = _socket_type("Latent", "LATENT")
Conditioning = _socket_type("Conditioning", "CONDITIONING")
Sampler = _socket_type("Sampler", "SAMPLER")
Sigmas = _socket_type("Sigmas", "SIGMAS")
Noise = _socket_type("Noise", "NOISE")
Guider = _socket_type("Guider", "GUIDER")
Clip = _socket_type("Clip", "CLIP")
Vae = _socket_type("Vae", "VAE")
Model = _socket_type("Model", "MODEL")
ControlNet = _socket_type("ControlNet", "CONTROL_NET")
ClipVision = _socket_type("ClipVision", "CLIP_VISION")
ClipVisionOutput = _socket_type("ClipVisionOutput", "CLIP_VISION_OUTPUT")
StyleModel = _socket_type("StyleModel", "STYLE_MODEL")
Gligen = _socket_type("Gligen", "GLIGEN")
UpscaleModel = _socket_type("UpscaleModel", "UPSCALE_MODEL")
LatentUpscaleModel = _socket_type("LatentUpscaleModel", "LATENT_UPSCALE_MODEL")
Audio = _socket_type("Audio", "AUDIO")
Video = _socket_type("Video", "VIDEO")
SVG = _socket_type("SVG", "SVG")
LoraModel = _socket_type("LoraModel", "LORA_MODEL")
LossMap = _socket_type("LossMap", "LOSS_MAP")
Hooks = _socket_type("Hooks", "HOOKS")
HookKeyframes = _socket_type("HookKeyframes", "HOOK_KEYFRAMES")
TimestepsRange = _socket_type("TimestepsRange", "TIMESTEPS_RANGE")
LatentOperation = _socket_type("LatentOperation", "LATENT_OPERATION")
Photomaker = _socket_type("Photomaker", "PHOTOMAKER")
Point = _socket_type("Point", "POINT")
FaceAnalysis = _socket_type("FaceAnalysis", "FACE_ANALYSIS")
BBOX = _socket_type("BBOX", "BBOX")
SEGS = _socket_type("SEGS", "SEGS")
MODEL_PATCH = _socket_type("MODEL_PATCH", "MODEL_PATCH")
AudioEncoder = _socket_type("AudioEncoder", "AUDIO_ENCODER")
AudioEncoderOutput = _socket_type("AudioEncoderOutput", "AUDIO_ENCODER_OUTPUT")
Tracks = _socket_type("Tracks", "TRACKS")
Mesh = _socket_type("Mesh", "MESH")
Voxel = _socket_type("Voxel", "VOXEL")
Webcam = _socket_type("Webcam", "WEBCAM")
AnyType = _socket_type("AnyType", "*")
__all__ += [
    "BBOX",
    "MODEL_PATCH",
    "SEGS",
    "SVG",
    "AnyType",
    "Audio",
    "AudioEncoder",
    "AudioEncoderOutput",
    "Clip",
    "ClipVision",
    "ClipVisionOutput",
    "Conditioning",
    "ControlNet",
    "FaceAnalysis",
    "Gligen",
    "Guider",
    "HookKeyframes",
    "Hooks",
    "Image",
    "Latent",
    "LatentOperation",
    "LatentUpscaleModel",
    "LoraModel",
    "LossMap",
    "Mask",
    "Mesh",
    "Model",
    "Noise",
    "Photomaker",
    "Point",
    "Sampler",
    "Sigmas",
    "StyleModel",
    "TimestepsRange",
    "Tracks",
    "UpscaleModel",
    "Vae",
    "Video",
    "Voxel",
    "Webcam",
]
