"""diffusion/images/image_io.py: PNG writing with metadata chunks, loading to IMAGE + MASK, save paths, A1111 text."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.images import image_io


def _quantized(b: int, h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    """Values k/255 exactly, so a PNG round trip is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, c), generator=g).float() / 255.0


def test_png_round_trip_is_exact(tmp_path):
    image = _quantized(1, 9, 13)
    path = image_io.save_png(image[0], tmp_path / "a.png")
    loaded, mask = image_io.load_image(path)
    assert loaded.shape == (1, 9, 13, 3) and loaded.dtype == torch.float32
    assert torch.equal(loaded, image)
    assert mask.shape == (1, 64, 64) and mask.abs().sum() == 0   # no alpha: ComfyUI's empty 64x64 mask


def test_pixels_are_truncated_like_comfyui(tmp_path):
    image = torch.tensor([[[0.999, 1.5, -0.2]]])   # 254.7 -> 254, clipped high and low
    path = image_io.save_png(image, tmp_path / "t.png")
    assert np.array(Image.open(path)).tolist() == [[[254, 255, 0]]]


def test_alpha_becomes_inverted_mask(tmp_path):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.arange(20, dtype=np.uint8).reshape(4, 5) * 13   # 0..247
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image, mask = image_io.load_image(tmp_path / "a.png")
    assert image.shape == (1, 4, 5, 3)
    assert torch.allclose(image[0, ..., 0], torch.full((4, 5), 200 / 255))
    expected = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)
    assert mask.shape == (1, 4, 5) and torch.allclose(mask[0], expected)


def test_palette_transparency_gives_mask(tmp_path):
    img = Image.new("P", (3, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    image, mask = image_io.load_image(tmp_path / "p.png")
    assert mask.shape == (1, 2, 3)
    assert mask[0, 1, 1] == 0.0 and mask[0, 0, 0] == 1.0      # index 0 is transparent
    assert image[0, 1, 1].tolist() == [1.0, 0.0, 0.0]


def test_16_bit_greyscale_is_scaled(tmp_path):
    array = np.full((2, 2), 255 * 100, dtype=np.uint16)   # "I;16": scaled by 1/255 -> 100
    Image.fromarray(array).save(tmp_path / "g.png")
    image, _ = image_io.load_image(tmp_path / "g.png")
    assert torch.allclose(image, torch.full((1, 2, 2, 3), 100 / 255))


def test_animated_frames_stack_into_a_batch(tmp_path):
    frames = [Image.new("RGB", (4, 4), (v, 0, 0)) for v in (10, 120, 250)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    image, mask = image_io.load_image(tmp_path / "anim.png")
    assert image.shape == (3, 4, 4, 3) and mask.shape[0] == 3
    assert [round(float(image[i, 0, 0, 0]) * 255) for i in range(3)] == [10, 120, 250]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    image, _ = image_io.load_image(tmp_path / "r.jpg")
    assert image.shape == (1, 6, 2, 3)


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="bad.png"):
        image_io.load_image(bad)


def test_metadata_chunks_as_comfyui_writes_them(tmp_path):
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 5}}, "9": {"class_type": "SaveImage",
              "inputs": {"filename_prefix": "café ☕"}}}
    extra = {"workflow": {"nodes": [], "links": [], "version": 0.4}, "other": [1, 2]}
    path = image_io.save_png(_quantized(1, 4, 4)[0], tmp_path / "m.png", prompt=prompt, extra_pnginfo=extra,
                             parameters="a cat\nSteps: 20")
    raw = Image.open(path)
    raw.load()
    assert raw.text["prompt"] == json.dumps(prompt)          # ASCII-escaped JSON, tEXt chunk
    assert raw.text["workflow"] == json.dumps(extra["workflow"])
    assert raw.text["other"] == "[1, 2]"
    assert raw.text["parameters"] == "a cat\nSteps: 20"
    data = path.read_bytes()
    assert data.count(b"tEXt") == 4 and b"iTXt" not in data
    meta = image_io.read_metadata(path)
    assert meta.prompt == prompt and meta.workflow == extra["workflow"] and meta.parameters == "a cat\nSteps: 20"


def test_no_metadata_reads_as_none(tmp_path):
    path = image_io.save_png(_quantized(1, 2, 2)[0], tmp_path / "n.png")
    meta = image_io.read_metadata(path)
    assert meta.prompt is None and meta.workflow is None and meta.parameters is None and meta.text == {}


def test_same_tensor_same_bytes(tmp_path):
    image = _quantized(1, 8, 8)[0]
    a = image_io.save_png(image, tmp_path / "a.png", prompt={"1": {"class_type": "X", "inputs": {}}})
    b = image_io.save_png(image.clone(), tmp_path / "b.png", prompt={"1": {"class_type": "X", "inputs": {}}})
    assert a.read_bytes() == b.read_bytes()


def test_save_target_counts_past_existing_files(tmp_path):
    t = image_io.save_target(tmp_path, "ComfyUI", 64, 32)
    assert (t.counter, t.subfolder, t.folder) == (1, "", tmp_path.resolve())
    assert t.file_name(0, 0) == "ComfyUI_00001_.png" and t.file_name(1, 1) == "ComfyUI_00002_.png"
    for name in ("ComfyUI_00007_.png", "ComfyUI_00003_.png", "ComfyUIx_00050_.png", "Other_00090_.png"):
        (tmp_path / name).write_bytes(b"")
    assert image_io.save_target(tmp_path, "ComfyUI", 64, 32).counter == 8


def test_save_target_subfolders_and_variables(tmp_path):
    now = time.struct_time((2026, 3, 4, 5, 6, 7, 0, 0, 0))
    t = image_io.save_target(tmp_path, "runs/%year%-%month%-%day%/img_%width%x%height%_%hour%%minute%%second%",
                             640, 480, now=now)
    assert t.subfolder == "runs/2026-03-04" and t.folder.is_dir()
    assert t.filename == "img_640x480_050607"
    assert image_io.save_target(tmp_path, "b_%batch_num%", 1, 1).file_name(3, 0) == "b_3_00001_.png"


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "a/../../x"])
def test_save_target_refuses_leaving_the_root(tmp_path, prefix):
    with pytest.raises(ValueError, match="outside the output folder"):
        image_io.save_target(tmp_path / "out", prefix, 8, 8)


def _graph(clip_skip: int | None = -2, lora: bool = True, denoise: float = 1.0) -> dict:
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd/v1-5, pruned.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                       "lora_name": "style.safetensors",
                                                       "strength_model": 0.8, "strength_clip": 1.0}},
        "11": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": clip_skip}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat,\nsitting", "clip": ["11", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["11", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler_ancestral",
                                                    "scheduler": "karras", "denoise": denoise, "model": ["10", 0],
                                                    "positive": ["6", 0], "negative": ["7", 0],
                                                    "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }
    if not lora:
        g["3"]["inputs"]["model"] = ["4", 0]
        g["11"]["inputs"]["clip"] = ["4", 1]
        del g["10"]
    if clip_skip is None:
        for k in ("6", "7"):
            g[k]["inputs"]["clip"] = ["4", 1]
        del g["11"]
    return g


def test_a1111_parameters_from_graph():
    text = image_io.a1111_parameters(_graph(), 512, 768, save_node="9")
    assert text == ("a cat,\nsitting <lora:style:0.8>\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
                    "Model: \"v1-5, pruned\", Clip skip: 2, Version: Easel")


def test_a1111_parameters_img2img_and_plain():
    text = image_io.a1111_parameters(_graph(clip_skip=None, lora=False, denoise=0.55), 64, 64, save_node="9")
    assert text is not None
    assert text.startswith("a cat,\nsitting\nNegative prompt: blurry\nSteps: 20,")
    assert "Denoising strength: 0.55" in text and "Clip skip" not in text and "<lora:" not in text


def test_a1111_parameters_picks_the_sampler_feeding_the_save_node():
    g = _graph(lora=False)
    g["20"] = {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "seed": 7, "latent_image": ["3", 0]}}
    g["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}
    g["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "y"}}
    assert "Seed: 42," in image_io.a1111_parameters(g, 8, 8, save_node="9")
    assert "Seed: 7," in image_io.a1111_parameters(g, 8, 8, save_node="22")


def test_a1111_parameters_without_sampler_is_none():
    assert image_io.a1111_parameters({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}, 8, 8) is None


def test_a1111_parameters_from_a_node_with_both_prompts():
    g = _graph(clip_skip=None, lora=False)
    g["10"] = {"class_type": "A1111Prompt", "inputs": {"model": ["4", 0], "clip": ["4", 1], "steps": 20,
                                                        "positive": "a fox <lora:x:0.5>", "negative": "ugly"}}
    g["3"]["inputs"].update(model=["10", 0], positive=["10", 2], negative=["10", 3])
    text = image_io.a1111_parameters(g, 8, 8, save_node="9")
    assert text is not None and text.startswith("a fox <lora:x:0.5>\nNegative prompt: ugly\nSteps: 20,")
    assert "Model: \"v1-5, pruned\"" in text
