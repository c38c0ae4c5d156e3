"""Shared model folders: the A1111 preset, YAML/JSON configs, aliases, plugin folders, bad configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes.extra_paths import (ExtraPathsError, a1111_preset, apply_extra_paths, load_extra_paths,
                               parse_extra_paths)
from nodes.folders import ModelFolders

REPO = Path(__file__).resolve().parents[2]


def make_webui(root: Path) -> Path:
    files = ["models/Stable-diffusion/sd15.safetensors", "models/Stable-diffusion/xl/base.ckpt",
             "models/Lora/fox.safetensors", "models/LyCORIS/loha.safetensors", "embeddings/bad.pt",
             "models/hypernetworks/anime.pt", "models/VAE/kl.safetensors", "models/Lora/readme.txt"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"x")
    return root


def test_a1111_preset_makes_the_webui_models_visible(tmp_path: Path) -> None:
    webui = make_webui(tmp_path / "webui")
    folders = ModelFolders(tmp_path / "easel")
    (tmp_path / "easel/models/checkpoints").mkdir(parents=True)
    (tmp_path / "easel/models/checkpoints/own.safetensors").write_bytes(b"x")
    extra = a1111_preset(webui)
    extra.apply(folders)
    extra.apply(folders)                               # applying twice adds nothing twice
    assert folders.list_files("checkpoints") == ["own.safetensors", "sd15.safetensors", "xl/base.ckpt"]
    assert folders.list_files("loras") == ["fox.safetensors", "loha.safetensors"]
    assert folders.list_files("embeddings") == ["bad.pt"]
    assert folders.list_files("hypernetworks") == ["anime.pt"]
    assert folders.list_files("vae") == ["kl.safetensors"]
    assert folders.resolve("loras", "fox.safetensors") == webui.resolve() / "models/Lora/fox.safetensors"
    assert folders.dirs("checkpoints")[0] == (tmp_path / "easel").resolve() / "models/checkpoints"
    assert len(folders.dirs("loras")) == 3
    # Folders the install lacks are warnings, not errors.
    assert any("upscale_models folder" in w and "ESRGAN" in w for w in extra.warnings)


def test_yaml_sections_block_strings_aliases_and_plugin_dirs(tmp_path: Path) -> None:
    (tmp_path / "shared/ckpt").mkdir(parents=True)
    (tmp_path / "shared/ckpt/a.safetensors").write_bytes(b"x")
    (tmp_path / "shared/l1").mkdir()
    (tmp_path / "shared/l2").mkdir()
    (tmp_path / "shared/l2/b.safetensors").write_bytes(b"x")
    (tmp_path / "shared/te").mkdir()
    (tmp_path / "shared/te/t5.safetensors").write_bytes(b"x")
    (tmp_path / "shared/nodes").mkdir()
    cfg = tmp_path / "conf/extra.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "shared:\n"
        "  base_path: ../shared\n"                     # relative to the config file
        "  is_default: true\n"
        "  checkpoints: ckpt\n"
        "  loras: |\n"
        "    l1\n"
        "    l2\n"
        "  text_encoders: [te]\n"
        "  custom_nodes: nodes\n"
        "empty:\n")
    folders = ModelFolders(tmp_path / "easel")
    merged = apply_extra_paths(folders, cfg)
    shared = (tmp_path / "conf/../shared")
    assert merged.folders["loras"] == [shared / "l1", shared / "l2"]
    assert merged.custom_nodes == [shared / "nodes"]
    assert merged.warnings == []
    assert folders.list_files("checkpoints") == ["a.safetensors"]
    assert folders.list_files("loras") == ["b.safetensors"]
    assert folders.list_files("clip") == ["t5.safetensors"]


def test_json_config_and_home_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models/vae").mkdir(parents=True)
    cfg = tmp_path / "paths.json"
    cfg.write_text(json.dumps({"home": {"base_path": "~", "vae": ["models/vae"]}}))
    extra = load_extra_paths(cfg)
    assert extra.folders == {"vae": [tmp_path / "models/vae"]}


def test_the_example_file_parses() -> None:
    extra = load_extra_paths(REPO / "docs/extra_model_paths.example.yaml")
    assert extra.folders["checkpoints"] == [Path("/path/to/stable-diffusion-webui/models/Stable-diffusion")]
    assert Path("/path/to/stable-diffusion-webui/models/Lora") in extra.folders["loras"]
    assert extra.warnings                                   # the placeholder path does not exist


def test_bad_configs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ExtraPathsError, match="unknown preset 'invokeai'"):
        parse_extra_paths({"x": {"preset": "invokeai"}})
    with pytest.raises(ExtraPathsError, match=r"section 'x'\.loras: expected a path"):
        parse_extra_paths({"x": {"loras": 3}})
    with pytest.raises(ExtraPathsError, match="expected sections"):
        parse_extra_paths(["a", "b"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ExtraPathsError, match=r"bad\.yaml is not valid YAML"):
        load_extra_paths(bad)
    with pytest.raises(ExtraPathsError, match="cannot read model paths config"):
        load_extra_paths(tmp_path / "nope.yaml")
