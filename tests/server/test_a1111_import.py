"""A1111 `parameters` text -> API graph: parsing, sampler mapping, hires fix, unknown fields."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodes.folders import ModelFolders

from server.a1111_import import (A1111ParseError, a1111_to_api, import_a1111, import_a1111_file,
                                 map_sampler, parse_parameters, split_settings)

REALISTIC = (
    "masterpiece, (a red fox:1.2) in the snow, <lora:foxStyle_v2:0.8>\n"
    "[winter:summer:0.5], detailed fur\n"
    "Negative prompt: lowres, (blurry:1.3),\n"
    "bad hands\n"
    "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "Clip skip: 2, Lora hashes: \"foxStyle_v2: 0a1b2c3d4e5f, other: 123\", ENSD: 31337, "
    "Version: v1.10.1"
)


def test_parse_realistic_parameters() -> None:
    p = parse_parameters(REALISTIC)
    assert p.prompt == ("masterpiece, (a red fox:1.2) in the snow, <lora:foxStyle_v2:0.8>\n"
                        "[winter:summer:0.5], detailed fur")
    assert p.negative_prompt == "lowres, (blurry:1.3),\nbad hands"
    assert p.settings["Lora hashes"] == "foxStyle_v2: 0a1b2c3d4e5f, other: 123"
    assert p.settings["Size"] == "512x768" and p.settings["Seed"] == "3141592653"
    assert list(p.settings)[:3] == ["Steps", "Sampler", "Schedule type"]


def test_settings_with_quotes_escapes_and_objects() -> None:
    got = split_settings('Steps: 5, Template: "a, \\"b\\"", Extra: {"x": 1, "y": [2, 3]}, Seed: 7')
    assert got == {"Steps": "5", "Template": 'a, "b"', "Extra": '{"x": 1, "y": [2, 3]}', "Seed": "7"}


def test_prompt_without_negative_and_empty_positive() -> None:
    p = parse_parameters("just a cat\nSteps: 10, Sampler: Euler a, Seed: 1, Size: 64x64")
    assert (p.prompt, p.negative_prompt) == ("just a cat", "")
    p = parse_parameters("Negative prompt: ugly\nSteps: 10")
    assert (p.prompt, p.negative_prompt) == ("", "ugly")
    # A prompt line that happens to contain "Steps:" inside is not the settings line.
    p = parse_parameters("the Steps: of a stair\nSteps: 3")
    assert p.prompt == "the Steps: of a stair" and p.settings == {"Steps": "3"}
    with pytest.raises(A1111ParseError, match="Steps:"):
        parse_parameters("a cat, no settings")


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("Euler a", None, ("euler_ancestral", "normal")),
    ("Euler", "Automatic", ("euler", "normal")),
    ("DPM++ 2M", None, ("dpmpp_2m", "karras")),
    ("DPM++ 2M", "Exponential", ("dpmpp_2m", "exponential")),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
    ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
    ("DPM++ 2M SDE", None, ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 2M SDE Heun", "Karras", ("dpmpp_2m_sde_heun", "karras")),
    ("DPM++ 3M SDE", "SGM Uniform", ("dpmpp_3m_sde", "sgm_uniform")),
    ("DPM2 a", None, ("dpm_2_ancestral", "karras")),
    ("DDIM", None, ("ddim", "ddim_uniform")),
    ("UniPC", "Uniform", ("uni_pc", "normal")),
    ("LMS", "Simple", ("lms", "simple")),
])
def test_sampler_mapping(sampler: str, schedule: str | None, expected: tuple[str, str]) -> None:
    name, sched, notes = map_sampler(sampler, schedule)
    assert (name, sched) == expected and notes == []


def test_unmapped_sampler_and_schedule_are_noted() -> None:
    name, sched, notes = map_sampler("Restart", "Align Your Steps")
    assert name == "euler" and sched == "normal"
    assert any("Restart" in n for n in notes) and any("Align Your Steps" in n for n in notes)


def test_graph_for_realistic_parameters() -> None:
    imp = import_a1111(REALISTIC, checkpoints=["sd15/v1-5-pruned-emaonly.safetensors", "other.ckpt"])
    g = imp.prompt
    assert g["1"] == {"class_type": "CheckpointLoaderSimple",
                      "inputs": {"ckpt_name": "sd15/v1-5-pruned-emaonly.safetensors"}}
    assert g["2"]["inputs"] == {"clip": ["1", 1], "stop_at_clip_layer": -2}
    assert g["3"]["class_type"] == "A1111Prompt"
    assert g["3"]["inputs"] == {"model": ["1", 0], "clip": ["2", 0], "positive": imp.parameters.prompt,
                                "negative": "lowres, (blurry:1.3),\nbad hands", "steps": 24,
                                "weight_interpretation": "a1111"}
    assert g["4"]["inputs"] == {"width": 512, "height": 768, "batch_size": 1}
    assert g["5"]["inputs"] == {"seed": 3141592653, "steps": 24, "cfg": 6.5, "sampler_name": "dpmpp_2m",
                                "scheduler": "karras", "denoise": 1.0, "model": ["3", 0], "positive": ["3", 2],
                                "negative": ["3", 3], "latent_image": ["4", 0]}
    assert g["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert g["7"]["inputs"] == {"images": ["6", 0], "filename_prefix": "a1111"}
    assert set(g) == {"1", "2", "3", "4", "5", "6", "7"}
    assert imp.unknown == ("ENSD",)          # changes ancestral noise: reported, not silently dropped
    assert imp.notes == ()


def test_hires_fix_vae_and_model_fallbacks() -> None:
    text = ("a castle\nSteps: 10, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 500x300, Model: missing, "
            "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 6, Hires upscaler: Latent (bicubic), "
            "VAE: kl-f8.safetensors, Face restoration: CodeFormer")
    imp = import_a1111(text, checkpoints=["a.safetensors"], vaes=["kl-f8.safetensors"])
    g = imp.prompt
    assert g["4"]["inputs"]["width"] == 496 and g["4"]["inputs"]["height"] == 296   # multiples of 8
    assert "2" not in g                                                             # no clip skip
    assert g["8"] == {"class_type": "LatentUpscale",
                      "inputs": {"samples": ["5", 0], "upscale_method": "bicubic", "width": 744, "height": 440,
                                 "crop": "disabled"}}
    assert g["9"]["inputs"]["denoise"] == 0.45 and g["9"]["inputs"]["steps"] == 6
    assert g["9"]["inputs"]["latent_image"] == ["8", 0]
    assert (g["9"]["inputs"]["sampler_name"], g["9"]["inputs"]["scheduler"]) == ("euler_ancestral", "normal")
    assert g["10"] == {"class_type": "VAELoader", "inputs": {"vae_name": "kl-f8.safetensors"}}
    assert g["6"]["inputs"] == {"samples": ["9", 0], "vae": ["10", 0]}
    assert g["1"]["inputs"]["ckpt_name"] == "a.safetensors"
    assert any("'missing' not found" in n for n in imp.notes)
    assert imp.unknown == ("Face restoration",)


def test_img2img_denoise_and_non_latent_upscaler_are_noted() -> None:
    imp = import_a1111("x\nSteps: 4, Denoising strength: 0.3, Size: 64x64")
    assert any("img2img" in n for n in imp.notes) and "8" not in imp.prompt
    imp = import_a1111("x\nSteps: 4, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, Size: 64x64")
    assert imp.prompt["8"]["inputs"]["upscale_method"] == "bicubic"
    assert imp.prompt["8"]["inputs"]["width"] == 128
    assert any("R-ESRGAN" in n for n in imp.notes)


def test_import_from_png_and_txt(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("parameters", REALISTIC)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
    png = tmp_path / "a1111.png"
    png.write_bytes(buf.getvalue())
    imp = import_a1111_file(png, checkpoints=["v1-5-pruned-emaonly.safetensors"])
    assert imp.prompt["5"]["inputs"]["seed"] == 3141592653
    txt = tmp_path / "p.txt"
    txt.write_text("no settings here")
    with pytest.raises(A1111ParseError, match=r"p\.txt: no settings line"):
        import_a1111_file(txt)


def test_a1111_to_api_matches_against_folders_and_logs_unknowns(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "models/checkpoints").mkdir(parents=True)
    (tmp_path / "models/checkpoints/v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    (tmp_path / "models/checkpoints/zzz.safetensors").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="easel.a1111"):
        prompt = a1111_to_api(REALISTIC, ModelFolders(tmp_path))
    assert prompt["1"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert "ENSD" in caplog.text


def test_hires_sampler_and_cfg_override_the_first_pass() -> None:
    text = ("x\nSteps: 8, Sampler: Euler a, CFG scale: 7, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, "
            "Hires upscaler: Latent, Hires sampler: DPM++ 2M, Hires schedule type: Exponential, Hires CFG Scale: 4")
    g = import_a1111(text).prompt
    assert (g["5"]["inputs"]["sampler_name"], g["5"]["inputs"]["cfg"]) == ("euler_ancestral", 7.0)
    assert g["9"]["inputs"]["sampler_name"] == "dpmpp_2m" and g["9"]["inputs"]["scheduler"] == "exponential"
    assert g["9"]["inputs"]["cfg"] == 4.0 and g["8"]["inputs"]["upscale_method"] == "bilinear"
