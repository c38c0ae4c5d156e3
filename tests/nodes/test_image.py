"""nodes/builtin/image.py: SaveImage / PreviewImage files, ui dicts and chunks; LoadImage; ImageScale."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.images import image_io
from graph.runtime import NodeRuntime, running
from nodes.builtin import image as image_nodes
from nodes.folders import ModelFolders, use_folders


@pytest.fixture()
def folders(tmp_path):
    f = ModelFolders(tmp_path)
    with use_folders(f):
        yield f


def _images(b: int = 2, h: int = 8, w: int = 12) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(1))


PROMPT = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "demo.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 2}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 4, "cfg": 6.5, "sampler_name": "euler",
                                                "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
}


def test_node_api_matches_comfyui():
    save = image_nodes.SaveImage.INPUT_TYPES()
    assert list(save["required"]) == ["images", "filename_prefix"]
    assert save["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert image_nodes.SaveImage.OUTPUT_NODE and image_nodes.SaveImage.RETURN_TYPES == ()
    assert list(image_nodes.PreviewImage.INPUT_TYPES()["required"]) == ["images"]
    assert image_nodes.LoadImage.RETURN_TYPES == ("IMAGE", "MASK")
    assert list(image_nodes.ImageScale.INPUT_TYPES()["required"]) == ["image", "upscale_method", "width", "height", "crop"]
    assert set(image_nodes.NODE_CLASS_MAPPINGS) == {"SaveImage", "PreviewImage", "LoadImage", "ImageScale"}


def test_save_image_names_files_and_reports_ui(folders):
    node = image_nodes.SaveImage()
    with running(NodeRuntime(node_id="9")):
        out = node.save_images(_images(), "ComfyUI", prompt=PROMPT, extra_pnginfo={"workflow": {"id": "w1"}})
    assert out == {"ui": {"images": [
        {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"}]}}
    path = folders.output_dir / "ComfyUI_00001_.png"
    meta = image_io.read_metadata(path)
    assert meta.prompt == PROMPT and meta.workflow == {"id": "w1"}
    assert meta.parameters == ("a red fox\nSteps: 4, Sampler: Euler, Schedule type: Normal, CFG scale: 6.5, "
                               "Seed: 3, Size: 12x8, Model: demo, Version: Easel")
    loaded, _ = image_io.load_image(path)
    expected = torch.from_numpy(np.clip(255.0 * _images()[0].numpy(), 0, 255).astype(np.uint8)).float() / 255
    assert torch.equal(loaded[0], expected)
    again = node.save_images(_images(1), "ComfyUI")
    assert again["ui"]["images"][0]["filename"] == "ComfyUI_00003_.png"
    assert image_io.read_png_text(folders.output_dir / "ComfyUI_00003_.png") == {}   # no prompt, no chunks


def test_save_image_subfolder_prefix(folders):
    out = image_nodes.SaveImage().save_images(_images(1, 4, 6), "runs/%width%x%height%/pic")
    assert out["ui"]["images"] == [{"filename": "pic_00001_.png", "subfolder": "runs/6x4", "type": "output"}]
    assert (folders.output_dir / "runs/6x4/pic_00001_.png").is_file()
    with pytest.raises(ValueError, match="outside the output folder"):
        image_nodes.SaveImage().save_images(_images(1), "../evil")


def test_save_image_rejects_non_images(folders):
    with pytest.raises(ValueError, match="SaveImage: input 'images'"):
        image_nodes.SaveImage().save_images(torch.zeros(4, 4, 3), "x")


def test_preview_image_goes_to_temp(folders):
    node = image_nodes.PreviewImage()
    out = node.save_images(_images(1), prompt=PROMPT)
    item = out["ui"]["images"][0]
    assert item["type"] == "temp" and item["subfolder"] == ""
    assert item["filename"].startswith("ComfyUI_temp_") and item["filename"].endswith("_00001_.png")
    assert (folders.temp_dir / item["filename"]).is_file()
    assert not folders.output_dir.exists() or not any(folders.output_dir.iterdir())
    assert image_io.read_metadata(folders.temp_dir / item["filename"]).prompt == PROMPT


def _write_input(folders: ModelFolders, name: str, rgba: bool = False) -> None:
    path = folders.input_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(0).integers(0, 256, (6, 5, 4 if rgba else 3), dtype=np.uint8)
    Image.fromarray(array, "RGBA" if rgba else "RGB").save(path)


def test_load_image_lists_validates_and_hashes(folders):
    _write_input(folders, "b.png", rgba=True)
    _write_input(folders, "sub/a.jpg")
    (folders.input_dir / "notes.txt").write_text("x")
    combo, options = image_nodes.LoadImage.INPUT_TYPES()["required"]["image"]
    assert combo == ["b.png", "sub/a.jpg"] and options == {"image_upload": True}
    assert image_nodes.LoadImage.VALIDATE_INPUTS("b.png") is True
    assert "Invalid image file: missing.png" in image_nodes.LoadImage.VALIDATE_INPUTS("missing.png")
    assert "leaves the input folder" in image_nodes.LoadImage.VALIDATE_INPUTS("../../etc/passwd")
    digest = image_nodes.LoadImage.IS_CHANGED("b.png")
    assert digest == hashlib.sha256((folders.input_dir / "b.png").read_bytes()).hexdigest()
    image, mask = image_nodes.LoadImage().load_image("b.png")
    assert image.shape == (1, 6, 5, 3) and mask.shape == (1, 6, 5)
    _write_input(folders, "b.png")           # overwritten with other content: the hash changes
    assert image_nodes.LoadImage.IS_CHANGED("b.png") != digest


def test_load_image_annotated_output_file(folders):
    out = image_nodes.SaveImage().save_images(_images(1, 4, 4), "gen")
    name = out["ui"]["images"][0]["filename"] + " [output]"
    assert image_nodes.LoadImage.VALIDATE_INPUTS(name) is True
    image, _ = image_nodes.LoadImage().load_image(name)
    assert image.shape == (1, 4, 4, 3)


def test_image_scale(folders):
    img = _images(2, 8, 12)
    node = image_nodes.ImageScale()
    assert node.upscale(img, "bilinear", 0, 0, "disabled")[0] is img
    assert node.upscale(img, "bilinear", 24, 16, "disabled")[0].shape == (2, 16, 24, 3)
    assert node.upscale(img, "area", 0, 4, "disabled")[0].shape == (2, 4, 6, 3)          # aspect kept
    assert node.upscale(img, "lanczos", 6, 0, "disabled")[0].shape == (2, 4, 6, 3)
    square = node.upscale(img, "nearest-exact", 8, 8, "center")[0]
    assert torch.equal(square, img[:, :, 2:10, :])                                       # center crop, same size


def test_through_the_executor_load_scale_save(folders):
    from graph.cache import OutputCache
    from graph.events import EventLog
    from graph.executor import Executor
    from nodes.registry import build_registry

    _write_input(folders, "in.png", rgba=True)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                      "width": 10, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "e/x"}},
    }
    log = EventLog()
    ex = Executor(build_registry(), OutputCache(), log)
    first = ex.run(prompt, extra_data={"extra_pnginfo": {"workflow": {"id": "abc"}}})
    assert first.ok, first.error or first.validation
    assert first.outputs["3"] == {"images": [{"filename": "x_00001_.png", "subfolder": "e", "type": "output"}]}
    meta = image_io.read_metadata(folders.output_dir / "e/x_00001_.png")
    assert meta.prompt == prompt and meta.workflow == {"id": "abc"} and meta.parameters is None
    assert Image.open(folders.output_dir / "e/x_00001_.png").size == (10, 12)
    second = ex.run(prompt)
    assert set(second.cached) >= {"1", "2"}                     # same file hash: LoadImage is cached
    _write_input(folders, "in.png")                           # new content: IS_CHANGED differs
    third = ex.run(prompt)
    assert "1" in third.executed
    bad = ex.run({**prompt, "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}}})
    assert bad.status == "invalid" and "Invalid image file: nope.png" in json.dumps(bad.validation.node_errors
                                                                                     if bad.validation else {})


def test_unreadable_graph_still_saves_with_a_warning(folders):
    events = []
    odd = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0]}}, "6": {"class_type": "X", "inputs": 5}}
    with running(NodeRuntime(node_id="9", emit=lambda e, d: events.append((e, d)))):
        out = image_nodes.SaveImage().save_images(_images(1), "odd", prompt=odd)
    path = folders.output_dir / out["ui"]["images"][0]["filename"]
    assert image_io.read_metadata(path).prompt == odd
    assert [e for e, _ in events] == ["warning"] and "A1111 parameters" in events[0][1]["message"]
