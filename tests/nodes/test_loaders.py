"""nodes/builtin/loaders.py inside the executor: a checkpoint that fails to load is reported with the
node and file named and leaves nothing in the cache; fixing the file makes the same prompt run."""
from __future__ import annotations

from pathlib import Path

from diffusion.demo.checkpoint import tiny_components, write_ldm_checkpoint
from diffusion.models.devices import DeviceConfig, use_config
from graph.cache import OutputCache
from graph.executor import Executor
from nodes.builtin import image, latent, loaders, vae_nodes
from nodes.builtin.loaders import CheckpointLoaderSimple, DiffusersLoader, VAELoader
from nodes.folders import ModelFolders, use_folders
from nodes.registry import Registry

PROMPT = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
    "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
    "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}


def test_node_api_matches_comfyui(tmp_path: Path) -> None:
    with use_folders(ModelFolders(tmp_path)):
        assert list(CheckpointLoaderSimple.INPUT_TYPES()["required"]) == ["ckpt_name"]
        assert list(VAELoader.INPUT_TYPES()["required"]) == ["vae_name"]
        assert list(DiffusersLoader.INPUT_TYPES()["required"]) == ["model_path"]
    assert CheckpointLoaderSimple.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert CheckpointLoaderSimple.FUNCTION == "load_checkpoint" and VAELoader.FUNCTION == "load_vae"


def test_failed_load_is_reported_and_not_cached(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    ckpt_dir = folders.dirs("checkpoints")[0]
    ckpt_dir.mkdir(parents=True)
    path = write_ldm_checkpoint(tiny_components("sd1", seed=1), ckpt_dir / "m.safetensors")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])                      # truncated

    registry = Registry()
    for module in (loaders, latent, vae_nodes, image):
        registry.register_module(module, builtin=True)
    cache = OutputCache()
    with use_folders(folders), use_config(DeviceConfig(cpu=True, unet_dtype="fp32")):
        ex = Executor(registry, cache, folders=folders)
        first = ex.run(PROMPT)
        assert first.status == "error" and first.error is not None
        assert first.error["node_id"] == "1" and first.error["node_type"] == "CheckpointLoaderSimple"
        assert "m.safetensors" in first.error["exception_message"]
        assert "truncated" in first.error["exception_message"]

        path.write_bytes(good)                                    # the user replaces the file
        second = ex.run(PROMPT)
        assert second.ok, second.error
        assert "1" in second.executed and "1" not in second.cached
        third = ex.run(PROMPT)
        assert third.ok and "1" in third.cached
