"""Plugins from custom_nodes/: loading, reporting, built-in protection, and the ComfyUI modules they import."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import server
from graph.cache import OutputCache
from graph.executor import Executor
from graph.runtime import Interrupted, NodeRuntime, running
from nodes.compat_install import COMPAT_DIR, install_compat_modules
from nodes.folders import ModelFolders, use_folders
from nodes.plugins import load_plugins
from nodes.registry import Registry, build_registry
from server.prompt_server_compat import PromptServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def plugin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Fresh copies of the fixture folders (plus a __pycache__ that must be skipped)."""
    main = shutil.copytree(FIXTURES / "custom_nodes", tmp_path / "custom_nodes",
                           ignore=shutil.ignore_patterns("__pycache__"))
    (main / "__pycache__").mkdir()
    (main / "__pycache__" / "junk.py").write_text('raise RuntimeError("__pycache__ must be skipped")\n')
    more = shutil.copytree(FIXTURES / "custom_nodes_more", tmp_path / "more",
                           ignore=shutil.ignore_patterns("__pycache__"))
    assert server.PromptServer is PromptServer       # what `from server import PromptServer` gives plugins
    return main, more


@pytest.fixture
def folders(tmp_path: Path) -> ModelFolders:
    f = ModelFolders(tmp_path / "base")
    (f.base_dir / "models/loras").mkdir(parents=True)
    (f.base_dir / "models/loras/fox.safetensors").write_bytes(b"x")
    (f.base_dir / "models/loras/sub").mkdir()
    (f.base_dir / "models/loras/sub/owl.safetensors").write_bytes(b"x")
    with use_folders(f):
        yield f


def test_report_loaded_failed_skipped_and_timing(plugin_dirs: tuple[Path, Path], folders: ModelFolders) -> None:
    main, _ = plugin_dirs
    registry = build_registry(plugin_dirs=[main])
    report = registry.plugin_report  # type: ignore[attr-defined]
    assert [r.name for r in report.loaded] == ["basic_nodes", "compat_user"]
    failed = {r.name: r for r in report.failed}
    assert set(failed) == {"broken_plugin", "no_mappings"}
    assert failed["broken_plugin"].error.startswith("ModuleNotFoundError")
    assert "easel_module_that_does_not_exist" in failed["broken_plugin"].traceback
    assert failed["broken_plugin"].seconds >= 0
    assert "NODE_CLASS_MAPPINGS" in failed["no_mappings"].error
    # disabled, non-.py and __pycache__ entries are not candidates at all
    assert {r.path.name for r in report.results} == {"basic_nodes", "broken_plugin", "compat_user.py",
                                                      "no_mappings.py"}
    table = report.timing_table().splitlines()
    assert table[0] == "Import times for custom nodes:" and len(table) == 5
    assert sum("(IMPORT FAILED)" in line for line in table) == 2
    # what the good plugins registered
    for name in ("EaselTestAdd", "EaselTestRange", "EaselTestCollect", "EaselTestLazySwitch", "EaselTestShow",
                 "EaselTestCompat", "EaselTestExpandLink"):
        assert name in registry and not registry.is_builtin(name)
    d = registry.definition("EaselTestAdd")
    assert d["display_name"] == "Add (test)" and d["python_module"] == "custom_nodes.basic_nodes"
    assert registry.get("EaselTestAdd").RELATIVE_PYTHON_MODULE == "custom_nodes.basic_nodes"
    assert registry.definition("EaselTestCompat")["input"]["required"]["lora_name"][0] == \
        ["fox.safetensors", "sub/owl.safetensors"]
    assert registry.web_dirs["basic_nodes"] == (main / "basic_nodes" / "web").resolve()
    assert (registry.web_dirs["basic_nodes"] / "extension.js").is_file()


def test_builtins_cannot_be_replaced_but_plugins_can(plugin_dirs: tuple[Path, Path], folders: ModelFolders) -> None:
    main, more = plugin_dirs
    registry = build_registry(plugin_dirs=[main, more])
    report = registry.plugin_report  # type: ignore[attr-defined]
    assert registry.is_builtin("EmptyLatentImage")
    assert registry.get("EmptyLatentImage").__name__ == "EmptyLatentImage"
    builtin_warning = next(w for w in report.warnings if "'EmptyLatentImage'" in w)
    assert "plugin overrider" in builtin_warning and "FakeEmptyLatentImage" in builtin_warning
    assert "nodes.builtin.latent.EmptyLatentImage" in builtin_warning and "built-in is kept" in builtin_warning
    replaced = next(w for w in report.warnings if "'EaselTestAdd'" in w)
    assert "plugin overrider" in replaced and "plugin basic_nodes" in replaced
    assert registry.get("EaselTestAdd").__name__ == "OtherAdd"
    assert any("'NotANode' skipped" in w for w in report.warnings)
    overrider = next(r for r in report.loaded if r.name == "overrider")
    assert overrider.nodes == ("EaselTestAdd",)


def _run(registry: Registry, folders: ModelFolders, prompt: dict[str, Any]) -> tuple[Any, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    ex = Executor(registry, OutputCache(), lambda e, d: events.append((e, d)), folders=folders)
    result = ex.run(prompt)
    assert result.ok, (result.status, result.error, result.validation)
    return result, events


def test_normal_list_lazy_and_output_nodes_run(plugin_dirs: tuple[Path, Path], folders: ModelFolders) -> None:
    registry = build_registry(plugin_dirs=[plugin_dirs[0]])
    prompt = {
        "1": {"class_type": "EaselTestAdd", "inputs": {"a": 2, "b": 3}},
        "2": {"class_type": "EaselTestShow", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "EaselTestRange", "inputs": {"count": 4}},
        "4": {"class_type": "EaselTestAdd", "inputs": {"a": ["3", 0], "b": 10}},
        "5": {"class_type": "EaselTestCollect", "inputs": {"values": ["4", 0]}},
        "6": {"class_type": "EaselTestShow", "inputs": {"value": ["5", 0]}},
        "7": {"class_type": "EaselTestAdd", "inputs": {"a": 100, "b": 1}},
        "8": {"class_type": "EaselTestAdd", "inputs": {"a": 200, "b": 2}},
        "9": {"class_type": "EaselTestLazySwitch", "inputs": {"use_first": False, "first": ["7", 0],
                                                               "second": ["8", 0]}},
        "10": {"class_type": "EaselTestShow", "inputs": {"value": ["9", 0]}},
    }
    result, _ = _run(registry, folders, prompt)
    assert result.outputs["2"] == {"text": ["5"]}
    assert result.outputs["6"] == {"text": ["10,11,12,13"]}      # list fan-out, then one list call
    assert result.outputs["10"] == {"text": ["202"]}
    assert "8" in result.executed and "7" not in result.executed  # the lazy branch not asked for


def test_compat_modules_progress_prompt_server_and_folders(plugin_dirs: tuple[Path, Path],
                                                           folders: ModelFolders) -> None:
    registry = build_registry(plugin_dirs=[plugin_dirs[0]])
    prompt = {"1": {"class_type": "EaselTestCompat", "inputs": {"lora_name": "sub/owl.safetensors", "steps": 3}},
              "2": {"class_type": "EaselTestShow", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "EaselTestExpandLink", "inputs": {}},
              "4": {"class_type": "EaselTestShow", "inputs": {"value": ["3", 0]}}}
    result, events = _run(registry, folders, prompt)
    assert result.outputs["2"] == {"text": [str(folders.base_dir / "models/loras/sub/owl.safetensors")]}
    assert result.outputs["4"] == {"text": ["True:['x.1']"]}
    progress = [(d["value"], d["max"], d["node"]) for e, d in events if e == "progress"]
    assert progress == [(1, 3, "1"), (2, 3, "1"), (3, 3, "1")]
    custom = [d for e, d in events if e == "easel.test"]
    import comfy.model_management as mm
    assert custom == [{"lora": "sub/owl.safetensors", "device": mm.get_torch_device().type}]
    # routes declared by the plugin at import time are collected for the server
    assert any(getattr(r, "path", None) == "/easel_test/hello" for r in PromptServer.instance.take_routes())


def test_prompt_server_sink_when_a_server_runs() -> None:
    got: list[tuple[str, Any, str | None]] = []
    ps = PromptServer.instance
    ps.attach(lambda e, d, sid: got.append((e, d, sid)))
    try:
        ps.send_sync("my.event", {"x": 1}, "client-7")
        ps.send_progress_text("half way", "12")
    finally:
        ps.detach()
    assert got == [("my.event", {"x": 1}, "client-7"), ("progress_text", {"text": "half way", "node_id": "12"}, None)]
    emitted: list[tuple[str, dict]] = []
    with running(NodeRuntime(node_id="5", emit=lambda e, d: emitted.append((e, d)))):
        ps.send_sync("my.event", {"y": 2})
    assert emitted == [("my.event", {"y": 2})]


def test_folder_paths_shim(folders: ModelFolders, tmp_path: Path) -> None:
    install_compat_modules()
    assert sys.path[0] == str(COMPAT_DIR)
    import folder_paths
    assert folder_paths.get_filename_list("loras") == ["fox.safetensors", "sub/owl.safetensors"]
    assert folder_paths.get_full_path("loras", "missing.safetensors") is None
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        folder_paths.get_full_path_or_raise("loras", "missing.safetensors")
    assert folder_paths.get_full_path("loras", "../loras/fox.safetensors") is None     # never leaves the folders
    extra = tmp_path / "shared_te"
    extra.mkdir()
    (extra / "t5.safetensors").write_bytes(b"x")
    folder_paths.add_model_folder_path("text_encoders", str(extra))
    assert folder_paths.get_filename_list("clip") == ["t5.safetensors"]
    assert folder_paths.get_folder_paths("text_encoders")[-1] == str(extra)
    assert folder_paths.models_dir == str(folders.base_dir / "models")
    assert folder_paths.folder_names_and_paths["loras"][0][0] == str(folders.base_dir / "models/loras")
    assert ".safetensors" in folder_paths.supported_pt_extensions
    assert folder_paths.get_output_directory() == str(folders.output_dir)
    assert folder_paths.get_annotated_filepath("a.png [output]") == str(folders.output_dir / "a.png")
    assert folder_paths.get_annotated_filepath("b.png") == str(folders.input_dir / "b.png")
    out = folders.output_dir
    (out / "run").mkdir(parents=True)
    (out / "run" / "img_00004_.png").write_bytes(b"x")
    full, name, counter, sub, _prefix = folder_paths.get_save_image_path("run/img", str(out), 8, 8)
    assert (full, name, counter, sub) == (str((out / "run").resolve()), "img", 5, "run")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        folder_paths.nope  # noqa: B018


def test_model_management_and_utils_shims() -> None:
    install_compat_modules()
    import comfy.model_management as mm
    import comfy.utils
    import torch
    assert mm.get_torch_device().type in ("cpu", "cuda", "mps")
    assert mm.InterruptProcessingException is Interrupted
    assert mm.get_free_memory(torch.device("cpu")) > 0
    mm.interrupt_current_processing(True)
    assert mm.processing_interrupted()
    with pytest.raises(Interrupted):
        mm.throw_exception_if_processing_interrupted()
    assert not mm.processing_interrupted()                       # the flag is cleared once raised
    with running(NodeRuntime(node_id="3", interrupt_requested=lambda: True)):
        with pytest.raises(Interrupted, match="node 3"):
            mm.throw_exception_if_processing_interrupted()
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    up = comfy.utils.common_upscale(x, 8, 6, "nearest-exact", "disabled")
    assert up.shape == (1, 1, 6, 8) and up[0, 0, 0, 0] == 0
    seen: list[tuple[int, int]] = []
    with running(NodeRuntime(node_id="9", emit=lambda e, d: seen.append((d["value"], d["max"])))):
        bar = comfy.utils.ProgressBar(4)
    bar.update(1)                     # reported to the node that created the bar, even outside it
    bar.update_absolute(10)           # clamped to the total
    assert seen == [(1, 4), (4, 4)]


def test_plugin_dir_missing_is_a_warning() -> None:
    registry = Registry()
    report = load_plugins([Path("/nonexistent/custom_nodes")], registry)
    assert report.results == [] and "does not exist" in report.warnings[0]
