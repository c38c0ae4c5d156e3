"""A1111 hypernetworks (formats.md §4): read a `.pt` file, build its MLPs, give attention hooks.

    hn = load_hypernetwork(path)                     # Hypernetwork(name, config, modules by width)
    patched = model.clone(); add_hypernetwork(patched, hn, strength=0.8)

File: a `torch.save`d dict read with `torch.load(weights_only=True)`: integer keys (context widths,
e.g. 768, 320, 640, 1280) -> `(state_dict_k, state_dict_v)`, plus the options `layer_structure`
(default [1, 2, 1]), `activation_func` (None), `is_layer_norm` (False), `use_dropout`,
`dropout_structure`, `last_layer_dropout` (False), `activate_output` (True), and metadata.

One MLP for width d: for i = 0 .. len(ls) - 2: `Linear(int(d ls[i]) -> int(d ls[i+1]))`, then the
activation unless it is None/"linear" or this is the last Linear and not `activate_output`, then
`LayerNorm` if `is_layer_norm`, then Dropout. The stack is rebuilt from the weight keys
(`linear.{j}.weight`, j counting every module; 2-D = Linear, 1-D = LayerNorm; the oldest files'
`linear1`/`linear2` = `linear.0`/`linear.1`): where a LayerNorm follows a Linear, the index gap says
whether an activation sits between them (gap 2) or not (gap 1); otherwise the flags decide.

Maths (formats.md §4.3): `H(x) = x + MLP(x) * m`, m = strength; in each attention layer whose context
width has a pair, `k = to_k(H_k(context))`, `v = to_v(H_v(context))`; query untouched; several
hypernetworks chain (each sees the previous one's output). Strength 0 is an exact identity.

Where A1111 and ComfyUI's port differ, this follows A1111 (the format's origin):
- `activate_output` defaults to True when absent (ComfyUI: False);
- activations: A1111's list — linear, relu, leakyrelu, elu, swish (= Hardswish, not SiLU), tanh,
  sigmoid, and every class of `torch.nn.modules.activation` by lower-cased name with default
  arguments (gelu, silu, mish, softsign, selu, celu, softplus, hardtanh, relu6, ...); ComfyUI only
  knows nine and otherwise leaves the model unpatched; an unknown name here is an error naming it;
- dropout is never applied at inference (A1111 evaluates in eval mode; ComfyUI builds Dropout(0.3)
  and leaves it in training mode, so its outputs are random). `dropout_structure` /
  `use_dropout` / `last_layer_dropout` are read and validated but only matter for training;
- A1111 applies the hooks to self-attention (attn1, widths 320/640/1280 on SD1) as well as to
  cross-attention (attn2, 768). The hooks are registered under `model_options["attn2_kv"]`
  (docs/contracts.md) and, for self-attention, under `model_options["attn1_kv"]`, which takes effect
  where the patcher installs hooks on attn1 layers too.
"""
from __future__ import annotations

import copy
import inspect
import os
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import file_kind

KV_HOOK_KEYS = ("attn2_kv", "attn1_kv")        # cross-attention (contract) and self-attention


def _activation_table() -> dict[str, type[nn.Module]]:
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    for cls_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            table[cls_name.lower()] = cls
    return table


ACTIVATIONS: dict[str, type[nn.Module]] = _activation_table()


@dataclass(frozen=True)
class HypernetworkConfig:
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str | None = None
    is_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = True
    last_layer_dropout: bool = False


def dropout_structure_for(layer_structure: Sequence[float], use_dropout: bool,
                          last_layer_dropout: bool) -> tuple[float, ...]:
    """A1111's derived dropout rates when a file has no `dropout_structure`."""
    n = len(layer_structure)
    if not use_dropout:
        return (0.0,) * n
    return (0.0, *([0.3] * (n - 3)), 0.3 if last_layer_dropout else 0.0, 0.0)


def config_from_file(path: Path, data: Mapping[Any, Any]) -> HypernetworkConfig:
    ls = tuple(float(x) for x in (data.get("layer_structure") or (1, 2, 1)))
    if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
        raise ModelFileError(path, f"layer_structure must start and end with 1, found {list(ls)}")
    act = data.get("activation_func")
    act = None if act is None else str(act).lower()
    if act is not None and act not in ACTIVATIONS:
        raise ModelFileError(path, f"unknown activation_func {act!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    dropout = data.get("dropout_structure")
    use_dropout = bool(any(dropout)) if dropout is not None and any(dropout) else bool(data.get("use_dropout", False))
    last = bool(data.get("last_layer_dropout", False))
    if dropout is None:
        dropout_t = dropout_structure_for(ls, use_dropout, last)
    else:
        dropout_t = tuple(float(x) for x in dropout)
        if len(dropout_t) != len(ls) or any(not 0 <= p < 1 for p in dropout_t):
            raise ModelFileError(path, f"dropout_structure {list(dropout_t)} must have {len(ls)} values in [0, 1)")
    return HypernetworkConfig(ls, act, bool(data.get("is_layer_norm", False)), use_dropout, dropout_t,
                              bool(data.get("activate_output", True)), last)


class HypernetworkModule(nn.Module):
    """The MLP for one context width (inference form: no Dropout). forward(x) = MLP(x), no residual."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x: [B, T, d] -> [B, T, d]
        return self.net(x)


_OLD_NAMES = {"linear1.": "linear.0.", "linear2.": "linear.1."}
_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


def build_module(path: Path, width: int, state: Mapping[str, torch.Tensor],
                 cfg: HypernetworkConfig, which: str) -> HypernetworkModule:
    """Rebuild one MLP from its weights and the flags (see the module docstring)."""
    where = f"width {width} {which}"
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for old, new in _OLD_NAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        m = _KEY.match(key)
        if m is None or not isinstance(value, torch.Tensor):
            raise ModelFileError(path, f"{where}: unexpected entry {key!r}")
        entries.setdefault(int(m.group(1)), {})[m.group(2)] = value.detach().float().cpu()
    order = sorted(entries)
    linears = [i for i in order if entries[i].get("weight") is not None and entries[i]["weight"].dim() == 2]
    if len(linears) != len(cfg.layer_structure) - 1:
        raise ModelFileError(path, f"{where}: {len(linears)} Linear layers, layer_structure "
                                   f"{list(cfg.layer_structure)} needs {len(cfg.layer_structure) - 1}")
    act_cls = ACTIVATIONS.get(cfg.activation_func) if cfg.activation_func not in (None, "linear") else None
    layers: list[nn.Module] = []
    expected_in = width
    for n, idx in enumerate(linears):
        w, b = entries[idx]["weight"], entries[idx].get("bias")
        out_f = int(width * cfg.layer_structure[n + 1])
        if w.shape != (out_f, expected_in) or b is None or b.shape != (out_f,):
            raise ModelFileError(path, f"{where}: linear.{idx} has weight {tuple(w.shape)} and bias "
                                       f"{None if b is None else tuple(b.shape)}; expected ({out_f}, {expected_in})")
        lin = nn.Linear(expected_in, out_f)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layers.append(lin)
        nxt = linears[n + 1] if n + 1 < len(linears) else None
        between = [i for i in order if i > idx and (nxt is None or i < nxt)]
        last = n == len(linears) - 1
        prelu_idx = None
        if cfg.activation_func == "prelu" and idx + 1 in between:
            prelu_idx = idx + 1                                # PReLU carries its own weight
        norm_idx = next((i for i in between if i != prelu_idx and entries[i].get("weight") is not None
                         and entries[i]["weight"].dim() == 1), None)
        if prelu_idx is not None:
            activated = True
        elif norm_idx is not None:
            activated = norm_idx - idx == 2                    # Linear, activation, LayerNorm
        else:
            activated = not (last and not cfg.activate_output)
        if activated and act_cls is not None:
            try:
                act = act_cls()
            except TypeError as exc:
                raise ModelFileError(path, f"activation_func {cfg.activation_func!r} cannot be built with "
                                           f"default arguments ({exc})") from None
            if prelu_idx is not None:
                act.load_state_dict({"weight": entries[prelu_idx]["weight"].reshape(act.weight.shape)})
            layers.append(act)
        if norm_idx is not None:
            nw, nb = entries[norm_idx]["weight"], entries[norm_idx].get("bias")
            if nw.shape != (out_f,) or nb is None or nb.shape != (out_f,):
                raise ModelFileError(path, f"{where}: LayerNorm linear.{norm_idx} does not have {out_f} features")
            norm = nn.LayerNorm(out_f)
            with torch.no_grad():
                norm.weight.copy_(nw)
                norm.bias.copy_(nb)
            layers.append(norm)
        elif cfg.is_layer_norm:
            raise ModelFileError(path, f"{where}: is_layer_norm is set but linear.{idx} has no LayerNorm after it")
        expected_in = out_f
    module = HypernetworkModule(layers)
    module.eval()                                              # inference: no dropout, ever
    module.requires_grad_(False)
    return module


@dataclass(frozen=True, eq=False)
class Hypernetwork:
    """A loaded file: widths -> (MLP for keys, MLP for values)."""
    name: str
    path: str
    config: HypernetworkConfig
    modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = field(repr=False)
    _casts: dict = field(default_factory=dict, repr=False)    # (width, device, dtype) -> cast pair
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    _hooks: dict = field(default_factory=dict, repr=False)    # strength -> HypernetworkHook

    def hook(self, strength: float) -> HypernetworkHook:
        """The attention hook at `strength`; the same object for the same strength, so patchers
        built twice from one file compare equal (ModelPatcher.patch_fingerprint)."""
        with self._lock:
            found = self._hooks.get(float(strength))
            if found is None:
                found = self._hooks[float(strength)] = HypernetworkHook(self, strength)
        return found

    def pair(self, width: int, device: torch.device, dtype: torch.dtype
             ) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (k, v) MLPs for a context width on the context's device and dtype (copies cached)."""
        base = self.modules.get(width)
        if base is None:
            return None
        if device.type == "cpu" and dtype == torch.float32:
            return base
        key = (width, str(device), dtype)
        with self._lock:
            cast = self._casts.get(key)
            if cast is None:
                cast = tuple(_copy_module(m).to(device=device, dtype=dtype) for m in base)
                self._casts[key] = cast
        return cast                                               # type: ignore[return-value]


def _copy_module(m: HypernetworkModule) -> HypernetworkModule:
    clone = copy.deepcopy(m)
    clone.eval()
    return clone


class HypernetworkHook:
    """`fn(context_k, context_v) -> (context_k, context_v)` for docs/contracts.md attention hooks:
    `x + MLP(x) * strength` for the widths the file covers, inputs unchanged otherwise."""

    def __init__(self, hypernetwork: Hypernetwork, strength: float) -> None:
        self.hypernetwork = hypernetwork
        self.strength = float(strength)

    def __call__(self, context_k: torch.Tensor, context_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.strength == 0.0:
            return context_k, context_v
        pair = self.hypernetwork.pair(context_k.shape[-1], context_k.device, context_k.dtype)
        if pair is None:
            return context_k, context_v
        mk, mv = pair
        with torch.no_grad():
            return context_k + mk(context_k) * self.strength, context_v + mv(context_v) * self.strength

    def __repr__(self) -> str:
        return f"HypernetworkHook({self.hypernetwork.name!r}, strength={self.strength})"


def _read(path: Path) -> Mapping[Any, Any]:
    if file_kind(path) == "safetensors":         # (empty and text files are refused there)
        raise ModelFileError(path, "a safetensors file, but A1111 hypernetworks are torch .pt files "
                                   "(a LoRA or an embedding in the hypernetworks folder?)")
    try:
        with open(path, "rb") as f:
            data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(path, f"refused by the safe loader (weights_only): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file; reported with its path
        raise ModelFileError(path, f"not a readable torch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, Mapping):
        raise ModelFileError(path, f"expected a dict, found {type(data).__name__}")
    return data


def _width_key(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def hypernetwork_from_dict(path: Path, data: Mapping[Any, Any], name: str | None = None) -> Hypernetwork:
    cfg = config_from_file(path, data)
    modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for key, value in data.items():
        width = _width_key(key)
        if width is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(s, Mapping) for s in value):
            raise ModelFileError(path, f"entry {key!r} must be a pair (k, v) of state dicts")
        modules[width] = (build_module(path, width, value[0], cfg, "k"), build_module(path, width, value[1], cfg, "v"))
    if not modules:
        raise ModelFileError(path, "no hypernetwork layers (integer keys such as 768, 320, 640, 1280) found")
    return Hypernetwork(name or path.stem, str(path), cfg, modules)


_CACHE: OrderedDict[tuple[str, int, int], Hypernetwork] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def load_hypernetwork(path: str | os.PathLike[str]) -> Hypernetwork:
    """Read a hypernetwork file (cached by path, mtime and size; name = file stem)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelFileError(p, f"cannot open hypernetwork file ({exc.strerror or exc})") from None
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    hn = hypernetwork_from_dict(p, _read(p))
    with _CACHE_LOCK:
        _CACHE[key] = hn
        while len(_CACHE) > 16:
            _CACHE.popitem(last=False)
    return hn


def add_hypernetwork(model: Any, hypernetwork: Hypernetwork, strength: float) -> Any:
    """Append the hypernetwork's hook (at `strength`) to a ModelPatcher clone's attention hooks, in
    place; returns the patcher. Callers clone first (the node does)."""
    hook = hypernetwork.hook(strength)
    for key in KV_HOOK_KEYS:
        model.model_options[key] = list(model.model_options.get(key, []) or []) + [hook]
    return model


def apply_hypernetwork(model: Any, hypernetwork: Hypernetwork, strength: float) -> Any:
    """A clone of `model` (ModelPatcher) with the hypernetwork added; strength 0 returns `model`."""
    if strength == 0:
        return model
    return add_hypernetwork(model.clone(), hypernetwork, strength)


__all__ = [
    "ACTIVATIONS",
    "KV_HOOK_KEYS",
    "Hypernetwork",
    "HypernetworkConfig",
    "HypernetworkHook",
    "HypernetworkModule",
    "add_hypernetwork",
    "apply_hypernetwork",
    "config_from_file",
    "dropout_structure_for",
    "hypernetwork_from_dict",
    "load_hypernetwork",
]
