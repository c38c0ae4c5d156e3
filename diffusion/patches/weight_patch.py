"""What a weight patch is and how a patched weight is computed (the model patcher's arithmetic).

- `WeightPatch`: one recorded patch of one parameter (key, adapter, strength, source), frozen.
- `identity_token(obj)`: a process-unique number per object (never reused, unlike `id()`), for
  fingerprints and cache keys.
- `compute_patched(W0, records)`: `cast(W0 + sum_i m_i dW_i)` accumulated in fp32; `W0` is never
  modified. Plain low-rank factors of CPU weights go to the fused one-pass kernel
  (diffusion.patches.lowrank_kernel) when it is available; otherwise, and on accelerators, a fused `addmm`
  (`W0 + c * up @ down`, no full delta in memory); without the kernel a bf16/fp16 CPU weight goes
  through fp32 a block of rows at a time (`BLOCK_BYTES`); deltas that are expensive to build (LoHa,
  LoKr, Tucker, DoRA) are kept in a byte-bounded LRU, `DELTA_CACHE` (`EASEL_DELTA_CACHE_MB`, default
  2048).
"""
from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from diffusion.patches import lowrank_kernel
from diffusion.patches.lowrank_kernel import LowrankBatch


@runtime_checkable
class WeightAdapter(Protocol):
    """What `add_patches` accepts per parameter (diffusion.patches.lora.weights implements it).

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
                    cache: DeltaCache | None = None, out: torch.Tensor | None = None,
                    batch: LowrankBatch | None = None) -> torch.Tensor:
    """`cast(W0 + sum m_i dW_i)` accumulated in fp32; `original` is never modified.

    `out` (same shape, dtype and device as `original`, not `original` itself): write the result
    there instead of allocating (a re-patch reuses the storage of the previous patched weight).
    `batch`: a CPU weight whose records are all plain low-rank pairs is queued there for the fused
    kernel (diffusion.patches.lowrank_kernel) and the returned tensor holds the result only after
    `batch.run()`; anything else is computed here."""
    cache = DELTA_CACHE if cache is None else cache
    if batch is not None and not CACHE_LOWRANK and lowrank_kernel.supports(original) \
            and (out is None or out.is_contiguous()):
        terms = _lowrank_terms(original, records)
        if terms:
            dest = out if out is not None else torch.empty_like(original, memory_format=torch.contiguous_format)
            batch.add(original, dest, terms, reused=out is not None)
            return dest
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
