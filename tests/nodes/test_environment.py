from __future__ import annotations

from pathlib import Path

from nodes.environment import ensure_demo_files
from nodes.folders import ModelFolders


def test_demo_files_named_in_a_prompt_are_created_once(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "easel-demo-sd1.safetensors"}},
              "2": {"class_type": "A1111Prompt", "inputs": {"positive": "a cat, demostyle, <lora:easel-demo-lora:0.5>"}}}
    made = ensure_demo_files(prompt, folders)
    names = sorted(p.name for p in made)
    assert names == ["demostyle.safetensors", "easel-demo-lora.safetensors", "easel-demo-sd1.safetensors"]
    assert (tmp_path / "models" / "checkpoints" / "easel-demo-sd1.safetensors").stat().st_size > 0
    assert ensure_demo_files(prompt, folders) == []          # present now: nothing rewritten


def test_prompts_without_demo_names_create_nothing(tmp_path: Path) -> None:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "my-model.safetensors"}}}
    assert ensure_demo_files(prompt, ModelFolders(tmp_path)) == []
    assert not (tmp_path / "models").exists()
