"""Which inputs of a node definition are widgets, and which widget each stored value belongs to.

A UI node stores its widget values positionally in `widgets_values`, in the order the frontend
created the widgets (`input_order` of `/object_info`), and some widgets store hidden companion
values right after their own: the `control_after_generate` mode after a seed (plus a filter list
after a combo), the upload button after an image combo. Those are stored but never sent.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_MODES = frozenset({"fixed", "increment", "decrement", "randomize"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


@dataclass(frozen=True)
class WidgetSlot:
    name: str
    spec: tuple[Any, ...]
    control: int         # companion values after it: 0, 1 (mode) or 2 (mode + filter list)
    upload: bool         # an upload button value follows (LoadImage)


def _spec_parts(spec: object) -> tuple[object, dict[str, Any]]:
    if isinstance(spec, (list, tuple)) and spec:
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return spec[0], opts
    return spec, {}


def widget_slots(definition: Mapping[str, Any]) -> list[WidgetSlot]:
    """The widgets a node of this definition creates, in creation order (required, optional)."""
    slots: list[WidgetSlot] = []
    inputs = definition.get("input") or {}
    order = definition.get("input_order") or {}
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            if name not in specs:
                continue
            typ, opts = _spec_parts(specs[name])
            is_combo = isinstance(typ, (list, tuple)) or typ == "COMBO"
            if not (is_combo or typ in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            cag = opts.get("control_after_generate")
            control = 0
            if typ == "INT" and name in ("seed", "noise_seed") and cag is not False:
                control = 1
            elif cag and typ in ("INT", "FLOAT"):
                control = 1
            elif cag and is_combo:
                control = 2
            upload = is_combo and any(opts.get(k) for k in UPLOAD_OPTIONS)
            slots.append(WidgetSlot(name, tuple(specs[name]) if isinstance(specs[name], (list, tuple))
                                    else (specs[name],), control, upload))
    return slots


def _default_of(slot: WidgetSlot) -> tuple[bool, Any]:
    typ, opts = _spec_parts(list(slot.spec))
    if "default" in opts:
        return True, opts["default"]
    if isinstance(typ, (list, tuple)) and typ:
        return True, typ[0]
    return False, None


def map_widget_values(node: Mapping[str, Any], definition: Mapping[str, Any]) -> dict[str, Any]:
    """Widget name -> value for one UI node, skipping companion values (seed mode, upload button)."""
    slots = widget_slots(definition)
    named = node.get("widgets_values_named")
    values = node.get("widgets_values")
    out: dict[str, Any] = {}
    if isinstance(values, dict) or isinstance(named, dict):
        source = named if isinstance(named, dict) else values
        for slot in slots:
            if slot.name in source:
                out[slot.name] = source[slot.name]
    elif isinstance(values, list):
        pos = 0
        for i, slot in enumerate(slots):
            if pos >= len(values):
                break
            out[slot.name] = values[pos]
            pos += 1
            remaining_widgets = len(slots) - i - 1
            # Companions are consumed only when present: a value-control mode must look like one
            # (old files hold true/false), and any companion only if enough values are left over
            # for the widgets still to come.
            for k in range(slot.control):
                if pos >= len(values) or len(values) - pos <= remaining_widgets:
                    break
                v = values[pos]
                if k == 0 and not (v in CONTROL_MODES or isinstance(v, bool)):
                    break
                pos += 1
            if slot.upload and pos < len(values) and len(values) - pos > remaining_widgets:
                pos += 1
    for slot in slots:
        if slot.name not in out:
            has, default = _default_of(slot)
            if has:
                out[slot.name] = default
    return out
