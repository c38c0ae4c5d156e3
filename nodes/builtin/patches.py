"""Patch nodes: LoraLoader, LoraLoaderModelOnly, ModelSamplingDiscrete (ComfyUI names, inputs and order).

Thin: `diffusion.patches.lora.load.load_lora` reads the file (once per mtime), resolves its keys and returns
clones that record the patches; weights change only when a sampler / text encoder patches the
module. Keys that apply to nothing are reported through `graph.runtime.current().warn(...)`
(naming the file, counting and listing the keys); the optional `strict` input makes them an error.
A side whose strength is 0 is returned as it came in (the same object), so the graph cache sees it
unchanged; `ModelPatcher.patch_fingerprint()` tells equal patch sets apart from changed ones.
"""
from __future__ import annotations

from typing import Any

from diffusion.patches.lora.load import LoraCoverage, load_lora
from diffusion.sampling.sample import with_model_sampling
from graph.runtime import current
from nodes.folders import current_folders

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def _report(name: str, coverage: LoraCoverage) -> None:
    rt = current()
    rt.record("lora_coverage", [coverage.as_dict()])   # per file, kept with the prompt's history (node_records)
    if coverage.unmatched:
        n = len(coverage.unmatched)
        hint = f"; {coverage.family_hint}" if coverage.family_hint else ""
        rt.warn(f"LoRA {name}: {n} of {coverage.total_keys} keys were not applied "
                f"(e.g. {coverage.unmatched[0][0]}: {coverage.unmatched[0][1]}){hint}",
                {"type": "lora_keys_unmatched", "lora": name, **coverage.as_dict()})


def _apply(model: Any, clip: Any, lora_name: str, strength_model: float, strength_clip: float,
           strict: bool) -> tuple[Any, Any]:
    if strength_model == 0 and strength_clip == 0:
        return model, clip                        # ComfyUI: nothing to do, not even read the file
    path = current_folders().resolve("loras", lora_name)
    new_model, new_clip, coverage = load_lora(model, clip, path, strength_model, strength_clip,
                                              strict=strict, display_name=lora_name)
    _report(lora_name, coverage)
    return new_model, new_clip


class LoraLoader:
    """Apply a LoRA-family file to the diffusion model and the text encoder(s)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (current_folders().list_files("loras"), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", STRENGTH),
            "strength_clip": ("FLOAT", STRENGTH),
        }, "optional": {
            "strict": ("BOOLEAN", {"default": False,
                                   "tooltip": "Fail when keys of the file match no weight of the model."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = "Apply a LoRA (LoCon, LoHa, LoKr, DoRA, full diff, IA3; kohya, diffusers or PEFT names)."

    def load_lora(self, model: Any, clip: Any, lora_name: str, strength_model: float, strength_clip: float,
                  strict: bool = False) -> tuple[Any, Any]:
        return _apply(model, clip, lora_name, strength_model, strength_clip, strict)


class LoraLoaderModelOnly:
    """Apply a LoRA-family file to the diffusion model only."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (current_folders().list_files("loras"),),
            "strength_model": ("FLOAT", STRENGTH),
        }, "optional": {
            "strict": ("BOOLEAN", {"default": False}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"
    CATEGORY = "loaders"

    def load_lora_model_only(self, model: Any, lora_name: str, strength_model: float,
                             strict: bool = False) -> tuple[Any]:
        return (_apply(model, None, lora_name, strength_model, 0.0, strict)[0],)


class ModelSamplingDiscrete:
    """Sample a model as eps or v-prediction, optionally with zero-terminal-SNR sigmas (for
    checkpoints whose file does not say so). ComfyUI also lists lcm, x0 and img_to_img, which
    Easel does not offer."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "sampling": (["eps", "v_prediction"],),
            "zsnr": ("BOOLEAN", {"default": False}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model: Any, sampling: str, zsnr: bool) -> tuple[Any]:
        return (with_model_sampling(model, "v" if sampling == "v_prediction" else "eps", zsnr),)


NODE_CLASS_MAPPINGS = {"LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly,
                       "ModelSamplingDiscrete": ModelSamplingDiscrete}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLoader": "Load LoRA", "LoraLoaderModelOnly": "LoraLoaderModelOnly",
                              "ModelSamplingDiscrete": "ModelSamplingDiscrete"}
