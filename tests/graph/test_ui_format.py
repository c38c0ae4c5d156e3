"""UI (litegraph) -> API conversion: each rule on a UI file built here, compared with the API form."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from graph.ui_format import UIWorkflowError, is_ui_workflow, map_widget_values, ui_to_api, widget_slots

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras"]


def _def(name: str, required: dict[str, Any], optional: dict[str, Any] | None = None,
         output: list[str] | None = None, display: str | None = None) -> dict[str, Any]:
    optional = optional or {}
    output = output or []
    return {"input": {"required": required, "optional": optional},
            "input_order": {"required": list(required), "optional": list(optional)},
            "output": output, "output_is_list": [False] * len(output), "output_name": output,
            "name": name, "display_name": display or name, "category": "test", "output_node": False,
            "python_module": "nodes", "description": ""}


DEFS: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": _def("CheckpointLoaderSimple", {"ckpt_name": [["a.safetensors", "b.safetensors"]]},
                                   output=["MODEL", "CLIP", "VAE"], display="Load Checkpoint"),
    "CLIPTextEncode": _def("CLIPTextEncode", {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]},
                           output=["CONDITIONING"]),
    "EmptyLatentImage": _def("EmptyLatentImage", {"width": ["INT", {"default": 512}],
                                                  "height": ["INT", {"default": 512}],
                                                  "batch_size": ["INT", {"default": 1}]}, output=["LATENT"]),
    "KSampler": _def("KSampler", {
        "model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
        "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"],
        "negative": ["CONDITIONING"], "latent_image": ["LATENT"], "denoise": ["FLOAT", {"default": 1.0}]},
        output=["LATENT"]),
    "KSamplerAdvanced": _def("KSamplerAdvanced", {
        "model": ["MODEL"], "add_noise": [["enable", "disable"]], "noise_seed": ["INT", {"default": 0}],
        "steps": ["INT"], "cfg": ["FLOAT"], "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS],
        "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
        "start_at_step": ["INT"], "end_at_step": ["INT"], "return_with_leftover_noise": [["disable", "enable"]]},
        output=["LATENT"]),
    "VAEDecode": _def("VAEDecode", {"samples": ["LATENT"], "vae": ["VAE"]}, output=["IMAGE"]),
    "SaveImage": _def("SaveImage", {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "Easel"}]}),
    "LoadImage": _def("LoadImage", {"image": [["x.png", "y.png"], {"image_upload": True}]},
                      output=["IMAGE", "MASK"]),
    "LoraLoader": _def("LoraLoader", {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [["l.safetensors"]],
                                      "strength_model": ["FLOAT"], "strength_clip": ["FLOAT"]},
                       output=["MODEL", "CLIP"]),
    "PrimitiveInt": _def("PrimitiveInt", {"value": ["INT", {"control_after_generate": True}]}, output=["INT"]),
    "Odd": _def("Odd", {"a": ["INT", {"control_after_generate": True}],
                        "f": ["FLOAT", {"control_after_generate": True}],
                        "c": [["p", "q"], {"control_after_generate": True}],
                        "seed": ["INT", {"control_after_generate": False}],
                        "forced": ["INT", {"forceInput": True}],
                        "lst": ["STRING"]},
                {"opt": ["BOOLEAN", {"default": True}]}),
}


class UI:
    """A small builder of UI-format workflows (schema 0.4 by default, 1 with `schema=1`)."""

    def __init__(self, schema: float = 0.4) -> None:
        self.schema = schema
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []

    def node(self, nid: int, ntype: str, widgets: Any = None, inputs: tuple = (), outputs: tuple = (),
             mode: int = 0, **extra: Any) -> dict[str, Any]:
        node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": len(self.nodes),
                "mode": mode,
                "inputs": [{"name": i[0], "type": i[1], "link": None,
                            **({"widget": {"name": i[0]}} if len(i) > 2 and i[2] else {})} for i in inputs],
                "outputs": [{"name": o[1], "type": o[1], "links": [], "slot_index": k}
                            for k, o in enumerate(outputs)],
                "properties": {"Node name for S&R": ntype}, **extra}
        if widgets is not None:
            node["widgets_values"] = widgets
        self.nodes.append(node)
        return node

    def connect(self, src: int, slot: int, dst: int, dslot: int, typ: str = "*") -> int:
        lid = max([l[0] for l in self.links], default=0) + 1
        s = next(n for n in self.nodes if n["id"] == src)
        d = next(n for n in self.nodes if n["id"] == dst)
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][dslot]["link"] = lid
        self.links.append([lid, src, slot, dst, dslot, typ])
        return lid

    def dump(self) -> dict[str, Any]:
        if self.schema == 1:
            links = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4],
                      "type": l[5]} for l in self.links]
            return {"version": 1, "state": {"lastNodeId": 99, "lastLinkId": len(links)}, "nodes": self.nodes,
                    "links": links, "groups": [], "config": {}, "extra": {}}
        return {"version": 0.4, "last_node_id": 99, "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [{"title": "G", "bounding": [0, 0, 10, 10]}], "config": {},
                "extra": {"ds": {"scale": 1, "offset": [0, 0]}}}


def txt2img(schema: float = 0.4) -> UI:
    ui = UI(schema)
    ui.node(4, "CheckpointLoaderSimple", ["a.safetensors"], outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")))
    ui.node(6, "CLIPTextEncode", ["a cat"], inputs=(("clip", "CLIP"),), outputs=(("C", "CONDITIONING"),))
    ui.node(7, "CLIPTextEncode", ["blurry"], inputs=(("clip", "CLIP"),), outputs=(("C", "CONDITIONING"),),
            title="Negative")
    ui.node(5, "EmptyLatentImage", [64, 96, 1], outputs=(("LATENT", "LATENT"),))
    ui.node(3, "KSampler", [42, "randomize", 4, 7.5, "euler", "karras", 1],
            inputs=(("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                    ("latent_image", "LATENT")), outputs=(("LATENT", "LATENT"),))
    ui.node(8, "VAEDecode", inputs=(("samples", "LATENT"), ("vae", "VAE")), outputs=(("IMAGE", "IMAGE"),))
    ui.node(9, "SaveImage", ["cat"], inputs=(("images", "IMAGE"),))
    ui.connect(4, 0, 3, 0, "MODEL")
    ui.connect(4, 1, 6, 0, "CLIP")
    ui.connect(4, 1, 7, 0, "CLIP")
    ui.connect(6, 0, 3, 1, "CONDITIONING")
    ui.connect(7, 0, 3, 2, "CONDITIONING")
    ui.connect(5, 0, 3, 3, "LATENT")
    ui.connect(3, 0, 8, 0, "LATENT")
    ui.connect(4, 2, 8, 1, "VAE")
    ui.connect(8, 0, 9, 0, "IMAGE")
    return ui


TXT2IMG_API = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"},
          "_meta": {"title": "Load Checkpoint"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]},
          "_meta": {"title": "CLIPTextEncode"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]},
          "_meta": {"title": "Negative"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1},
          "_meta": {"title": "EmptyLatentImage"}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 4, "cfg": 7.5, "sampler_name": "euler",
                                               "scheduler": "karras", "denoise": 1, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]},
          "_meta": {"title": "KSampler"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "_meta": {"title": "VAEDecode"}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "cat", "images": ["8", 0]},
          "_meta": {"title": "SaveImage"}},
}


def test_txt2img_schema_04_and_1_convert_to_the_same_api_prompt() -> None:
    wf = txt2img().dump()
    assert is_ui_workflow(wf) and not is_ui_workflow(TXT2IMG_API)
    assert ui_to_api(wf, DEFS) == TXT2IMG_API
    assert ui_to_api(txt2img(schema=1).dump(), DEFS) == TXT2IMG_API


def test_meta_keeps_node_pack_properties() -> None:
    ui = txt2img()
    ui.nodes[0]["properties"].update({"cnr_id": "comfy-core", "ver": "0.3.40", "aux_id": None})
    api = ui_to_api(ui.dump(), DEFS)
    assert api["4"]["_meta"] == {"title": "Load Checkpoint", "cnr_id": "comfy-core", "ver": "0.3.40"}


def test_companion_values_are_skipped() -> None:
    # KSamplerAdvanced: noise_seed gets a mode companion without declaring it.
    node = {"widgets_values": ["enable", 7, "fixed", 10, 6.0, "euler", "normal", 0, 10, "disable"]}
    assert map_widget_values(node, DEFS["KSamplerAdvanced"]) == {
        "add_noise": "enable", "noise_seed": 7, "steps": 10, "cfg": 6.0, "sampler_name": "euler",
        "scheduler": "normal", "start_at_step": 0, "end_at_step": 10, "return_with_leftover_noise": "disable"}
    # INT and FLOAT with control_after_generate: one companion; COMBO: two; seed with an explicit false:
    # none; forceInput makes no widget; optional widgets follow required ones.
    slots = widget_slots(DEFS["Odd"])
    assert [(s.name, s.control) for s in slots] == [("a", 1), ("f", 1), ("c", 2), ("seed", 0), ("lst", 0),
                                                    ("opt", 0)]
    node = {"widgets_values": [1, "increment", 0.5, "fixed", "q", "fixed", "", 9, ["x", "y"], False]}
    assert map_widget_values(node, DEFS["Odd"]) == {"a": 1, "f": 0.5, "c": "q", "seed": 9, "lst": ["x", "y"],
                                                   "opt": False}
    # LoadImage: the upload button value after the combo.
    assert map_widget_values({"widgets_values": ["y.png", "image"]}, DEFS["LoadImage"]) == {"image": "y.png"}


def test_old_files_with_boolean_or_missing_seed_mode() -> None:
    ks = DEFS["KSampler"]
    old = {"widgets_values": [5, True, 20, 8, "euler", "normal", 1]}
    oldest = {"widgets_values": [5, 20, 8, "euler", "normal", 1]}
    expected = {"seed": 5, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1}
    assert map_widget_values(old, ks) == expected
    assert map_widget_values(oldest, ks) == expected


def test_dict_and_named_widget_values_and_defaults() -> None:
    named = {"widgets_values": [1, 2, 3],
             "widgets_values_named": {"width": 128, "height": 64, "batch_size": 2}}
    assert map_widget_values(named, DEFS["EmptyLatentImage"]) == {"width": 128, "height": 64, "batch_size": 2}
    as_dict = {"widgets_values": {"seed": 3, "control_after_generate": "fixed", "steps": 2}}
    got = map_widget_values(as_dict, DEFS["KSampler"])
    assert got == {"seed": 3, "steps": 2, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                   "denoise": 1.0}
    # No widgets_values at all: defaults, first combo choice.
    assert map_widget_values({}, DEFS["EmptyLatentImage"]) == {"width": 512, "height": 512, "batch_size": 1}


def test_list_widget_value_is_wrapped() -> None:
    ui = UI()
    ui.node(1, "Odd", [1, "fixed", 0.5, "fixed", "p", "fixed", "", 2, ["x", "y"], True])
    api = ui_to_api(ui.dump(), DEFS)
    assert api["1"]["inputs"]["lst"] == {"__value__": ["x", "y"]}


def test_converted_widgets_take_the_link_or_keep_their_value() -> None:
    ui = txt2img()
    ks = next(n for n in ui.nodes if n["id"] == 3)
    ks["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None})
    ks["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None})
    ui.node(20, "PrimitiveInt", [1234, "fixed"], outputs=(("INT", "INT"),))
    ui.connect(20, 0, 3, 4, "INT")
    api = ui_to_api(ui.dump(), DEFS)
    assert api["3"]["inputs"]["seed"] == ["20", 0]          # connected: the link wins
    assert api["3"]["inputs"]["steps"] == 4                 # converted but unconnected: widget value
    assert api["20"] == {"class_type": "PrimitiveInt", "inputs": {"value": 1234}, "_meta": {"title": "PrimitiveInt"}}


def test_reroutes_are_followed() -> None:
    ui = txt2img()
    ui.links = [l for l in ui.links if not (l[1] == 4 and l[3] == 8)]
    ui.node(30, "Reroute", inputs=(("", "*"),), outputs=(("", "VAE"),))
    ui.node(31, "Reroute", inputs=(("", "*"),), outputs=(("", "VAE"),))
    ui.connect(4, 2, 30, 0, "VAE")
    ui.connect(30, 0, 31, 0, "VAE")
    ui.connect(31, 0, 8, 1, "VAE")
    api = ui_to_api(ui.dump(), DEFS)
    assert api == TXT2IMG_API


def test_primitive_node_value_goes_into_every_target_widget() -> None:
    ui = txt2img()
    ks = next(n for n in ui.nodes if n["id"] == 3)
    ks["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None})
    lat = next(n for n in ui.nodes if n["id"] == 5)
    lat["inputs"].append({"name": "width", "type": "INT", "widget": {"name": "width"}, "link": None})
    lat["inputs"].append({"name": "height", "type": "INT", "widget": {"name": "height"}, "link": None})
    ui.node(40, "PrimitiveNode", [777, "increment"], outputs=(("INT", "INT"),))
    ui.connect(40, 0, 3, 4, "INT")
    ui.node(41, "PrimitiveNode", [256, "fixed"], outputs=(("INT", "INT"),))
    ui.node(42, "Reroute", inputs=(("", "*"),), outputs=(("", "INT"),))
    ui.connect(41, 0, 5, 0, "INT")
    ui.connect(41, 0, 42, 0, "INT")
    ui.connect(42, 0, 5, 1, "INT")
    api = ui_to_api(ui.dump(), DEFS)
    expected = copy.deepcopy(TXT2IMG_API)
    expected["3"]["inputs"]["seed"] = 777
    expected["5"]["inputs"].update(width=256, height=256)
    assert api == expected


def test_notes_and_groups_are_ignored() -> None:
    ui = txt2img()
    ui.node(50, "Note", ["remember"])
    ui.node(51, "MarkdownNote", ["# hi"])
    assert ui_to_api(ui.dump(), DEFS) == TXT2IMG_API


def test_muted_node_is_dropped_and_consumers_lose_the_input() -> None:
    ui = txt2img()
    next(n for n in ui.nodes if n["id"] == 7)["mode"] = 2
    api = ui_to_api(ui.dump(), DEFS)
    expected = copy.deepcopy(TXT2IMG_API)
    del expected["7"]
    del expected["3"]["inputs"]["negative"]
    assert api == expected


def _with_lora(mode: int, second_mode: int | None = None) -> UI:
    """txt2img with LoraLoader(s) between the checkpoint and its MODEL/CLIP consumers."""
    ui = txt2img()
    ui.links = [l for l in ui.links if not (l[1] == 4 and l[2] in (0, 1))]
    for n in ui.nodes:
        for i in n["inputs"]:
            if i["link"] is not None and i["link"] not in [l[0] for l in ui.links]:
                i["link"] = None
        for o in n["outputs"]:
            o["links"] = []
    ui.node(10, "LoraLoader", ["l.safetensors", 0.8, 0.7], mode=mode,
            inputs=(("model", "MODEL"), ("clip", "CLIP")), outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP")))
    ui.connect(4, 0, 10, 0, "MODEL")
    ui.connect(4, 1, 10, 1, "CLIP")
    last = 10
    if second_mode is not None:
        ui.node(11, "LoraLoader", ["l.safetensors", 0.5, 0.5], mode=second_mode,
                inputs=(("model", "MODEL"), ("clip", "CLIP")), outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP")))
        ui.connect(10, 0, 11, 0, "MODEL")
        ui.connect(10, 1, 11, 1, "CLIP")
        last = 11
    ui.connect(last, 0, 3, 0, "MODEL")
    ui.connect(last, 1, 6, 0, "CLIP")
    ui.connect(last, 1, 7, 0, "CLIP")
    return ui


def test_bypassed_nodes_are_rewired_by_type_through_chains() -> None:
    assert ui_to_api(_with_lora(4).dump(), DEFS) == TXT2IMG_API
    assert ui_to_api(_with_lora(4, second_mode=4).dump(), DEFS) == TXT2IMG_API
    active = ui_to_api(_with_lora(0, second_mode=4).dump(), DEFS)
    assert active["3"]["inputs"]["model"] == ["10", 0] and active["6"]["inputs"]["clip"] == ["10", 1]
    assert "11" not in active


def test_bypass_picks_the_input_of_the_target_type_when_slots_differ() -> None:
    # A bypassed VAEDecode-like node whose output 0 is IMAGE; the consumer wants LATENT: the first
    # input whose type equals LATENT exactly is used. A consumer of a type no input has loses it.
    ui = UI()
    ui.node(1, "EmptyLatentImage", [64, 64, 1], outputs=(("LATENT", "LATENT"),))
    ui.node(2, "VAEDecode", mode=4, inputs=(("vae", "VAE"), ("samples", "LATENT")), outputs=(("IMAGE", "IMAGE"),))
    ui.node(3, "VAEDecode", inputs=(("samples", "LATENT"), ("vae", "VAE")), outputs=(("IMAGE", "IMAGE"),))
    ui.node(4, "SaveImage", ["x"], inputs=(("images", "IMAGE"),))
    ui.connect(1, 0, 2, 1, "LATENT")
    ui.connect(2, 0, 3, 0, "LATENT")
    ui.connect(2, 0, 4, 0, "IMAGE")
    api = ui_to_api(ui.dump(), DEFS)
    assert api["3"]["inputs"] == {"samples": ["1", 0]}
    assert api["4"]["inputs"] == {"filename_prefix": "x"}


def _subgraph_workflow(instance_mode: int = 0) -> dict[str, Any]:
    """A 'sampler' subgraph (KSampler + VAEDecode inside) used twice, plus a nested one."""
    inner_nodes = [
        {"id": 1, "type": "KSampler", "mode": 0, "widgets_values": [1, "fixed", 3, 5.0, "euler", "normal", 1],
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "positive", "type": "CONDITIONING", "link": 2},
                    {"name": "negative", "type": "CONDITIONING", "link": 3},
                    {"name": "latent_image", "type": "LATENT", "link": 4},
                    {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 5}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [6]}]},
        {"id": 2, "type": "VAEDecode", "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 6}, {"name": "vae", "type": "VAE", "link": 7}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [8]}]},
    ]
    inner_links = [
        {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "MODEL"},
        {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "CONDITIONING"},
        {"id": 3, "origin_id": -10, "origin_slot": 2, "target_id": 1, "target_slot": 2, "type": "CONDITIONING"},
        {"id": 4, "origin_id": -10, "origin_slot": 3, "target_id": 1, "target_slot": 3, "type": "LATENT"},
        {"id": 5, "origin_id": -10, "origin_slot": 5, "target_id": 1, "target_slot": 4, "type": "INT"},
        {"id": 6, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "LATENT"},
        {"id": 7, "origin_id": -10, "origin_slot": 4, "target_id": 2, "target_slot": 1, "type": "VAE"},
        {"id": 8, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"},
    ]
    names = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
             ("latent", "LATENT"), ("vae", "VAE"), ("seed", "INT")]
    sampler_def = {"id": "aaaa-1111", "name": "sampler", "version": 1, "state": {},
                   "inputNode": {"id": -10}, "outputNode": {"id": -20},
                   "inputs": [{"id": f"in{k}", "name": n, "type": t, "linkIds": []} for k, (n, t) in enumerate(names)],
                   "outputs": [{"id": "out0", "name": "IMAGE", "type": "IMAGE", "linkIds": [8]}],
                   "widgets": [], "nodes": inner_nodes, "links": inner_links, "groups": []}
    # Nested: a subgraph holding one instance of "sampler" plus its own SaveImage.
    wrapper_def = {"id": "bbbb-2222", "name": "wrapper", "version": 1, "state": {},
                   "inputs": [{"id": f"w{k}", "name": n, "type": t} for k, (n, t) in enumerate(names[:5])],
                   "outputs": [],
                   "nodes": [{"id": 1, "type": "aaaa-1111", "mode": 0, "widgets_values": [99],
                              "inputs": [{"name": n, "type": t, "link": k + 1} for k, (n, t) in enumerate(names[:5])]
                              + [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None}],
                              "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [6]}]},
                             {"id": 2, "type": "SaveImage", "mode": 0, "widgets_values": ["nested"],
                              "inputs": [{"name": "images", "type": "IMAGE", "link": 6}], "outputs": []}],
                   "links": [{"id": k + 1, "origin_id": -10, "origin_slot": k, "target_id": 1, "target_slot": k,
                              "type": t} for k, (_, t) in enumerate(names[:5])]
                   + [{"id": 6, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"}]}
    ui = txt2img()
    ui.nodes = [n for n in ui.nodes if n["id"] not in (3, 8)]
    for n in ui.nodes:
        for o in n["outputs"]:
            o["links"] = []
    ui.links = [l for l in ui.links if l[1] in (4, 6, 7, 5) and l[3] in (6, 7)]
    for n in ui.nodes:
        for i in n["inputs"]:
            i["link"] = None
    ui.connect(4, 1, 6, 0, "CLIP")
    ui.connect(4, 1, 7, 0, "CLIP")
    inst_inputs = tuple((n, t) for n, t in names[:5]) + (("seed", "INT", True),)
    ui.node(60, "aaaa-1111", [123], mode=instance_mode, inputs=inst_inputs, outputs=(("IMAGE", "IMAGE"),))
    ui.node(61, "aaaa-1111", [321], inputs=inst_inputs, outputs=(("IMAGE", "IMAGE"),))
    ui.node(70, "bbbb-2222", inputs=tuple(names[:5]))
    for inst in (60, 61, 70):
        ui.connect(4, 0, inst, 0, "MODEL")
        ui.connect(6, 0, inst, 1, "CONDITIONING")
        ui.connect(7, 0, inst, 2, "CONDITIONING")
        ui.connect(5, 0, inst, 3, "LATENT")
        ui.connect(4, 2, inst, 4, "VAE")
    ui.connect(60, 0, 9, 0, "IMAGE")
    ui.node(62, "SaveImage", ["second"], inputs=(("images", "IMAGE"),))
    ui.connect(61, 0, 62, 0, "IMAGE")
    wf = ui.dump()
    wf["definitions"] = {"subgraphs": [sampler_def, wrapper_def]}
    return wf


def test_subgraphs_are_expanded_with_joined_ids() -> None:
    api = ui_to_api(_subgraph_workflow(), DEFS)
    assert set(api) == {"4", "5", "6", "7", "9", "62", "60:1", "60:2", "61:1", "61:2", "70:1:1", "70:1:2", "70:2"}
    ks = {"steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
          "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert api["60:1"]["inputs"] == {**ks, "seed": 123}      # promoted widget value of the instance
    assert api["61:1"]["inputs"] == {**ks, "seed": 321}
    assert api["70:1:1"]["inputs"] == {**ks, "seed": 99}     # nested instance inside the wrapper
    assert api["60:2"]["inputs"] == {"samples": ["60:1", 0], "vae": ["4", 2]}
    assert api["9"]["inputs"]["images"] == ["60:2", 0]       # an instance output leads inside
    assert api["62"]["inputs"]["images"] == ["61:2", 0]
    assert api["70:2"]["inputs"] == {"filename_prefix": "nested", "images": ["70:1:2", 0]}


def test_primitive_node_feeds_a_promoted_subgraph_input() -> None:
    wf = _subgraph_workflow()
    wf["nodes"].append({"id": 90, "type": "PrimitiveNode", "mode": 0, "widgets_values": [555, "fixed"],
                        "inputs": [], "outputs": [{"name": "INT", "type": "INT", "links": [900],
                                                   "widget": {"name": "seed"}}]})
    inst = next(n for n in wf["nodes"] if n["id"] == 61)
    inst["inputs"][5]["link"] = 900
    wf["links"].append([900, 90, 0, 61, 5, "INT"])
    api = ui_to_api(wf, DEFS)
    assert api["61:1"]["inputs"]["seed"] == 555 and api["60:1"]["inputs"]["seed"] == 123
    assert "90" not in api


def test_muted_and_bypassed_subgraph_instances() -> None:
    muted = ui_to_api(_subgraph_workflow(instance_mode=2), DEFS)
    assert not any(k.startswith("60:") for k in muted)
    assert muted["9"]["inputs"] == {"filename_prefix": "cat"}
    bypassed = ui_to_api(_subgraph_workflow(instance_mode=4), DEFS)
    assert not any(k.startswith("60:") for k in bypassed)
    # IMAGE output, no IMAGE input on the instance: the consumer loses the input.
    assert bypassed["9"]["inputs"] == {"filename_prefix": "cat"}


def test_dangling_link_names_the_node_and_the_link() -> None:
    ui = txt2img()
    ui.links = [l for l in ui.links if l[0] != 7]          # KSampler -> VAEDecode
    with pytest.raises(UIWorkflowError, match=r"node 8 \(VAEDecode\) input 'samples': link 7 does not exist"):
        ui_to_api(ui.dump(), DEFS)
    ui = txt2img()
    ui.nodes = [n for n in ui.nodes if n["id"] != 5]
    with pytest.raises(UIWorkflowError, match=r"node 3 \(KSampler\): link 6 comes from node 5, which is not"):
        ui_to_api(ui.dump(), DEFS)


def test_unknown_types_legacy_group_nodes_and_non_ui_input_are_refused() -> None:
    ui = txt2img()
    ui.node(80, "SomePluginNode", [1])
    with pytest.raises(UIWorkflowError, match="node 80 .*unknown node type 'SomePluginNode'") as info:
        ui_to_api(ui.dump(), DEFS)
    assert info.value.node_id == "80"
    wf = txt2img().dump()
    wf["extra"]["groupNodes"] = {"MyGroup": {}}
    with pytest.raises(UIWorkflowError, match="legacy group nodes \\(MyGroup\\)"):
        ui_to_api(wf, DEFS)
    with pytest.raises(UIWorkflowError, match="not a UI-format workflow"):
        ui_to_api(TXT2IMG_API, DEFS)


def test_reroute_loop_is_an_error_not_a_hang() -> None:
    ui = UI()
    ui.node(1, "Reroute", inputs=(("", "*"),), outputs=(("", "*"),))
    ui.node(2, "Reroute", inputs=(("", "*"),), outputs=(("", "*"),))
    ui.node(3, "SaveImage", ["x"], inputs=(("images", "IMAGE"),))
    ui.connect(1, 0, 2, 0)
    ui.connect(2, 0, 1, 0)
    ui.connect(2, 0, 3, 0, "IMAGE")
    with pytest.raises(UIWorkflowError, match="loops"):
        ui_to_api(ui.dump(), DEFS)


def test_saved_ui_workflow_matches_its_api_twin() -> None:
    """workflows/txt2img.ui.json converts, with the real node definitions, to workflows/txt2img.json."""
    import json
    from pathlib import Path

    from nodes.registry import build_registry

    root = Path(__file__).resolve().parents[2] / "workflows"
    ui = json.loads((root / "txt2img.ui.json").read_text())
    api = json.loads((root / "txt2img.json").read_text())
    definitions = build_registry().definitions()
    missing = sorted({n["class_type"] for n in api.values()} - set(definitions))
    if missing:
        pytest.skip(f"node classes not registered yet: {missing}")
    assert ui_to_api(ui, definitions) == api
