"""End to end on the CPU with the tiny demo checkpoint: txt2img and img2img through the executor,
and every workflows/*.json through `easel run`.

Checks: batch 2 gives two different pictures; the same seed gives byte-identical PNGs on a fresh
executor (nothing cached); another seed gives another picture; img2img really uses its input; the
PNG text chunks hold the prompt, the workflow and A1111 parameters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.demo.checkpoint import DEMO_NAMES, ensure_demo_checkpoint
from diffusion.images import image_io
from graph.cache import OutputCache
from graph.events import EventLog
from graph.executor import Executor, RunResult
from nodes.folders import ModelFolders, use_folders
from nodes.registry import build_registry

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
CKPT = DEMO_NAMES["sd1"]
WORKFLOW_META = {"id": "e2e-workflow", "nodes": [], "links": [], "version": 0.4}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelFolders, Any]:
    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("e2e")
    folders = ModelFolders(base)
    ensure_demo_checkpoint(folders.dirs("checkpoints")[0], "sd1")
    return folders, build_registry()


_SHARED: dict[int, Executor] = {}


def _run(env: tuple[ModelFolders, Any], prompt: dict[str, Any], fresh: bool = False,
         workflow: dict | None = None) -> RunResult:
    """fresh: a new executor and cache, so every node really runs; else one shared executor
    (unchanged nodes such as the checkpoint loader come from its cache)."""
    folders, registry = env
    if fresh or id(env) not in _SHARED:
        ex = Executor(registry, OutputCache(), EventLog(), folders=folders)
        if not fresh:
            _SHARED[id(env)] = ex
    else:
        ex = _SHARED[id(env)]
    with use_folders(folders):
        result = ex.run(prompt, extra_data={"extra_pnginfo": {"workflow": workflow or WORKFLOW_META}})
    detail = result.error or (result.validation.describe() if result.validation and not result.validation.ok else "")
    assert result.ok, detail
    return result


def _files(env: tuple[ModelFolders, Any], result: RunResult, node: str = "9") -> list[Path]:
    folders, _ = env
    items = result.outputs[node]["images"]
    return [folders.output_dir / item["subfolder"] / item["filename"] for item in items]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _base(seed: int, prefix: str) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dawn, (watercolor:1.2)",
                                                          "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                    "positive": ["6", 0], "negative": ["7", 0],
                                                    "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def txt2img(seed: int, prefix: str = "t2i", batch: int = 2) -> dict[str, Any]:
    prompt = _base(seed, prefix)
    prompt["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": batch}}
    return prompt


def img2img(seed: int, image: str, prefix: str = "i2i", denoise: float = 0.6) -> dict[str, Any]:
    prompt = _base(seed, prefix)
    prompt["3"]["inputs"].update(sampler_name="euler_ancestral", scheduler="karras", denoise=denoise)
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    prompt["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    return prompt


def test_txt2img_batch_seed_and_metadata(env):
    first = _files(env, _run(env, txt2img(seed=1)))
    assert len(first) == 2 and [p.name for p in first] == ["t2i_00001_.png", "t2i_00002_.png"]
    a, b = (_pixels(p) for p in first)
    assert a.shape == (48, 64, 3)
    assert a.std() > 1.0                                    # a picture, not a flat fill
    assert np.abs(a - b).max() > 0                          # batch items get different noise

    again = _files(env, _run(env, txt2img(seed=1), fresh=True))   # fresh executor, nothing cached
    assert [p.name for p in again] == ["t2i_00003_.png", "t2i_00004_.png"]
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]

    other = _files(env, _run(env, txt2img(seed=2)))
    assert np.abs(_pixels(other[0]) - a).mean() > 1.0

    meta = image_io.read_metadata(first[0])
    assert meta.prompt == txt2img(seed=1)
    assert meta.workflow == WORKFLOW_META
    raw = image_io.read_png_text(first[0])
    assert raw["prompt"] == json.dumps(txt2img(seed=1)) and raw["workflow"] == json.dumps(WORKFLOW_META)
    assert meta.parameters is not None
    assert meta.parameters.startswith("a lighthouse at dawn, (watercolor:1.2)\nNegative prompt: blurry\n")
    assert "Steps: 3, Sampler: Euler, Schedule type: Normal, CFG scale: 7, Seed: 1, Size: 64x48" in meta.parameters


def test_img2img_batch_uses_its_input(env):
    folders, _ = env
    folders.input_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # a two-frame PNG: LoadImage gives an IMAGE batch of 2
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(folders.input_dir / "pair.png", save_all=True, append_images=frames[1:])
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folders.input_dir / "other.png")

    first = _files(env, _run(env, img2img(seed=5, image="pair.png")))
    assert len(first) == 2
    a, b = (_pixels(p) for p in first)
    assert a.shape == (48, 64, 3) and np.abs(a - b).max() > 0

    again = _files(env, _run(env, img2img(seed=5, image="pair.png"), fresh=True))
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]

    reseeded = _files(env, _run(env, img2img(seed=6, image="pair.png")))
    assert np.abs(_pixels(reseeded[0]) - a).mean() > 0.5
    other_input = _files(env, _run(env, img2img(seed=5, image="other.png")))
    assert np.abs(_pixels(other_input[0]) - a).mean() > 0.5

    meta = image_io.read_metadata(first[0])
    assert meta.prompt == img2img(seed=5, image="pair.png") and meta.workflow == WORKFLOW_META
    assert "Denoising strength: 0.6" in (meta.parameters or "")


def _shrink(prompt: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(node, input, value) overrides that keep a workflow's graph but make it cheap on a CPU."""
    out = []
    for node_id, node in prompt.items():
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            out += [(node_id, "width", 64), (node_id, "height", 64)]
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            out.append((node_id, "steps", 3))
    return out


API_FILES = sorted(p.name for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".ui.json"))


@pytest.mark.parametrize("name", API_FILES)
def test_workflow_file_runs_with_easel_run(tmp_path, capsys, name):
    """Each API workflow file, as `easel run` takes it (demo checkpoint created on the fly), at 64x64."""
    from server.cli import main

    prompt = json.loads((WORKFLOWS / name).read_text())
    overrides = _shrink(prompt)
    sets = [arg for node_id, key, value in overrides for arg in ("--set", f"{node_id}.{key}={value}")]
    code = main(["run", str(WORKFLOWS / name), "--base-dir", str(tmp_path), "--cpu", *sets])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    saved = [tmp_path / "output" / item["subfolder"] / item["filename"]
             for ui in report["outputs"].values() for item in ui.get("images", []) if item["type"] == "output"]
    assert saved, report
    for node_id, key, value in overrides:
        prompt[node_id]["inputs"][key] = value
    for path in saved:
        meta = image_io.read_metadata(path)
        assert meta.prompt == prompt
        assert meta.parameters is not None and "Steps: 3," in meta.parameters
        assert Image.open(path).size == (64, 64)
