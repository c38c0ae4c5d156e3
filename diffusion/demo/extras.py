"""Demo textual-inversion embeddings, LoRA and hypernetwork files for the tiny demo models.

Written in the real formats, from seeded random numbers, so the demo workflows
(`workflows/a1111_prompt.json`, `workflows/lora_embedding_hypernetwork.json`) run through the real
loading code with no download. `DEMO_FILES` is what `nodes.environment.demo_builders()` offers:
{kind: {file name: builder(folder) -> path}}; each builder writes the file if it is missing.

The writers double as the test builders of the formats:
- `hypernetwork_layers(width, ...)`: one MLP's state dict with A1111's module numbering
  (`linear.{j}`, j counting activations, LayerNorms and dropouts, formats.md §4.1);
- `hypernetwork_file(...)`: the whole dict A1111 saves (integer widths -> (k, v), options);
- `write_embedding(path, vectors, layout)`: A1111 `.pt`, kohya `.safetensors`, diffusers `.bin`,
  SDXL `clip_l`/`clip_g`;
- `demo_lora_tensors(...)`: a kohya-named LoRA over every attention projection of the tiny UNet and
  every self-attention projection of the tiny text encoder(s).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

DEMO_SEED = 1234
SD1_CONTEXT = 32                      # tiny demo CLIP-L hidden size (diffusion.demo.checkpoint)
SD1_LEVEL_WIDTHS = (32, 64)           # tiny demo UNet block_out_channels


# ---------------------------------------------------------------------------------------------
# hypernetworks
# ---------------------------------------------------------------------------------------------

def hypernetwork_layers(width: int, generator: torch.Generator, *,
                        layer_structure: Sequence[float] = (1, 2, 1), activation_func: str | None = "relu",
                        is_layer_norm: bool = False, activate_output: bool = True,
                        dropout_structure: Sequence[float] | None = None, scale: float = 0.1
                        ) -> dict[str, torch.Tensor]:
    """One MLP's state dict in A1111's numbering: Linear, [activation], [LayerNorm], [Dropout]."""
    ls = list(layer_structure)
    drop = list(dropout_structure) if dropout_structure is not None else [0.0] * len(ls)
    sd: dict[str, torch.Tensor] = {}
    j = 0
    for i in range(len(ls) - 1):
        fin, fout = int(width * ls[i]), int(width * ls[i + 1])
        sd[f"linear.{j}.weight"] = torch.randn(fout, fin, generator=generator) * scale
        sd[f"linear.{j}.bias"] = torch.randn(fout, generator=generator) * scale
        j += 1
        last = i == len(ls) - 2
        if activation_func not in (None, "linear") and not (last and not activate_output):
            if activation_func == "prelu":
                sd[f"linear.{j}.weight"] = torch.tensor([0.25]) + torch.rand(1, generator=generator) * 0.1
            j += 1
        if is_layer_norm:
            sd[f"linear.{j}.weight"] = 1 + torch.randn(fout, generator=generator) * scale
            sd[f"linear.{j}.bias"] = torch.randn(fout, generator=generator) * scale
            j += 1
        if drop[i + 1] > 0:
            j += 1
    return sd


def hypernetwork_file(widths: Sequence[int], seed: int = DEMO_SEED, *, name: str = "hypernet",
                      layer_structure: Sequence[float] = (1, 2, 1), activation_func: str | None = "relu",
                      is_layer_norm: bool = False, activate_output: bool = True,
                      use_dropout: bool = False, dropout_structure: Sequence[float] | None = None,
                      last_layer_dropout: bool = False, scale: float = 0.1,
                      write_options: bool = True) -> dict[Any, Any]:
    """The dict A1111 saves: {width: (k state dict, v state dict), options..., metadata}."""
    g = torch.Generator().manual_seed(seed)
    data: dict[Any, Any] = {}
    for w in widths:
        data[int(w)] = tuple(hypernetwork_layers(w, g, layer_structure=layer_structure,
                                                 activation_func=activation_func, is_layer_norm=is_layer_norm,
                                                 activate_output=activate_output,
                                                 dropout_structure=dropout_structure, scale=scale)
                             for _ in ("k", "v"))
    if write_options:
        data.update({"layer_structure": list(layer_structure), "activation_func": activation_func,
                     "is_layer_norm": is_layer_norm, "use_dropout": use_dropout,
                     "activate_output": activate_output, "last_layer_dropout": last_layer_dropout,
                     "weight_initialization": "Normal"})
        if dropout_structure is not None:
            data["dropout_structure"] = list(dropout_structure)
    data.update({"name": name, "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None})
    return data


def write_hypernetwork(path: str | os.PathLike[str], widths: Sequence[int], **options: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(hypernetwork_file(widths, **options), p)
    return p


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------

def write_embedding(path: str | os.PathLike[str], vectors: Mapping[str, torch.Tensor],
                    layout: str = "safetensors") -> Path:
    """Write `vectors` ({"l": [n, d]} or {"l": ..., "g": ...}) as `layout`:
    "a1111_pt" (string_to_param), "safetensors" (kohya emb_params), "diffusers_bin" ({token: t}),
    "sdxl" (clip_l / clip_g safetensors)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if layout == "sdxl":
        save_file({f"clip_{k}": v.contiguous() for k, v in vectors.items()}, str(p))
        return p
    if len(vectors) != 1:
        raise ValueError(f"layout {layout!r} holds one encoder's vectors; got {sorted(vectors)}")
    vec = next(iter(vectors.values())).contiguous()
    if layout == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": p.stem,
                    "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, p)
    elif layout == "safetensors":
        save_file({"emb_params": vec}, str(p))
    elif layout == "diffusers_bin":
        torch.save({f"<{p.stem}>": vec}, p)
    else:
        raise ValueError(f"unknown embedding layout {layout!r}")
    return p


def demo_vectors(n: int, widths: Mapping[str, int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, d, generator=g) * 0.5 for k, d in widths.items()}


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

def demo_lora_tensors(unet: torch.nn.Module, text_encoders: Mapping[str, torch.nn.Module],
                      seed: int = DEMO_SEED, rank: int = 4, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """kohya-named rank-`rank` LoRA for every attention projection of `unet` (diffusers names
    -> `lora_unet_<name with _>`) and every self-attention projection of the text encoders
    (`lora_te_` for a single encoder, `lora_te1_`/`lora_te2_` for SDXL's l/g)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(prefix: str, name: str, linear: torch.nn.Linear) -> None:
        key = f"{prefix}_{name.replace('.', '_')}"
        out[f"{key}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=g) * scale
        out[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=g) * scale
        out[f"{key}.alpha"] = torch.tensor(float(rank))

    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith(s) for s in ("to_q", "to_k", "to_v", "to_out.0")):
            add("lora_unet", name, mod)
    prefixes = {"l": "lora_te"} if len(text_encoders) == 1 else {"l": "lora_te1", "g": "lora_te2"}
    for key, model in text_encoders.items():
        inner = getattr(model, "text_model", model)
        for name, mod in inner.named_modules():
            if isinstance(mod, torch.nn.Linear) and "self_attn" in name:
                add(prefixes.get(key, "lora_te"), f"text_model.{name}", mod)
    return out


@functools.lru_cache(maxsize=2)
def _tiny(family: str) -> Any:
    """The tiny demo components (shapes for the demo LoRA), built once per process."""
    from diffusion.demo.checkpoint import tiny_components
    return tiny_components(family, seed=0, fast=True)   # the demo checkpoint's layout


def write_demo_lora(folder: str | os.PathLike[str], family: str = "sd1",
                    name: str = "easel-demo-lora.safetensors") -> Path:
    path = Path(folder) / name
    if not path.is_file():
        comps = _tiny(family)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(demo_lora_tensors(comps.unet, comps.text_encoders), str(path),
                  metadata={"ss_output_name": path.stem, "easel_demo": f"tiny random LoRA for {family}"})
    return path


# ---------------------------------------------------------------------------------------------
# the demo files
# ---------------------------------------------------------------------------------------------

def write_demo_embedding(folder: str | os.PathLike[str], name: str = "demostyle.safetensors") -> Path:
    path = Path(folder) / name
    if not path.is_file():
        write_embedding(path, demo_vectors(2, {"l": SD1_CONTEXT}, DEMO_SEED), "safetensors")
    return path


def write_demo_negative_embedding(folder: str | os.PathLike[str], name: str = "demoneg.pt") -> Path:
    path = Path(folder) / name
    if not path.is_file():
        write_embedding(path, demo_vectors(3, {"l": SD1_CONTEXT}, DEMO_SEED + 1), "a1111_pt")
    return path


def write_demo_hypernetwork(folder: str | os.PathLike[str], name: str = "easel-demo-hypernet.pt") -> Path:
    """SD1 demo widths: 32 (cross-attention context and level-0 self-attention) and 64 (level 1);
    ReLU, LayerNorm, dropout structure [0, 0.3, 0] (inactive at inference)."""
    path = Path(folder) / name
    if not path.is_file():
        write_hypernetwork(path, sorted({SD1_CONTEXT, *SD1_LEVEL_WIDTHS}), name=path.stem,
                           activation_func="relu", is_layer_norm=True, use_dropout=True,
                           dropout_structure=(0.0, 0.3, 0.0), scale=0.05)
    return path


DEMO_FILES: dict[str, dict[str, Callable[[Path], Path]]] = {
    "embeddings": {"demostyle.safetensors": lambda folder: write_demo_embedding(folder),
                   "demoneg.pt": lambda folder: write_demo_negative_embedding(folder)},
    "loras": {"easel-demo-lora.safetensors": lambda folder: write_demo_lora(folder)},
    "hypernetworks": {"easel-demo-hypernet.pt": lambda folder: write_demo_hypernetwork(folder)},
}


__all__ = [
    "DEMO_FILES",
    "demo_lora_tensors",
    "demo_vectors",
    "hypernetwork_file",
    "hypernetwork_layers",
    "write_demo_embedding",
    "write_demo_hypernetwork",
    "write_demo_lora",
    "write_demo_negative_embedding",
    "write_embedding",
    "write_hypernetwork",
]
