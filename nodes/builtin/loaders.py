"""Loader nodes: CheckpointLoaderSimple, VAELoader, DiffusersLoader (ComfyUI names, inputs and order).

Thin: resolve the file in the model folders of the run (`nodes.folders.current_folders()`), then call
`diffusion.loaders.checkpoint`. Files that cannot be loaded raise `diffusion.models.errors.ModelFileError` naming the
file and what was found there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusion.loaders.checkpoint import load_checkpoint, load_vae
from diffusion.models.errors import ModelFileError
from nodes.folders import current_folders


def _resolve(kind: str, name: str) -> Path:
    try:
        return current_folders().resolve(kind, name)
    except FileNotFoundError as e:
        raise ModelFileError(name, str(e)) from None


class CheckpointLoaderSimple:
    """A single-file checkpoint (ldm layout: SD1.x, SD2.x, SDXL, inpainting) -> MODEL, CLIP, VAE."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"ckpt_name": (current_folders().list_files("checkpoints"),
                                           {"tooltip": "The name of the checkpoint (model) to load."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.",
                       "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint; diffusion models are used to denoise latents."

    def load_checkpoint(self, ckpt_name: str) -> tuple[Any, Any, Any]:
        folders = current_folders()
        return load_checkpoint(_resolve("checkpoints", ckpt_name), embedding_dirs=folders.dirs("embeddings"))


class VAELoader:
    """A standalone VAE file (ldm or diffusers names) -> VAE."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae_name": (current_folders().list_files("vae"),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"

    def load_vae(self, vae_name: str) -> tuple[Any]:
        return (load_vae(_resolve("vae", vae_name)),)


def _diffusers_folders() -> list[str]:
    """Sub-folders of models/diffusers that hold a pipeline (a model_index.json)."""
    names = []
    for root in current_folders().dirs("diffusers"):
        if root.is_dir():
            for dirpath, _dirnames, filenames in os.walk(root, followlinks=True):
                if "model_index.json" in filenames:
                    names.append(Path(dirpath).relative_to(root).as_posix())
    return sorted(set(names))


class DiffusersLoader:
    """A diffusers pipeline folder under models/diffusers -> MODEL, CLIP, VAE."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model_path": (_diffusers_folders(),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "advanced/loaders/deprecated"

    def load_checkpoint(self, model_path: str, output_vae: bool = True, output_clip: bool = True
                        ) -> tuple[Any, Any, Any]:
        if not model_path or Path(model_path).is_absolute() or ".." in Path(model_path).parts:
            raise ModelFileError(model_path, "not a folder name inside models/diffusers")
        for root in current_folders().dirs("diffusers"):
            folder = root / model_path
            if (folder / "model_index.json").is_file():
                model, clip, vae = load_checkpoint(folder, embedding_dirs=current_folders().dirs("embeddings"))
                return model, clip if output_clip else None, vae if output_vae else None
        raise ModelFileError(model_path, "diffusers folder not found under models/diffusers")


NODE_CLASS_MAPPINGS = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "VAELoader": VAELoader,
    "DiffusersLoader": DiffusersLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "VAELoader": "Load VAE",
    "DiffusersLoader": "Diffusers Loader",
}
