"""The model patcher: MODEL and CLIP values are clones that record weight patches; weights are only
touched when a sampler or text encoder needs the module on its device.

- `ModelPatcher.add_patches` records `WeightPatch` records (parameter key, adapter, strength, source);
  nothing is computed.
- `patch_model(device)` brings the shared module to the state this patcher describes: for each
  parameter, `W = cast(W0 + sum_i m_i * dW_i)` computed in fp32 from the original `W0`, stored in
  `W0`'s dtype. The original tensor object `W0` is kept aside (no copy: the parameter's `.data` is
  swapped to the patched tensor), so `unpatch_model` restores it bit-exactly by swapping back.
- Several clones share one module; the module's state (originals, which records each parameter
  currently carries, installed attention processors) lives in one `_ModuleState` per module, so a
  clone with another patch set re-patches only the parameters whose records differ.
- Strength-only changes: adapters are shared between clones (the LoRA file cache keeps them), so
  full-size deltas that are expensive to build (LoHa, LoKr, Tucker, DoRA normalisation) are kept in a
  byte-bounded LRU (`DELTA_CACHE`) keyed by adapter; low-rank LoRA factors are applied with one fused
  `addmm` (`W0 + c * up @ down` in a single pass over W, no full delta in memory); a bf16/fp16
  weight on the CPU goes through fp32 a block of rows at a time (`BLOCK_BYTES`). The sampler leaves
  the module patched after its run, so a strength change is one such pass over the weights it
  touches, written into the storage of the previous patched tensor.
- Attention hooks: `model_options["attn2_kv"]` / `["attn1_kv"]` (docs/contracts.md) are lists of callables
  `fn(context_k, context_v) -> (context_k, context_v)`; `patch_model` installs `KVHookProcessor` on
  every diffusers `attn2` module and `unpatch_model` puts the original processors back.
"""
from __future__ import annotations

import copy
import hashlib
import os
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class WeightAdapter(Protocol):
    """What `add_patches` accepts per parameter (diffusion.lora_weights implements it).

    `delta(weight)` returns the fp32 delta at strength 1 (alpha/rank scale included) with
    `weight.shape`; `weight` is the running fp32 weight and is only read when `weight_dependent`.
    """

    weight_dependent: bool

    def delta(self, weight: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------
# stable identity tokens (never reused, unlike id()) for fingerprints


_token_counter = itertools.count(1)
_tokens: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_tokens_by_id: dict[int, tuple[Any, int]] = {}    # fallback for objects that take no weak reference


def identity_token(obj: Any) -> int:
    """A process-unique number for `obj`, never given to another object (even after `obj` dies)."""
    try:
        tok = _tokens.get(obj)
        if tok is None:
            tok = next(_token_counter)
            _tokens[obj] = tok
        return tok
    except TypeError:
        held = _tokens_by_id.get(id(obj))
        if held is None or held[0] is not obj:
            held = (obj, next(_token_counter))    # keeps obj alive: its id cannot be reused
            _tokens_by_id[id(obj)] = held
        return held[1]


# ----------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True, eq=False)
class WeightPatch:
    """One recorded patch of one parameter: `W += strength * adapter.delta(W)`.

    `source` names where the adapter came from (for LoRA files `path|mtime_ns|size`)."""

    key: str                    # parameter name in the patched module, e.g. "unet.conv_in.weight"
    adapter: Any                # WeightAdapter or a plain Tensor (a full `diff`)
    strength: float
    source: str

    def signature(self) -> tuple[int, float]:
        return identity_token(self.adapter), float(self.strength)


class FullDiff:
    """A plain tensor given to `add_patches`: `dW = diff` (reshaped to the weight)."""

    weight_dependent = False

    def __init__(self, diff: torch.Tensor) -> None:
        self.diff = diff

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        if self.diff.numel() != weight.numel():
            raise ValueError(f"diff of shape {tuple(self.diff.shape)} does not fit weight {tuple(weight.shape)}")
        return self.diff.to(device=weight.device, dtype=torch.float32).reshape(weight.shape)


def _as_adapter(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return FullDiff(value)
    # ComfyUI plugin spellings of a full difference: ("diff", (tensor,)) and (tensor,)
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "diff" and isinstance(value[1], tuple):
        return FullDiff(value[1][0])
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], torch.Tensor):
        return FullDiff(value[0])
    if not hasattr(value, "delta"):
        raise TypeError(f"a patch must be a Tensor or have .delta(weight); got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------
# bounded delta cache


class DeltaCache:
    """LRU of fp32 deltas keyed by (adapter token, weight shape, device, base signature), bounded in
    bytes. Entries die with their adapter."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            t = self._entries.get(key)
            if t is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.budget_bytes and self._entries:
                _, ev = self._entries.popitem(last=False)
                self._bytes -= ev.numel() * ev.element_size()

    def drop_token(self, token: int) -> None:
        with self._lock:
            for k in [k for k in self._entries if k[0] == token]:
                t = self._entries.pop(k)
                self._bytes -= t.numel() * t.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


DELTA_CACHE = DeltaCache(int(float(os.environ.get("EASEL_DELTA_CACHE_MB", "2048")) * 1024 ** 2))
# False: low-rank LoRA factors are applied with a fused addmm (no full delta kept: memory stays at the
# originals' size); True: full up@down deltas are kept in DELTA_CACHE like the other types.
CACHE_LOWRANK = False
_watched: set[int] = set()


def _cache_key(adapter: Any, weight: torch.Tensor, base: tuple) -> tuple:
    tok = identity_token(adapter)
    if tok not in _watched:
        _watched.add(tok)
        try:
            weakref.finalize(adapter, _forget, tok)
        except TypeError:
            pass
    return (tok, tuple(weight.shape), str(weight.device), base)


def _forget(token: int) -> None:
    _watched.discard(token)
    DELTA_CACHE.drop_token(token)


# ----------------------------------------------------------------------------------------------
# applying the records of one parameter


# a low-precision weight patched on the CPU is converted to fp32 this many bytes of rows at a time
# (the block stays in cache; no weight-sized fp32 temporary whose page faults cost more than the math)
BLOCK_BYTES = 4 << 20


def _lowrank_terms(original: torch.Tensor, records: Sequence[WeightPatch]
                   ) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """(up `[out, r]`, down `[r, cols]`, m * s) per effective record when every one is a plain
    low-rank pair for this weight (the common LoRA / LoCon case); None otherwise."""
    terms = []
    for rec in records:
        if rec.strength == 0:
            continue
        factors = getattr(rec.adapter, "lowrank_factors", None)
        fac = None if factors is None else factors(original.shape, original.device)
        if fac is None:
            return None
        up2, down2, scale = fac
        terms.append((up2, down2, float(rec.strength) * scale))
    return terms


def _patched_lowrank_blocked(original: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                             out: torch.Tensor | None) -> torch.Tensor:
    """`cast(W0 + sum_i c_i up_i @ down_i)` for a low-precision CPU weight, one block of rows at a
    time: fp32 scratch `[rows, cols]` <- W0 rows; `addmm_` of each term's rows; cast into the result."""
    n_rows = original.shape[0]
    w2 = original.reshape(n_rows, -1)                                   # [out, in*kh*kw]
    cols = w2.shape[1]
    dest = out if out is not None else torch.empty_like(original, memory_format=torch.contiguous_format)
    d2 = dest.view(n_rows, cols)
    rows = max(1, min(n_rows, BLOCK_BYTES // (cols * 4)))
    scratch = torch.empty(rows, cols, dtype=torch.float32, device=original.device)
    for i in range(0, n_rows, rows):
        n = min(rows, n_rows - i)
        blk = scratch[:n]
        blk.copy_(w2[i:i + n])
        for up2, down2, c in terms:
            blk.addmm_(up2[i:i + n], down2, alpha=c)
        d2[i:i + n].copy_(blk)
    return dest


def compute_patched(original: torch.Tensor, records: Sequence[WeightPatch],
                    cache: DeltaCache | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`cast(W0 + sum m_i dW_i)` accumulated in fp32; `original` is never modified.

    `out` (same shape, dtype and device as `original`, not `original` itself): write the result
    there instead of allocating (a re-patch reuses the storage of the previous patched weight)."""
    cache = DELTA_CACHE if cache is None else cache
    fp32 = original.dtype == torch.float32
    if not fp32 and original.device.type == "cpu" and original.dim() >= 2 and not CACHE_LOWRANK \
            and (out is None or out.is_contiguous()):
        terms = _lowrank_terms(original, records)
        if terms:
            return _patched_lowrank_blocked(original, terms, out)
    dest = out if (out is not None and fp32) else None       # where the fp32 accumulation may land
    acc: torch.Tensor | None = None            # fp32 running weight, shape of W0
    base: tuple = ()                            # signature of the records applied so far
    for rec in records:
        if rec.strength == 0:
            continue                            # strength 0 is an exact no-op
        adapter = rec.adapter
        m = float(rec.strength)
        fused = getattr(adapter, "addmm_into", None)
        if fused is not None and not adapter.weight_dependent and not CACHE_LOWRANK:
            # LoRA: acc = acc + m * s * up @ down in one pass (no full delta allocated)
            acc = fused(original, m, out=dest) if acc is None else fused(acc, m, out=acc)
        else:
            running = original.float() if acc is None else acc
            if getattr(adapter, "sets_weight", False):
                value = adapter.delta(running)
                if acc is None:
                    acc = dest.copy_(value) if dest is not None else value.clone()
                else:
                    acc.copy_(value)
            else:
                # weight-dependent deltas depend on the running weight: key them by what came before
                key = _cache_key(adapter, running,
                                 (identity_token(original),) + base if adapter.weight_dependent else ())
                d = cache.get(key)
                if d is None:
                    d = adapter.delta(running)
                    if d.dtype != torch.float32:
                        d = d.float()
                    cache.put(key, d)
                if acc is None:
                    if not fp32:
                        acc = running.add_(d, alpha=m)            # running is already a fp32 copy
                    elif dest is not None:
                        acc = torch.add(running, d, alpha=m, out=dest)
                    else:
                        acc = torch.add(running, d, alpha=m)
                else:
                    acc.add_(d, alpha=m)
        base = base + (rec.signature(),)
    if acc is None:
        return original
    if fp32:
        return acc
    if out is not None:
        return out.copy_(acc)
    return acc.to(original.dtype)


# ----------------------------------------------------------------------------------------------
# attention hooks


class KVHookProcessor:
    """A diffusers attention processor that passes the key/value input (the text context for
    `attn2`, the hidden states for self-attention `attn1`) through the `<kind>_kv` hooks before
    the key and value projections (hypernetworks)."""

    def __init__(self, hooks: Sequence[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self.hooks = list(hooks)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:                                            # [B, C, H, W] -> [B, HW, C]
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        context_k, context_v = context, context                       # [B, T, D] each
        for fn in self.hooks:
            context_k, context_v = fn(context_k, context_v)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)   # [B, heads, N, hd]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


HOOK_KINDS = ("attn1", "attn2")   # self-attention, cross-attention: model_options["<kind>_kv"]


def _attn_modules(model: torch.nn.Module, kind: str) -> list[tuple[str, torch.nn.Module]]:
    return [(name, mod) for name, mod in model.named_modules()
            if name.endswith(kind) and hasattr(mod, "set_processor") and hasattr(mod, "processor")]


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

    # ---------------------------------------------------------------- recording
    def clone(self) -> ModelPatcher:
        c = type(self).__new__(type(self))
        c.__dict__.update(self.__dict__)          # attributes others set travel along (shallow)
        c.patches = dict(self.patches)            # tuples of frozen records: sharing them is safe
        c.model_options = _copy_options(self.model_options)
        return c

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
            if current is not None and not same_device(current, target):
                if st.applied:
                    self._restore_weights(st, list(st.applied))
                self.model.to(target)
            params = dict(self.model.named_parameters())
            for key in [k for k in st.applied if k not in self.patches or not self._effective(k)]:
                self._restore_weights(st, [key], params)
            for key, recs in self.patches.items():
                eff = self._effective(key)
                if not eff:
                    continue
                sig = tuple(r.signature() for r in eff)
                if st.applied.get(key) == sig:
                    continue
                p = params[key]
                orig = st.originals.get(key)
                if orig is None:
                    # the original tensor object is kept as it is (no copy) when it lives on the
                    # offload device; a weight on the accelerator is backed up to the offload device
                    src = p.data
                    st.originals[key] = src if same_device(p.device, self.offload_device) else src.to(self.offload_device, copy=True)
                    reuse = None
                else:
                    src = orig if orig.device == p.device else orig.to(p.device)
                    # p.data is our own earlier patched tensor: overwrite it instead of allocating
                    reuse = p.data if (key in st.applied and p.data is not orig and p.data.shape == src.shape
                                       and p.data.dtype == src.dtype and p.data.device == src.device) else None
                new = compute_patched(src, eff, out=reuse)
                if new is not p.data:
                    p.data = new
                st.applied[key] = sig
            self._install_hooks(st)
        return self.model

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
                for name, mod in _attn_modules(self.model, kind):
                    st.processors[name] = mod.processor
                    mod.set_processor(proc)
        st.hooks_sig = sig

    def _remove_hooks(self, st: _ModuleState) -> None:
        if st.processors:
            mods = {name: mod for kind in HOOK_KINDS for name, mod in _attn_modules(self.model, kind)}
            for name, proc in st.processors.items():
                if name in mods:
                    mods[name].set_processor(proc)
            st.processors.clear()
        st.hooks_sig = ()

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
