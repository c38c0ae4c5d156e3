"""The model patcher: MODEL and CLIP values are clones that record weight patches; weights are only
touched when a sampler or text encoder needs the module on its device.

- `ModelPatcher.add_patches` records `WeightPatch` records (parameter key, adapter, strength, source);
  nothing is computed.
- `patch_model(device)` brings the shared module to the state this patcher describes: for each
  parameter, `W = cast(W0 + sum_i m_i * dW_i)` (`diffusion.patches.weight_patch.compute_patched`) from the
  original `W0`, stored in `W0`'s dtype. The original tensor object `W0` is kept aside (no copy: the
  parameter's `.data` is swapped to the patched tensor), so `unpatch_model` restores it bit-exactly
  by swapping back.
- Several clones share one module; the module's state (originals, which records each parameter
  currently carries, installed attention processors) lives in one `_ModuleState` per module, so a
  clone with another patch set re-patches only the parameters whose records differ, writing into
  the storage of the previous patched tensor. The sampler leaves the module patched after its run,
  so a strength change is one pass over the weights it touches.
- Attention hooks: `model_options["attn2_kv"]` / `["attn1_kv"]` (docs/contracts.md) are lists of
  callables `fn(context_k, context_v) -> (context_k, context_v)`; `patch_model` installs
  `diffusion.patches.attention_hooks.KVHookProcessor` on the diffusers attention modules and
  `unpatch_model` puts the original processors back.
"""
from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffusion.models import devices
from diffusion.patches.attention_hooks import HOOK_KINDS, KVHookProcessor, attention_modules
from diffusion.patches.lowrank_kernel import LowrankBatch
from diffusion.patches.weight_patch import (DELTA_CACHE, DeltaCache, FullDiff, WeightAdapter, WeightPatch,
                                    _as_adapter, compute_patched, identity_token)

__all__ = ["DELTA_CACHE", "DeltaCache", "FullDiff", "KVHookProcessor", "ModelPatcher", "WeightAdapter",
           "WeightPatch", "compute_patched", "identity_token", "same_device"]


# ----------------------------------------------------------------------------------------------
# per-module state shared by all clones


class _ModuleState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.originals: dict[str, torch.Tensor] = {}       # key -> the original tensor object W0
        self.applied: dict[str, tuple] = {}                 # key -> signature of the records it carries
        self.processors: dict[str, Any] = {}                # attn1/attn2 module name -> original processor
        self.hooks_sig: tuple = ()


_states: "weakref.WeakKeyDictionary[torch.nn.Module, _ModuleState]" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(model: torch.nn.Module) -> _ModuleState:
    with _states_lock:
        st = _states.get(model)
        if st is None:
            st = _ModuleState()
            _states[model] = st
        return st


def same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" name the same device here (an unindexed device is the current one)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _module_device(model: torch.nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _stable_repr(value: Any) -> str:
    """Content of plain containers and scalars; identity tokens for anything else (hooks, tensors)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_stable_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_stable_repr(value[k])}" for k in sorted(value, key=repr)) + "}"
    return f"obj{identity_token(value)}"


def _copy_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        out[k] = list(v) if isinstance(v, list) else (_copy_options(v) if isinstance(v, dict) else copy.copy(v))
    return out


def _remove_hooks(model: torch.nn.Module, st: _ModuleState) -> None:
    if st.processors:
        mods = {name: mod for kind in HOOK_KINDS for name, mod in attention_modules(model, kind)}
        for name, proc in st.processors.items():
            if name in mods:
                mods[name].set_processor(proc)
        st.processors.clear()
    st.hooks_sig = ()


@torch.no_grad()
def offload_module(model: torch.nn.Module, device: torch.device) -> None:
    """Unpatch a module (originals back, bit-exact; hooks removed) and move it to `device`; what
    `devices.make_room` calls when another model needs the accelerator's memory. The next
    `patch_model` moves it back and re-patches."""
    st = _state(model)
    with st.lock:
        params = dict(model.named_parameters())
        for key in list(st.applied):
            orig = st.originals.pop(key, None)
            st.applied.pop(key, None)
            if orig is not None:
                params[key].data = orig               # the backup on the offload device (or the tensor itself)
        _remove_hooks(model, st)
        model.to(device)
    devices.mark_offloaded(model)


def _offloader(model: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    ref = weakref.ref(model)                          # the registry of loaded models must not keep it alive

    def offload() -> None:
        m = ref()
        if m is not None:
            offload_module(m, device)
    return offload


class ModelPatcher:
    """Clone-and-record wrapper of a torch module (docs/contracts.md)."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device | str = "cpu",
                 offload_device: torch.device | str = "cpu") -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ModelPatcher wraps a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.patches: dict[str, tuple[WeightPatch, ...]] = {}     # key -> records in order
        self.model_options: dict[str, Any] = {}
        self._param_shapes: dict[str, torch.Size] | None = None
        self._owns_module = True                  # clones share the module: they do not count it

    # ---------------------------------------------------------------- recording
    def clone(self) -> ModelPatcher:
        c = type(self).__new__(type(self))
        c.__dict__.update(self.__dict__)          # attributes others set travel along (shallow)
        c.patches = dict(self.patches)            # tuples of frozen records: sharing them is safe
        c.model_options = _copy_options(self.model_options)
        c._owns_module = False
        return c

    def cache_size_bytes(self) -> int:
        """Bytes this value holds for the graph's output cache: the module's parameters and buffers
        for the patcher that first wrapped it (the loader's output), plus the tensors of the
        adapters it records. Clones share the module, so counting it again would make every LoRA
        clone look as large as its checkpoint and evict models early."""
        total = 0
        if getattr(self, "_owns_module", True):
            total += sum(t.element_size() * t.nelement() for t in self.model.parameters())
            total += sum(t.element_size() * t.nelement() for t in self.model.buffers())
        seen: set[int] = set()
        for recs in self.patches.values():
            for rec in recs:
                if id(rec.adapter) in seen:
                    continue
                seen.add(id(rec.adapter))
                fields = getattr(rec.adapter, "__dict__", {})
                total += sum(v.element_size() * v.nelement() for v in fields.values() if isinstance(v, torch.Tensor))
        return total

    def parameter_shapes(self) -> dict[str, torch.Size]:
        """Parameter name -> shape of the original weights (what patch keys must name)."""
        if self._param_shapes is None:
            st = _state(self.model)
            shapes = {}
            for name, p in self.model.named_parameters():
                orig = st.originals.get(name)
                shapes[name] = (orig if orig is not None else p).shape
            self._param_shapes = shapes
        return self._param_shapes

    def add_patches(self, patches: Mapping[str, Any], strength: float = 1.0, source: str = "") -> list[str]:
        """Record `W += strength * delta` for each key that names a parameter; returns those keys.
        Keys naming no parameter are ignored (the caller reports them)."""
        shapes = self.parameter_shapes()
        applied = []
        for key, value in patches.items():
            if key not in shapes:
                continue
            rec = WeightPatch(key=key, adapter=_as_adapter(value), strength=float(strength), source=str(source))
            self.patches[key] = self.patches.get(key, ()) + (rec,)
            applied.append(key)
        return applied

    def records(self) -> list[WeightPatch]:
        return [r for recs in self.patches.values() for r in recs]

    def patch_fingerprint(self) -> str:
        """Stable hash of the base module's identity, the ordered effective patch records and the
        hook options: equal fingerprints mean `patch_model` yields the same weights and hooks."""
        h = hashlib.sha256()
        h.update(f"model:{identity_token(self.model)}".encode())
        for key, recs in self.patches.items():
            for r in recs:
                if r.strength == 0:
                    continue
                h.update(f"|{key}|{r.source}|{r.strength!r}|{identity_token(r.adapter)}".encode())
        for name in sorted(self.model_options):
            h.update(f"|opt:{name}={_stable_repr(self.model_options[name])}".encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- applying
    def _hooks(self, kind: str = "attn2") -> list[Callable]:
        return list(self.model_options.get(f"{kind}_kv", []) or [])

    @torch.no_grad()
    def patch_model(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """Move the module to `device` (default: load_device) and bring its weights and attention
        processors to the state recorded here; returns `.model`."""
        target = torch.device(device) if device is not None else self.load_device
        st = _state(self.model)
        with st.lock:
            current = _module_device(self.model)
            accelerator = not same_device(target, self.offload_device)
            nbytes = devices.module_bytes(self.model) if accelerator else 0
            if current is not None and not same_device(current, target):
                if st.applied:
                    self._restore_weights(st, list(st.applied))
                if accelerator:                       # offload least recently used models first
                    devices.make_room(target, nbytes, keep=self.model)
                self.model.to(target)
            params = dict(self.model.named_parameters())
            for key in [k for k in st.applied if k not in self.patches or not self._effective(k)]:
                self._restore_weights(st, [key], params)
            batch = LowrankBatch()        # plain LoRA factors of CPU weights: one fused kernel call
            try:
                self._patch_weights(st, params, batch)
            finally:
                batch.run()               # even after an error: every queued weight gets its values
            self._install_hooks(st)
            if accelerator:                           # (re)marks it most recently used
                devices.mark_loaded(self.model, target, nbytes, _offloader(self.model, self.offload_device))
        return self.model

    def _patch_weights(self, st: _ModuleState, params: dict[str, torch.nn.Parameter], batch: LowrankBatch) -> None:
        """Brings every patched parameter to its recorded patches (weights queued in `batch` are
        written when it runs)."""
        for key, recs in self.patches.items():
            eff = self._effective(key)
            if not eff:
                continue
            sig = tuple(r.signature() for r in eff)
            if st.applied.get(key) == sig:
                continue
            p = params[key]
            data = p.data                 # (each .data access makes a new tensor object)
            orig = st.originals.get(key)
            if orig is None:
                # the original tensor object is kept as it is (no copy) when it lives on the
                # offload device; a weight on the accelerator is backed up to the offload device
                src = data
                st.originals[key] = src if same_device(data.device, self.offload_device) else src.to(self.offload_device, copy=True)
                reuse = None
            else:
                src = orig if orig.device == data.device else orig.to(data.device)
                # data is our own earlier patched tensor: overwrite it instead of allocating
                reuse = data if (key in st.applied and not data.is_set_to(orig) and data.shape == src.shape
                                 and data.dtype == src.dtype and data.device == src.device) else None
            new = compute_patched(src, eff, out=reuse, batch=batch)
            if new is not reuse:
                p.data = new
            st.applied[key] = sig

    def _effective(self, key: str) -> tuple[WeightPatch, ...]:
        return tuple(r for r in self.patches.get(key, ()) if r.strength != 0)

    def _restore_weights(self, st: _ModuleState, keys: list[str],
                         params: dict[str, torch.nn.Parameter] | None = None) -> None:
        params = dict(self.model.named_parameters()) if params is None else params
        for key in keys:
            orig = st.originals.pop(key, None)
            st.applied.pop(key, None)
            if orig is None:
                continue
            p = params[key]
            p.data = orig if orig.device == p.device else orig.to(p.device)

    def _install_hooks(self, st: _ModuleState) -> None:
        per_kind = {kind: self._hooks(kind) for kind in HOOK_KINDS}
        sig = tuple((kind, tuple(identity_token(h) for h in hooks)) for kind, hooks in per_kind.items() if hooks)
        if sig == st.hooks_sig:
            return
        self._remove_hooks(st)
        for kind, hooks in per_kind.items():
            if hooks:
                proc = KVHookProcessor(hooks)
                for name, mod in attention_modules(self.model, kind):
                    st.processors[name] = mod.processor
                    mod.set_processor(proc)
        st.hooks_sig = sig

    def _remove_hooks(self, st: _ModuleState) -> None:
        _remove_hooks(self.model, st)

    @torch.no_grad()
    def unpatch_model(self, offload: bool = False) -> None:
        """Put the original weight tensors (bit-exact) and attention processors back; with
        `offload` move the module to offload_device."""
        st = _state(self.model)
        with st.lock:
            self._restore_weights(st, list(st.applied))
            self._remove_hooks(st)
            if offload:
                self.model.to(self.offload_device)

    def is_patched(self) -> bool:
        """Whether the module currently carries any patched weight or hook."""
        st = _state(self.model)
        return bool(st.applied or st.processors)

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.patches.values())
        return f"ModelPatcher({type(self.model).__name__}, {n} patch records, load={self.load_device})"
