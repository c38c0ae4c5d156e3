"""`easel run` on saved files: PNG round trip, an A1111 PNG, and bad files (exit 2).

(The UI-format twin of txt2img is checked by conversion in tests/graph/test_ui_format.py.)"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodes.registry import build_registry
from server.cli import main

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SMALL = ["--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2", "--cpu"]


def needs(*classes: str) -> None:
    missing = sorted(set(classes) - set(build_registry().names()))
    if missing:
        pytest.skip(f"node classes not registered yet: {missing}")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def saved(output: Path) -> list[Path]:
    return sorted(output.rglob("*.png"))


def test_png_round_trip(tmp_path: Path) -> None:
    needs("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage")
    base = tmp_path / "base"
    first, second = tmp_path / "o1", tmp_path / "o2"
    assert main(["run", str(WORKFLOWS / "txt2img.json"), "--base-dir", str(base), "--output-dir", str(first),
                 *SMALL]) == 0
    [png] = saved(first)
    assert pixels(png).shape == (64, 64, 3)
    # The PNG carries the prompt that ran (with the --set overrides): running it gives the same image.
    assert main(["run", str(png), "--base-dir", str(base), "--output-dir", str(second), "--cpu"]) == 0
    [again] = saved(second)
    assert np.array_equal(pixels(png), pixels(again))


A1111_TEXT = ("a lighthouse on a cliff, (dawn:1.2), watercolor\n"
              "Negative prompt: blurry, lowres\n"
              "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64, "
              "Model hash: 0123456789, Model: easel-demo-sd1, Clip skip: 2, ENSD: 31337, Version: v1.10.1")


def test_a1111_png_runs_and_imports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    needs("CheckpointLoaderSimple", "CLIPSetLastLayer", "A1111Prompt", "EmptyLatentImage", "KSampler",
          "VAEDecode", "SaveImage")
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG", pnginfo=info)
    png = tmp_path / "a1111.png"
    png.write_bytes(buf.getvalue())
    base, out = tmp_path / "base", tmp_path / "out"
    assert main(["run", str(png), "--base-dir", str(base), "--output-dir", str(out), "--cpu"]) == 0
    [result] = saved(out)
    assert pixels(result).shape == (64, 64, 3)
    capsys.readouterr()
    assert main(["import-a1111", str(png), "--base-dir", str(base)]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert graph["5"]["inputs"]["sampler_name"] == "dpmpp_2m" and graph["5"]["inputs"]["seed"] == 1234


def test_bad_files_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / "truncated.json"
    truncated.write_text((WORKFLOWS / "txt2img.json").read_text()[:200])
    dangling = tmp_path / "dangling.json"
    dangling.write_text(json.dumps({
        "version": 0.4, "links": [], "groups": [], "config": {}, "extra": {},
        "nodes": [{"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["x.safetensors"],
                   "inputs": [], "outputs": [{"name": "VAE", "type": "VAE", "links": []}]},
                  {"id": 2, "type": "VAEDecode", "mode": 0, "outputs": [],
                   "inputs": [{"name": "samples", "type": "LATENT", "link": 41},
                              {"name": "vae", "type": "VAE", "link": None}]}]}))
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    expected = {truncated: "truncated.json is not valid JSON", dangling: "link 41 does not exist",
                plain: "plain.png has no workflow metadata"}
    for path, message in expected.items():
        assert main(["run", str(path), "--base-dir", str(tmp_path / "base")]) == 2
        assert message in capsys.readouterr().err
